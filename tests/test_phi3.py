"""Phi-3 decoders beyond the shared contract (test_architectures.py): configs read per variant, partial rotary
positions, longrope's short factors and its refused long range, the export re-fusing `qkv_proj` /
`gate_up_proj`, a partial-rotary GGUF, and refused options (generation against HF is a contract check).

Tiny random checkpoints (families.PHI3_VARIANTS; float32, eager attention, 4 query / 2 K/V heads of 8 dims):
`phi3` with full rotary, default RoPE, an untied head and a sliding window (6) on every layer, shorter than prefix +
text; `phi3_partial` with partial_rotary_factor 0.75 (6 of 8 dims rotated), longrope (short factors, attention
factor from a 32-of-64 original context) and a tied head.
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np
import pytest
from families import (FAMILY, PHI3_SHORT_FACTOR, PHI3_VARIANTS as VARIANTS, PHI3_WINDOW as WINDOW,
                      phi3_config as hf_config, random_phi3 as random_tiny)
from gguf_fixtures import write_gguf
from hf_fixtures import max_abs_diff, random_kv as _random_kv, save_tiny
from tolerances import F32_ATOL

from prefix_jax import models
from prefix_jax.models import DECODER, Prefix, llama, load_pretrained, phi3

PHI3 = FAMILY["phi3"]
B, S, T, P = dataclasses.astuple(PHI3.sizes)
VOCAB = PHI3.vocab
random_kv = functools.partial(_random_kv, length=P)


@pytest.fixture
def pairs(tiny_hf):
    """name -> (HF model, our PretrainedLM), built once per session (the contract's models)."""
    return lambda name: tiny_hf("phi3", name)


def test_configs_are_read_as_the_variants_say(pairs):
    c = pairs("phi3")[1].config
    assert (c.num_key_value_heads, c.head_dim, c.rotary_dim, c.rope_type, c.rope_theta, c.sliding_window,
            c.tie_word_embeddings, c.rope_attention_factor) == (2, 8, 8, "default", 500.0, WINDOW, False, 1.0)
    c = pairs("phi3_partial")[1].config
    assert (c.rotary_dim, c.rope_type, c.rope_short_factor, c.original_max_position_embeddings, c.max_positions,
            c.sliding_window, c.tie_word_embeddings) == (6, "longrope", tuple(PHI3_SHORT_FACTOR), 32, 32, None, True)
    hf = pairs("phi3_partial")[0]
    assert c.rope_attention_factor == pytest.approx(float(hf.model.rotary_emb.attention_scaling), rel=1e-12)
    assert c.rope_attention_factor > 1.05  # sqrt(1 + ln 2 / ln 32): visible in the logits


def test_a_phi4_mini_config_reads_with_its_legacy_rope_scaling():
    """Phi-4 mini's config.json (shapes, `partial_rotary_factor` 0.75, `rope_scaling` {"type": "longrope", ...}:
    transformers keeps `type` next to `rope_type`): 96 of 128 dims rotated, the attention factor of a 32x context
    extension."""
    import transformers

    hf = transformers.Phi3Config(
        vocab_size=200064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=24,
        num_key_value_heads=8, max_position_embeddings=131072, original_max_position_embeddings=4096,
        partial_rotary_factor=0.75, sliding_window=262144, tie_word_embeddings=True, pad_token_id=199999,
        bos_token_id=199999, eos_token_id=199999,
        rope_scaling={"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [2.0] * 48})
    c = phi3.Config.from_hf(hf, set())
    assert (c.rotary_dim, c.rope_type, c.max_positions, c.sliding_window) == (96, "longrope", 4096, 262144)
    assert c.rope_attention_factor == pytest.approx((1 + np.log(32) / np.log(4096)) ** 0.5)


def test_partial_rotary_leaves_the_last_dims_as_they_are():
    """With 6 of 8 dims rotated, dims 6..7 of every head pass unchanged and dims 0..5 rotate in pairs (i, i + 3)."""
    cfg = phi3.Config("phi3", VOCAB, 32, 48, 2, 4, 2, 8, partial_rotary_factor=0.75)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 3, 2, 8)), jnp.float32)
    cos, sin = phi3.rope_tables(cfg, jnp.asarray([[0, 1, 5]]))
    assert cos.shape == (1, 3, 6)
    y = np.asarray(llama.rotate(x, cos, sin))
    np.testing.assert_array_equal(y[..., 6:], np.asarray(x)[..., 6:])
    np.testing.assert_allclose(y[0, 0], np.asarray(x)[0, 0], atol=1e-7)  # position 0: no rotation
    norms = lambda a: np.hypot(a[..., :3], a[..., 3:6])
    np.testing.assert_allclose(norms(y), norms(np.asarray(x)), rtol=1e-6)  # pairs (i, i + 3) keep their length


