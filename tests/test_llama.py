"""Llama-family decoders (Llama, Mistral, Qwen2, Qwen3) beyond the shared contract (test_architectures.py):
configs read per variant, RoPE, the real-word init, greedy decoding == teacher forcing, export, sharded and
bfloat16 checkpoints, refused options, the sliding window, and train.py on the tiny Llama.

Tiny random checkpoints (families.LLAMA_VARIANTS; float32, eager attention) cover grouped-query attention
(4 query / 2 K/V heads), an explicit head_dim != hidden / heads, llama3 and linear rope scaling, tied and untied
heads, q/k/v (and output) biases, Qwen3's q/k norms and a Mistral sliding window.
"""

from __future__ import annotations

import copy
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from families import (FAMILY, LLAMA_EOS as EOS, LLAMA_VARIANTS as VARIANTS, left_padded, left_padded_generation_sources,
                      llama_config as hf_config)
from hf_fixtures import max_abs_diff, random_kv as _random_kv
from helpers import REPO, run_cli
from tolerances import F32_ATOL

from prefix_jax import prefix as prefix_lib
from prefix_jax import prefix_init
from prefix_jax.data import pad
from prefix_jax.generate import GenerationConfig
from prefix_jax.models import DECODER, KV, NO_PREFIX, Prefix, llama, load_pretrained, params_to_hf

LLAMA = FAMILY["llama"]
B, S, T, P = dataclasses.astuple(LLAMA.sizes)
VOCAB = LLAMA.vocab
random_kv = functools.partial(_random_kv, length=P)
with_prefix_mask = LLAMA.with_prefix_mask

@pytest.fixture
def pairs(tiny_hf):
    """name -> (HF model, our PretrainedLM), built once per session."""
    return lambda name: tiny_hf("llama", name)

def random_batch(seed: int = 0) -> dict[str, np.ndarray]:
    """Right-padded, ragged sources and targets (pads are id 0)."""
    return LLAMA.batch(seed).batch

def jnp_batch(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v) for k, v in batch.items()}

def run(lm, batch, prefix=NO_PREFIX, config=None):
    model = lm.model if config is None else llama.Model(config)
    return model.apply({"params": lm.params}, jnp_batch(batch), prefix)

def test_configs_are_read_as_the_variants_say(pairs):
    expect = {  # (query heads, K/V heads, head_dim, qkv bias, o bias, q/k norm, tied, rope type, window)
        "llama": (4, 2, 16, True, True, False, False, "llama3", None),
        "llama_tied": (4, 4, 8, False, False, False, True, "linear", None),
        "mistral": (4, 2, 8, False, False, False, False, "default", 64),
        "qwen2": (4, 2, 8, True, False, False, True, "default", None),
        "qwen3": (4, 2, 16, False, False, True, False, "default", None),
    }
    for name, want in expect.items():
        c = pairs(name)[1].config
        got = (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.qkv_bias, c.o_bias, c.qk_norm,
               c.tie_word_embeddings, c.rope_type, c.sliding_window)
        assert got == want, name
        assert c.architecture == VARIANTS[name][0].lower()
        geometry = c.prefix_geometry()[DECODER]  # a prefix holds K/V heads (GQA), not query heads
        assert (geometry.num_heads, geometry.head_dim) == (c.num_key_value_heads, c.head_dim), name

def rotate_keys(key_LxNxPxK: jax.Array, cfg: llama.Config, shift: int) -> jax.Array:
    """Keys rotated as if moved by `shift` positions."""
    cos, sin = llama.rope_tables(cfg, jnp.full((1, 1), shift, jnp.int32))
    return jax.vmap(lambda k_NxPxK: llama.rotate(jnp.swapaxes(k_NxPxK, 0, 1)[None], cos, sin)[0].swapaxes(0, 1))(
        key_LxNxPxK)

