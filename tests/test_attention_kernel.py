"""`model.attention_kernel`: "jax" (`jax.nn.dot_product_attention`, which is XLA's attention on this CPU) computes
what "einsum" computes, for every architecture, with a prefix, a prefix bank, padding, T5's bias and GQA, in
training and decoding; "cudnn" fails at setup where there is no cuDNN; the config value reaches the model."""

from __future__ import annotations

import contextlib
import functools
import importlib
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from tolerances import BF16_LOGITS_RTOL, F32_ATOL, F32_REORDERED_RTOL

from prefix_jax import models, prefix_bank, run_options, train_steps, trainer
from prefix_jax import prefix as prefix_lib
from prefix_jax.config_checks import ConfigError
from prefix_jax.generate import GenerationConfig, make_generate_fn
from prefix_jax.models import KV, Prefix, fused_attention
from prefix_jax.models.attention import attend
from prefix_jax.models.prefix_contract import BankKV
from prefix_jax.models.fused_attention import AttentionKernelError

REPO = Path(__file__).resolve().parent.parent
VOCAB, B, S, T, P = 64, 4, 9, 6, 3
ARCHITECTURES = ("gpt2", "t5", "bart", "llama")
on_gpu = jax.default_backend() == "gpu"


def hf_config(architecture: str):
    """Tiny random configs; T5 with its relative bias, Llama with grouped-query attention (4 heads, 2 KV heads)."""
    ids = dict(vocab_size=VOCAB, pad_token_id=0, eos_token_id=1)
    if architecture == "t5":
        return transformers.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0,
                                     relative_attention_num_buckets=8, decoder_start_token_id=0, **ids)
    if architecture == "bart":
        return transformers.BartConfig(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                       decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                       max_position_embeddings=64, bos_token_id=2, decoder_start_token_id=2, **ids)
    if architecture == "gpt2":
        return transformers.GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, **ids)
    return transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, **ids)


def build(architecture: str, kernel: str, **overrides):
    arch = models.architecture(architecture)
    config = arch.Config.from_hf(hf_config(architecture), set(), attention_kernel=kernel, **overrides)
    return config, arch.Model(config)


def ragged_batch(seed: int = 0) -> dict:
    """Padded rows (one source of a single token, one target of a single token)."""
    rng = np.random.default_rng(seed)
    source_len, target_len = np.array([S, 1, 6, 4]), np.array([T, 3, 1, 5])
    return {"source_ids": jnp.asarray(rng.integers(3, VOCAB, (B, S)), jnp.int32),
            "source_mask": jnp.asarray(np.arange(S)[None] < source_len[:, None], jnp.int32),
            "target_ids": jnp.asarray(rng.integers(3, VOCAB, (B, T)), jnp.int32),
            "target_mask": jnp.asarray(np.arange(T)[None] < target_len[:, None], jnp.int32)}


@functools.cache
def lm(architecture: str):
    """(config, lm params, prefix spec, prefix params), shared by both kernels."""
    config, model = build(architecture, "einsum")
    params = jax.jit(model.init)(jax.random.PRNGKey(0), ragged_batch())["params"]
    geometry = config.prefix_geometry()
    spec = prefix_lib.PrefixSpec(length=P, placements=tuple(geometry), geometry=geometry,
                                 hidden_size=config.hidden_size, mlp_hidden=16)
    return config, params, spec, prefix_lib.init_params(spec, jax.random.PRNGKey(1))


@contextlib.contextmanager
def counting_fused_calls(monkeypatch):
    """Counts traces of `fused_attention.attend` (the "jax"/"cudnn" path) while the block runs."""
    calls = []
    real = fused_attention.attend

    def spy(*args, **kwargs):
        calls.append(args[6] if len(args) > 6 else kwargs["kernel"])
        return real(*args, **kwargs)

    monkeypatch.setattr(fused_attention, "attend", spy)
    yield calls


def assert_close_to(reference, got, what: str, valid=None) -> float:
    """`got` equals `reference` to float32 reordering (relative to the largest entry); both free of NaN/inf."""
    reference, got = np.asarray(reference), np.asarray(got)
    assert np.isfinite(got).all() and np.isfinite(reference).all(), what
    if valid is not None:
        reference, got = reference[valid], got[valid]
    scale = float(np.abs(reference).max())
    np.testing.assert_allclose(got, reference, rtol=F32_REORDERED_RTOL, atol=max(F32_REORDERED_RTOL * scale, 1e-7),
                               err_msg=what)
    return float(np.abs(got - reference).max())