def test_longrope_past_its_original_context_is_refused(pairs):
    _, lm = pairs("phi3_partial")
    src = np.ones((1, 24), np.int32)
    batch = {"source_ids": src, "source_mask": src, "target_ids": src[:, :6], "target_mask": src[:, :6]}
    with pytest.raises(ValueError, match="original_max_position_embeddings=32.*longrope.*long_factor"):
        lm.model.apply({"params": lm.params}, {k: jnp.asarray(v) for k, v in batch.items()},
                       Prefix(kv={DECODER: random_kv(lm.config.prefix_geometry()[DECODER], 1)[0]}))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_the_export_fuses_qkv_and_gate_up_again(pairs, name):
    """Our separate q/k/v and gate/up params are written back as HF's fused tensors, bitwise."""
    hf, lm = pairs(name)
    assert set(lm.params["model"]["layers"]["self_attn"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    tensors = models.params_to_hf(lm.params, lm.config)
    tied = lm.config.tie_word_embeddings
    expected = {k: v.numpy() for k, v in hf.state_dict().items() if not (tied and k == "lm_head.weight")}
    assert set(tensors) == set(expected) and "model.layers.0.self_attn.qkv_proj.weight" in tensors
    for key, value in expected.items():
        np.testing.assert_array_equal(tensors[key], value, err_msg=key)


def test_ours_with_llamas_rotation_would_differ(pairs):
    """The partial rotation matters: the same weights with every dim rotated give other logits than HF's."""
    hf, lm = pairs("phi3_partial")
    x = PHI3.batch(1)
    full = phi3.Model(dataclasses.replace(lm.config, partial_rotary_factor=1.0, rope_short_factor=(1.0,) * 4))
    ref = PHI3.reference(hf, x)
    assert max_abs_diff(lm.model.apply({"params": lm.params}, x.ours()), ref, x.valid) < F32_ATOL
    assert max_abs_diff(full.apply({"params": lm.params}, x.ours()), ref, x.valid) > 1e-2


@pytest.mark.parametrize("fields, field", [
    (dict(rope_parameters=dict(rope_type="linear", rope_theta=500.0, factor=2.0)), "rope_type"),
    (dict(rope_parameters=dict(rope_type="default", rope_theta=500.0, mrope_section=[2, 2])), "mrope_section"),
    (dict(resid_pdrop=0.1), "resid_pdrop"),
    (dict(embd_pdrop=0.1), "embd_pdrop"),
    (dict(rope_parameters=dict(rope_type="default", rope_theta=500.0, partial_rotary_factor=0.375)),
     "partial_rotary_factor"),
    (dict(hidden_act="bogus"), "hidden_act"),
])
def test_unsupported_options_are_clear_errors(fields, field):
    cfg = hf_config("phi3")
    for key, value in fields.items():
        object.__setattr__(cfg, key, value)
    with pytest.raises(ValueError, match=field):
        phi3.Config.from_hf(cfg, set())


def test_a_partial_rotary_gguf_loads_as_its_safetensors(tmp_path):
    """llama.cpp's phi3 files: fused attn_qkv / ffn_up, the rotary dims in rope.dimension_count (transformers' own
    GGUF loader drops them, so it is not the reference here: the safetensors of the same model are)."""
    hf = random_tiny("phi3", sliding_window=None, rope_parameters=dict(rope_type="default", rope_theta=500.0,
                                                                      partial_rotary_factor=0.75))
    path = write_gguf(hf, tmp_path / "phi3.gguf", "F32")
    from_gguf, from_safetensors = load_pretrained(str(path)), load_pretrained(str(save_tiny(hf, tmp_path / "hf")))
    assert (from_gguf.config.rotary_dim, from_gguf.config.sliding_window) == (6, None)
    x = PHI3.batch(5)
    ours = from_gguf.model.apply({"params": from_gguf.params}, x.ours())
    assert max_abs_diff(ours, PHI3.reference(hf, x), x.valid) < F32_ATOL
    assert max_abs_diff(ours, from_safetensors.model.apply({"params": from_safetensors.params}, x.ours())) == 0


def test_a_longrope_gguf_is_refused_by_name(tmp_path):
    import gguf
    from prefix_jax.models import gguf_checkpoint

    path = write_gguf(random_tiny("phi3"), tmp_path / "phi3.gguf", "F32")
    reader = gguf.GGUFReader(str(path))
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    shapes["rope_factors_short.weight"] = (3,)
    with pytest.raises(gguf_checkpoint.GGUFError, match="rope_factors_short/long.weight .*longrope"):
        gguf_checkpoint.hf_config(gguf_checkpoint.metadata(reader, vocabulary=False), shapes, path)