@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_rope_tokens_at_p_equal_tokens_at_zero_with_keys_rotated_back(pairs, name):
    """RoPE is relative: tokens at P..P+S-1 with prefix keys K == tokens at 0.. with keys rotated by -P."""
    _, lm = pairs(name)
    batch = left_padded(random_batch(30))
    kv = random_kv(lm.config.prefix_geometry()[DECODER], 31)[0]
    at_p = run(lm, batch, Prefix(kv={DECODER: kv}))
    from_zero = dataclasses.replace(lm.config, positions_after_prefix=False)
    back = KV(rotate_keys(kv.key, lm.config, -P), kv.value)
    assert max_abs_diff(run(lm, batch, Prefix(kv={DECODER: back}), from_zero), at_p, batch["target_mask"]) < F32_ATOL
    # Not a tautology: unrotated keys at 0.. give other logits.
    assert max_abs_diff(run(lm, batch, Prefix(kv={DECODER: kv}), from_zero), at_p, batch["target_mask"]) > 1e-3

@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_words_init_is_the_text_in_the_input(pairs, name):
    """`prefix.init="words"`: the LM's post-rotation K/V of a text at 0..P-1; with it, logits == LM on [text; x]."""
    hf, lm = pairs(name)
    text = [7, 3, 11, 40]
    spec = prefix_lib.PrefixSpec(length=len(text), placements=(DECODER,), geometry=lm.config.prefix_geometry(),
                                 hidden_size=32, method="prefix_direct", init="words")
    params, _ = prefix_init.init_from_text(spec, prefix_lib.init_params(spec, jax.random.PRNGKey(0)), lm.model,
                                           lm.params, text)
    kv = prefix_lib.materialize(params, spec).kv[DECODER]
    with torch.no_grad():  # HF's own cache of the text: what its attention stores, after rotation
        cache = hf(input_ids=torch.tensor([text]), use_cache=True).cache
    for layer in range(2):
        np.testing.assert_allclose(kv.key[layer], cache.layers[layer].keys[0].numpy(), atol=F32_ATOL)
        np.testing.assert_allclose(kv.value[layer], cache.layers[layer].values[0].numpy(), atol=F32_ATOL)
    batch = left_padded(random_batch(32))
    rows = [[*text, *ids[m == 1]] for ids, m in zip(batch["source_ids"], batch["source_mask"])]
    source_ids, source_mask = pad(rows, len(text) + S, 0, left=True)
    written = dict(batch, source_ids=source_ids, source_mask=source_mask)
    ours = run(lm, batch, Prefix(kv={DECODER: kv}))
    assert max_abs_diff(ours, run(lm, written), batch["target_mask"]) < F32_ATOL

@pytest.fixture
def generating(eos_steered):
    """The contract's generation model (families.FAMILY["llama"].generate): hypotheses end at various steps."""
    return eos_steered("llama", "llama")

def generation_sources():
    return left_padded_generation_sources(B, S, VOCAB)

@pytest.mark.parametrize("kind", ["infix", "embedding_only"])
def test_greedy_generation_is_the_argmax_of_teacher_forcing(generating, kind):
    """For placements HF cannot take as a cache: each decoded token is what our full model predicts there."""
    from prefix_jax.generate import generate

    _, lm = generating
    src, mask = (x.numpy() for x in generation_sources())
    if kind == "infix":
        prefix = Prefix(kv={DECODER: random_kv(lm.config.prefix_geometry()[DECODER], 25)[0]}, infix=True)
    else:
        prefix = Prefix(prompt_embeds=jnp.asarray(np.random.default_rng(26).normal(size=(P, 32)), jnp.float32))
    tokens = np.asarray(generate(lm.model, lm.params, prefix, jnp.asarray(src), jnp.asarray(mask),
                                 GenerationConfig(max_new_tokens=T)))
    valid = (np.cumsum(tokens == EOS, axis=1) - (tokens == EOS)) == 0
    batch = dict(source_ids=src, source_mask=mask, target_ids=tokens, target_mask=valid.astype(np.int32))
    forced = np.asarray(run(lm, batch, prefix)).argmax(-1)
    np.testing.assert_array_equal(forced[valid], tokens[valid])