# --- One attention call: every input it takes ---


def attention_inputs(seed: int = 0, num_queries: int = 5, prefix_len: int = 3, keys: int = 6):
    rng = np.random.default_rng(seed)
    batch, heads, kv_heads, dim = 3, 4, 2, 8
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    mask = rng.random((batch, 1, num_queries, prefix_len + keys)) > 0.3
    mask[0, 0, min(1, num_queries - 1)] = False  # a query that sees nothing at all
    return dict(q=normal(batch, num_queries, heads, dim), k=normal(batch, keys, kv_heads, dim),
                v=normal(batch, keys, kv_heads, dim), mask=jnp.asarray(mask),
                bias=normal(1, heads, num_queries, prefix_len + keys),
                prefix_key=normal(kv_heads, prefix_len, dim), prefix_value=normal(kv_heads, prefix_len, dim))


def bank_of(inputs: dict) -> BankKV:
    """Two prefixes for three rows: prefix 1 has its first slot empty; row 2 uses a prefix whose slots are all empty."""
    key = jnp.stack([inputs["prefix_key"], inputs["prefix_key"][::-1] * 0.5])
    value = jnp.stack([inputs["prefix_value"], -inputs["prefix_value"]])
    valid = jnp.asarray([[False, True, True], [False, False, False]])
    return BankKV(key, value, valid, jnp.asarray([0, 1, 1]))


@pytest.mark.parametrize("prefix_kind", ["shared", "bank", "none"])
@pytest.mark.parametrize("scale", [1.0, 8**-0.5])
def test_one_call_equals_einsum_with_gqa_bias_mask_and_prefix(prefix_kind, scale):
    """Outputs and the gradients w.r.t. queries, keys, values, bias and prefix; a fully masked query row and a bank row
    with no real slot give finite values (uniform attention), as on the einsum path."""
    inputs = attention_inputs()
    prefix_len = 0 if prefix_kind == "none" else 3
    if prefix_kind == "none":
        inputs = attention_inputs(prefix_len=0)

    def run(kernel, q, k, v, bias, prefix_key, prefix_value):
        prefix = {"shared": KV(prefix_key, prefix_value), "none": None,
                  "bank": bank_of({"prefix_key": prefix_key, "prefix_value": prefix_value})}[prefix_kind]
        return attend(q, k, v, inputs["mask"], bias, scale, prefix=prefix, kernel=kernel)

    names = ("q", "k", "v", "bias", "prefix key", "prefix value")[:6 if prefix_len else 4]
    args = [inputs[n] for n in ("q", "k", "v", "bias", "prefix_key", "prefix_value")]
    for kernel in ("einsum", "jax"):
        out = jax.jit(functools.partial(run, kernel))(*args)
        grads = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(run(kernel, *a))), argnums=tuple(range(len(names)))))(
            *args)
        if kernel == "einsum":
            reference = (out, grads)
            continue
        assert_close_to(reference[0], out, "output")
        for name, ref, got in zip(names, reference[1], grads):
            assert_close_to(ref, got, f"d/d {name}")
    assert prefix_len == 0 or float(jnp.abs(grads[4]).max()) > 0  # the prefix is really read


@pytest.mark.parametrize("num_queries,keys", [(5, 6), (4, 6), (1, 7)])
def test_cudnn_call_is_given_what_cudnn_accepts(num_queries, keys, monkeypatch):
    """The "cudnn" wrapper, run here by XLA: mask and bias over the full [Q, M] and, where a length is odd, one extra
    query (dropped) or masked key, as cuDNN requires with a bias in training; the result equals einsum's.

    Except for a query row that sees no key (a pad query): uniform over the keys and the extra one, instead of the
    keys only. No real token reads such a row (pads are masked as keys), so it is left out of the loss here."""
    inputs = attention_inputs(num_queries=num_queries, keys=keys)
    seen = []
    real = jax.nn.dot_product_attention

    def xla_standing_in_for_cudnn(q, k, v, bias=None, mask=None, *, scale, implementation):
        assert implementation == "cudnn"
        seen.append((q.shape[1], k.shape[1], bias.shape[2:], mask.shape[2:]))
        assert q.shape[1] % 2 == 0 and k.shape[1] % 2 == 0 and bias.shape[2:] == mask.shape[2:] == (q.shape[1],
                                                                                                   k.shape[1])
        return real(q, k, v, bias=bias, mask=mask, scale=scale, implementation="xla")

    monkeypatch.setattr(fused_attention.jax.nn, "dot_product_attention", xla_standing_in_for_cudnn)
    bias = inputs["bias"][:, :, :1]  # broadcast over the queries

    def run(kernel, q, k, v, prefix_key, prefix_value):
        prefix = bank_of({"prefix_key": prefix_key, "prefix_value": prefix_value})
        return attend(q, k, v, inputs["mask"], bias, 0.5, prefix=prefix, kernel=kernel)

    args = [inputs[n] for n in ("q", "k", "v", "prefix_key", "prefix_value")]
    bank = bank_of(inputs)
    valid_prefix_BxP = bank.slot_valid[bank.rows]
    sees_a_key_BxQ = ((inputs["mask"][:, 0, :, :3] & valid_prefix_BxP[:, None]).any(-1)
                      | inputs["mask"][:, 0, :, 3:].any(-1))
    assert not bool(sees_a_key_BxQ.all())
    weight_BxQx1x1 = sees_a_key_BxQ[..., None, None]
    loss = lambda kernel: jax.jit(jax.value_and_grad(lambda *a: jnp.sum(jnp.sin(run(kernel, *a)) * weight_BxQx1x1),
                                                     argnums=(0, 1, 2, 3, 4)))
    (ref_loss, ref_grads), (got_loss, got_grads) = loss("einsum")(*args), loss("cudnn")(*args)
    assert seen and seen[0][0] == num_queries + num_queries % 2 and seen[0][1] == 3 + keys + (3 + keys) % 2
    np.testing.assert_allclose(got_loss, ref_loss, rtol=F32_REORDERED_RTOL)
    for name, ref, got in zip(("q", "k", "v", "prefix key", "prefix value"), ref_grads, got_grads):
        assert_close_to(ref, got, f"d/d {name}")


def test_attention_dropout_in_training_uses_the_einsum_path(monkeypatch):
    """`jax.nn.dot_product_attention` has no dropout: with dropout active the call takes the einsum path."""
    import flax.linen as nn

    inputs = attention_inputs()
    dropout = nn.Dropout(0.5)
    call = lambda deterministic: jax.eval_shape(lambda: nn.apply(
        lambda m: attend(inputs["q"], inputs["k"], inputs["v"], inputs["mask"], None, 0.3, m, deterministic,
                         KV(inputs["prefix_key"], inputs["prefix_value"]), "jax"), dropout)(
        {}, rngs={"dropout": jax.random.PRNGKey(0)}))
    with counting_fused_calls(monkeypatch) as calls:
        call(False)
        assert calls == []
        call(True)
        assert calls == ["jax"]


# --- Whole models ---


@pytest.mark.parametrize("architecture", [  # default: llama; t5 and bart: the same shell + bias
    "llama", pytest.param("t5", marks=pytest.mark.slow), pytest.param("gpt2", marks=pytest.mark.slow),
    pytest.param("bart", marks=pytest.mark.slow)])
def test_logits_and_prefix_gradients_equal_einsum(architecture, monkeypatch):
    """Teacher-forced logits (padded rows included: no NaN anywhere) and the loss gradient w.r.t. the prefix
    parameters (MLP reparameterization, every placement the model has)."""
    _, lm_params, spec, params = lm(architecture)
    data = ragged_batch(1)
    results = {}
    for kernel in ("einsum", "jax"):
        _, model = build(architecture, kernel)

        def mean_loss(p):
            logits = model.apply({"params": lm_params}, data, prefix_lib.materialize(p, spec))
            total, count = train_steps.batch_loss(model, spec, p, lm_params, data, None)
            return total / count, logits

        with counting_fused_calls(monkeypatch) as calls:
            results[kernel] = jax.jit(jax.value_and_grad(mean_loss, has_aux=True))(params)
        assert bool(calls) == (kernel == "jax")
    ((loss, logits), grads), ((fused_loss, fused_logits), fused_grads) = results["einsum"], results["jax"]
    valid = np.asarray(data["target_mask"], bool)
    assert np.isfinite(np.asarray(fused_logits)).all()  # pad positions too
    diffs = {"logits": assert_close_to(logits, fused_logits, "logits", valid)}
    np.testing.assert_allclose(fused_loss, loss, rtol=F32_REORDERED_RTOL)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    for (path, ref), got in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(fused_grads)):
        diffs[jax.tree_util.keystr(path)] = assert_close_to(ref, got, jax.tree_util.keystr(path))
    print(architecture, "max |jax - einsum|:", {k: f"{v:.2g}" for k, v in diffs.items()})