def test_infix_hides_kv_from_source_and_shifts_target(pairs):
    _, lm = pairs("llama")
    model, params = lm.model, {"params": lm.params}
    batch = jnp_batch(left_padded(random_batch(13)))
    geometry = lm.config.prefix_geometry()[DECODER]
    kv_a, kv_b = random_kv(geometry, 14)[0], random_kv(geometry, 15)[0]
    hidden = lambda prefix: model.apply(params, batch, prefix, method=model.hidden_states)
    h_a, start = hidden(Prefix(kv={DECODER: kv_a}, infix=True))
    h_b, _ = hidden(Prefix(kv={DECODER: kv_b}, infix=True))
    h_none, _ = hidden(Prefix())
    assert start == S
    assert max_abs_diff(h_a[:, :S], h_b[:, :S], batch["source_mask"]) < 1e-6
    assert max_abs_diff(h_a[:, :S], h_none[:, :S], batch["source_mask"]) < F32_ATOL
    assert max_abs_diff(h_a[:, S:], h_b[:, S:], batch["target_mask"]) > 1e-2

@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_checkpoint_round_trip(pairs, name):
    hf, lm = pairs(name)
    tensors = params_to_hf(lm.params, lm.config)
    expected = {k: v.numpy() for k, v in hf.state_dict().items()
                if not (lm.config.tie_word_embeddings and k == "lm_head.weight")}
    assert set(tensors) == set(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(tensors[key], value, err_msg=key)

def test_sharded_bfloat16_checkpoint_loads(pairs, tmp_path):
    hf, lm32 = pairs("qwen3")
    copy.deepcopy(hf).to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="40KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    lm16 = load_pretrained(str(tmp_path), param_dtype="bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(lm16.params))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b, jnp.bfloat16)), lm16.params, lm32.params)
    batch = random_batch(40)
    ours16 = run(lm16, batch)
    assert max_abs_diff(ours16.astype(jnp.float32), run(lm32, batch), batch["target_mask"]) < 0.2

@pytest.mark.parametrize("name, fields, field", [
    ("llama", dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=2.0)), "rope_type"),
    ("llama", dict(rope_parameters=dict(rope_type="dynamic", rope_theta=1e4, factor=2.0)), "rope_type"),
    ("llama", dict(rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.5)),
     "partial_rotary_factor"),
    ("llama", dict(hidden_act="bogus_act"), "hidden_act"),
    ("qwen2", dict(layer_types=["full_attention", "chunked_attention"]), "layer_types"),
    ("qwen3", dict(quantization_config={"quant_method": "awq", "bits": 4}), "quantization_config"),
])
def test_unsupported_options_are_clear_errors(name, fields, field):
    cfg = hf_config(name)
    for key, value in fields.items():  # set after construction: transformers itself may refuse some of them
        object.__setattr__(cfg, key, value)
    with pytest.raises(ValueError, match=field):
        llama.Config.from_hf(cfg, set())

def test_sliding_window_is_read_and_refused_when_exceeded(pairs):
    assert llama.Config.from_hf(hf_config("qwen2", use_sliding_window=True, sliding_window=24,
                                          max_window_layers=1), set()).sliding_window == 24
    assert llama.Config.from_hf(hf_config("qwen2", sliding_window=24), set()).sliding_window is None  # unused
    _, lm = pairs("mistral")
    batch = random_batch(41)
    kv = random_kv(lm.config.prefix_geometry()[DECODER], 42)[0]
    narrow = dataclasses.replace(lm.config, sliding_window=S + T + P - 1)  # the longest key span is P + S + T
    assert narrow.max_positions == S + T + P - 1  # what the trainer checks before training
    with pytest.raises(ValueError, match="sliding_window"):
        run(lm, batch, Prefix(kv={DECODER: kv}), narrow)
    exact = dataclasses.replace(lm.config, sliding_window=S + T + P)
    assert max_abs_diff(run(lm, batch, Prefix(kv={DECODER: kv}), exact), run(lm, batch, Prefix(kv={DECODER: kv})),
                        batch["target_mask"]) == 0.0