def random_prefix(config, seed: int, length: int) -> Prefix:
    rng = np.random.default_rng(seed)
    kv = {}
    for placement, g in config.prefix_geometry().items():
        shape = (g.num_layers, g.num_heads, length, g.head_dim)
        kv[placement] = KV(*(jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(2)))
    return Prefix(kv=kv)


@pytest.mark.parametrize("architecture", [  # default: llama; bias + bank: the one-call test
    "llama", pytest.param("t5", marks=pytest.mark.slow), pytest.param("gpt2", marks=pytest.mark.slow),
    pytest.param("bart", marks=pytest.mark.slow)])
def test_prefix_bank_logits_equal_einsum(architecture):
    """Rows using prefixes of lengths 1, 3 and 2 (empty slots masked per row), padded rows among them."""
    config, lm_params, _, _ = lm(architecture)
    bank = prefix_bank.for_rows(prefix_bank.stack([random_prefix(config, i, n) for i, n in enumerate((1, 3, 2))]),
                                jnp.asarray([0, 2, 1, 0]))
    data = ragged_batch(2)
    logits = {k: np.asarray(jax.jit(build(architecture, k)[1].apply)({"params": lm_params}, data, bank))
              for k in ("einsum", "jax")}
    assert np.isfinite(logits["jax"]).all()
    valid = np.asarray(data["target_mask"], bool)
    np.testing.assert_allclose(logits["jax"][valid], logits["einsum"][valid], rtol=F32_REORDERED_RTOL, atol=F32_ATOL)


@pytest.mark.parametrize("architecture,beams", [("llama", 3),  # the same while-loop as the slow ones
                                                pytest.param("gpt2", 1, marks=pytest.mark.slow),
                                                pytest.param("t5", 3, marks=pytest.mark.slow),
                                                pytest.param("bart", 3, marks=pytest.mark.slow),
                                                pytest.param("gpt2", 3, marks=pytest.mark.slow),
                                                pytest.param("llama", 1, marks=pytest.mark.slow)])
def test_decoding_gives_the_same_tokens(architecture, beams, monkeypatch):
    """Greedy / beam search with a prefix (cache: one query per step, unwritten slots masked): identical tokens."""
    config, lm_params, _, _ = lm(architecture)
    lm_params = jax.tree.map(lambda x: x * 3.0 if x.ndim >= 2 else x, lm_params)  # so rows decode differently
    prefix = random_prefix(config, 5, P)
    data = ragged_batch(3)
    tokens = {}
    for kernel in ("einsum", "jax"):
        generate = make_generate_fn(build(architecture, kernel)[1], GenerationConfig(max_new_tokens=6, num_beams=beams))
        with counting_fused_calls(monkeypatch) as calls:
            tokens[kernel] = np.asarray(generate(lm_params, prefix, data["source_ids"], data["source_mask"]))
        assert bool(calls) == (kernel == "jax")
    np.testing.assert_array_equal(tokens["jax"], tokens["einsum"])
    assert len({tuple(row) for row in tokens["jax"]}) > 1  # rows really decode differently


# --- Setup: the value is checked, and reaches the model ---


@pytest.mark.skipif(on_gpu, reason="a GPU with cuDNN runs it")
def test_cudnn_without_cudnn_fails_at_setup_in_one_line():
    for architecture in ARCHITECTURES:
        with pytest.raises(AttentionKernelError) as error:
            build(architecture, "cudnn", dtype="bfloat16")
        message = str(error.value)
        assert "model.attention_kernel='cudnn'" in message and "'jax'" in message and "\n" not in message
        assert "backend here is 'cpu'" in message
    with pytest.raises(AttentionKernelError, match=r"model.compute_dtype 'bfloat16'.*float32"):
        build("gpt2", "cudnn")  # float32 compute: cuDNN's kernel takes bf16/fp16 only


def test_an_unknown_kernel_is_a_one_line_error_naming_the_field():
    with pytest.raises(AttentionKernelError, match=r"^model.attention_kernel='flash' is not an attention kernel"):
        build("t5", "flash")
    config = importlib.import_module("configs.t5_offline").get_config()
    config.model.attention_kernel = "flash"
    with pytest.raises(ConfigError, match=r"^model.attention_kernel='flash' is invalid: it must be one of"):
        run_options.from_config(config)
    out = subprocess.run([sys.executable, "train.py", "--config", "configs/t5_offline.py",
                          "--config.model.attention_kernel=flash", "--config.train.workdir=/nonexistent/never"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: model.attention_kernel='flash' is invalid")


def tiny_run_config(tiny_gpt2_dir, workdir: Path, kernel: str):
    config = importlib.import_module("configs.gpt2_e2e_offline").get_config()
    config.model.name_or_path, config.model.create_tiny = str(tiny_gpt2_dir), ""
    config.model.attention_kernel = kernel
    config.data.max_source_length, config.data.max_target_length = 32, 16
    config.data.max_train_examples, config.data.max_eval_examples = 8, 4
    config.prefix.length, config.prefix.mlp_hidden = 2, 8
    config.data.eval_split, config.eval.generate, config.optim.warmup_steps = "", False, 0
    config.train.workdir, config.train.batch_size, config.train.steps = str(workdir), 4, 2
    return config


def test_the_config_value_reaches_the_training_step(tiny_gpt2_dir, tmp_path, monkeypatch):
    with counting_fused_calls(monkeypatch) as calls:
        summary = trainer.run(tiny_run_config(tiny_gpt2_dir, tmp_path / "run", "jax"))
    assert summary["final_step"] == 2 and calls and set(calls) == {"jax"}


@pytest.mark.skipif(on_gpu, reason="a GPU with cuDNN runs it")
def test_cudnn_run_stops_before_training(tiny_gpt2_dir, tmp_path, monkeypatch):
    config = tiny_run_config(tiny_gpt2_dir, tmp_path / "run", "cudnn")
    config.model.compute_dtype = "bfloat16"
    with counting_fused_calls(monkeypatch) as calls, pytest.raises(AttentionKernelError, match="attention_kernel"):
        trainer.run(config)
    assert calls == [] and not list((tmp_path / "run").glob("**/checkpoints/*"))


def test_accelerator_rows_carry_the_kernel_into_the_model_config(monkeypatch):
    sys.path.insert(0, str(REPO / "benchmarks"))
    accelerator = importlib.import_module("accelerator")
    kernels = {(row.name, row.attention_kernel) for row in accelerator.FULL}
    assert {("t5-base", "jax"), ("llama-1b", "jax")} <= kernels
    assert all(not row.peft for row in accelerator.FULL if row.attention_kernel != "einsum")
    seen = []

    class Built(Exception):
        pass

    def recording_from_hf(hf, names, **overrides):
        seen.append(overrides.get("attention_kernel"))
        raise Built  # stop before building anything

    monkeypatch.setattr(models.architecture("gpt2").Config, "from_hf", staticmethod(recording_from_hf))
    row = accelerator.dataclasses.replace(accelerator.SMOKE[0], attention_kernel="jax")
    with pytest.raises(Built):
        accelerator.run_ours(row, 1)
    assert seen == ["jax"] and "attn=jax" in row.label


# --- On an NVIDIA GPU only (skipped on CPU hosts; not yet run: no GPU was lent when this was written) ---


@pytest.mark.skipif(not on_gpu, reason="needs an NVIDIA GPU with cuDNN")
@pytest.mark.parametrize("architecture", ["t5", "llama"])
def test_cudnn_in_bfloat16_is_close_to_einsum(architecture):
    """bf16 compute, float32 weights: cuDNN's logits within `BF16_LOGITS_RTOL` of einsum's (both bf16), gradients
    finite; an odd source length and a padded batch, T5's bias, Llama's GQA."""
    _, lm_params, spec, params = lm(architecture)
    data = ragged_batch(1)  # S = 9: odd
    results = {}
    for kernel in ("einsum", "cudnn"):
        _, model = build(architecture, kernel, dtype="bfloat16")

        def mean_loss(p):
            logits = model.apply({"params": lm_params}, data, prefix_lib.materialize(p, spec))
            total, count = train_steps.batch_loss(model, spec, p, lm_params, data, None)
            return total / count, logits

        results[kernel] = jax.jit(jax.value_and_grad(mean_loss, has_aux=True))(params)
    ((_, logits), _), ((_, fused_logits), fused_grads) = results["einsum"], results["cudnn"]
    valid = np.asarray(data["target_mask"], bool)
    logits, fused_logits = np.asarray(logits), np.asarray(fused_logits)
    assert np.isfinite(fused_logits).all()
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(fused_grads))
    scale = float(np.abs(logits[valid]).max())
    assert float(np.abs(fused_logits - logits)[valid].max()) < BF16_LOGITS_RTOL * scale
    hlo = jax.jit(lambda: build(architecture, "cudnn", dtype="bfloat16")[1].apply(
        {"params": lm_params}, data, prefix_lib.materialize(params, spec))).lower().as_text()
    assert "cudnn" in hlo.lower()  # the fused kernel is really called