@pytest.mark.slow
def test_tiny_llama_checkpoint_matches_transformers(tiny_llama_dir):
    directory = tiny_llama_dir
    lm = load_pretrained(str(directory))
    hf = transformers.LlamaForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    assert (lm.config.num_attention_heads, lm.config.num_key_value_heads) == (4, 2)
    ids = torch.randint(3, 500, (2, 7), generator=torch.Generator().manual_seed(0))
    ids[:, 4] = lm.config.separator_token_id
    batch = {"source_ids": ids[:, :4].numpy(), "source_mask": np.ones((2, 4), np.int32),
             "target_ids": ids[:, 5:].numpy(), "target_mask": np.ones((2, 2), np.int32)}
    with torch.no_grad():
        ref = hf(input_ids=ids).logits[:, 4:6].numpy()
    ours = run(lm, batch)
    assert max_abs_diff(ours, ref) < F32_ATOL and np.abs(ref).std() > 0.3  # unit-scale logits: a prefix can steer them

def offline_args(model_dir, workdir, *extra: str) -> list[str]:
    """train.py flags: configs/llama_offline.py on a few examples, a few steps."""
    return ["--config", str(REPO / "configs/llama_offline.py"), f"--config.model.name_or_path={model_dir}",
            "--config.model.create_tiny=", f"--config.train.workdir={workdir}", "--config.train.steps=4",
            "--config.train.batch_size=4", "--config.train.log_every=1", "--config.train.save_every=2",
            "--config.optim.warmup_steps=1", "--config.data.max_train_examples=32", "--config.data.max_eval_examples=8",
            "--config.data.max_source_length=32", "--config.data.max_target_length=16",
            "--config.eval.max_generate=4", "--config.generate.max_new_tokens=6", *extra]

@pytest.mark.slow
def test_words_init_prefix_trains_and_exports_in_process(tiny_llama_dir, tmp_path):
    from configs import llama_offline
    from prefix_jax import trainer
    from prefix_jax.metrics_file import read_metrics

    c = llama_offline.get_config()
    c.model.name_or_path, c.model.create_tiny = str(tiny_llama_dir), ""
    c.data.max_train_examples, c.data.max_eval_examples = 16, 4
    c.data.max_source_length, c.data.max_target_length = 32, 16
    c.prefix.length, c.prefix.init, c.prefix.init_text, c.prefix.init_fit_steps = 0, "words", "table-to-text:", 10
    c.eval.generate = False
    c.train.workdir, c.train.steps, c.train.batch_size, c.train.log_every = str(tmp_path), 2, 4, 1
    c.optim.warmup_steps = 1
    summary = trainer.run(c)
    assert summary["final_step"] == 2 and np.isfinite(summary["eval_loss"])
    assert [row["step"] for row in read_metrics(tmp_path) if "loss" in row] == [1, 2]
    exported, meta = prefix_lib.load_export(summary["export"])
    assert meta["architecture"] == "llama"
    assert exported.kv[DECODER].key.shape == (2, 2, 6, 16)  # [layers, K/V heads, "table-to-text:" tokens, head_dim]

@pytest.mark.slow
def test_train_py_checkpoints_resumes_and_exports(tiny_llama_dir, tmp_path):
    """`train.py --config configs/llama_offline.py`: stopped at step 2 and resumed == run straight to step 4."""
    from prefix_jax.metrics_file import read_metrics

    straight = run_cli(*offline_args(tiny_llama_dir, tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-2000:]
    first = run_cli(*offline_args(tiny_llama_dir, tmp_path / "resumed", "--config.train.stop_at=2"))
    assert first.returncode == 0, first.stderr[-2000:]
    assert not (tmp_path / "resumed" / "export").exists()
    second = run_cli(*offline_args(tiny_llama_dir, tmp_path / "resumed"))
    assert second.returncode == 0, second.stderr[-2000:]
    losses = lambda d: {row["step"]: row["loss"] for row in read_metrics(d) if "loss" in row}
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed") and sorted(losses(tmp_path / "resumed")) == [
        1, 2, 3, 4]
    for run_dir in ("straight", "resumed"):
        assert (tmp_path / run_dir / "export" / "prefix.safetensors").is_file()
        assert list((tmp_path / run_dir).glob("predictions_validation_4.jsonl"))
    a, _ = prefix_lib.load_export(tmp_path / "straight" / "export")
    b, _ = prefix_lib.load_export(tmp_path / "resumed" / "export")
    np.testing.assert_array_equal(a.kv[DECODER].key, b.kv[DECODER].key)

