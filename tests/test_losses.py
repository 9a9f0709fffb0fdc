"""Chunked cross-entropy: same loss and hidden-state gradient as the logits path, without `[B, T, V]` buffers."""

from __future__ import annotations

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers

from prefix_jax import losses, train_steps
from prefix_jax import prefix as prefix_lib
from prefix_jax.models import bart, gpt2, llama, t5

B, T, D, V = 3, 7, 16, 50


def random_case(seed: int = 0, vocab_axis: int = 0, with_bias: bool = False, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    shape = (V, D) if vocab_axis == 0 else (D, V)
    weight = jnp.asarray(rng.normal(size=shape), jnp.float32)
    bias = jnp.asarray(rng.normal(size=(V,)), jnp.float32) if with_bias else None
    targets = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    lengths = np.array([T, 4, 1])  # right padding; one row with a single real token
    mask = jnp.asarray(np.arange(T)[None] < lengths[:, None], jnp.int32)
    return h, losses.LMHead(weight, vocab_axis, bias, scale), targets, mask


def reference_logits(h, head: losses.LMHead):
    w_VxD = head.weight if head.vocab_axis == 0 else head.weight.T
    logits = (h * head.scale) @ w_VxD.T
    return logits if head.bias is None else logits + head.bias.reshape((1,) * (logits.ndim - 1) + (-1,))


def mean_loss(loss_fn):
    def fn(h, head, targets, mask):
        total, count = loss_fn(h, head, targets, mask)
        return total / count
    return fn


HEADS = [dict(vocab_axis=0), dict(vocab_axis=1, with_bias=True, scale=D**-0.5)]


@pytest.mark.parametrize("head_kwargs", HEADS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("chunk_size", [1, 5, 1000])
def test_loss_and_hidden_gradient_equal_the_logits_path(head_kwargs, label_smoothing, chunk_size):
    h, head, targets, mask = random_case(**head_kwargs)
    ref = lambda h, head, t, m: losses.token_cross_entropy(reference_logits(h, head), t, m, label_smoothing)
    ours = lambda h, head, t, m: losses.chunked_token_cross_entropy(h, head, t, m, label_smoothing, chunk_size)
    (ref_total, ref_count), (total, count) = ref(h, head, targets, mask), ours(h, head, targets, mask)
    assert float(count) == float(ref_count) == float(mask.sum())
    np.testing.assert_allclose(total, ref_total, rtol=1e-6)
    ref_grads = jax.grad(mean_loss(ref), argnums=(0, 1))(h, head, targets, mask)
    grads = jax.grad(mean_loss(ours), argnums=(0, 1))(h, head, targets, mask)
    np.testing.assert_allclose(grads[0], ref_grads[0], atol=1e-6)
    assert not np.any(np.asarray(grads[0])[np.asarray(mask) == 0])  # padded positions get no gradient
    for g, r in zip(jax.tree.leaves(grads[1]), jax.tree.leaves(ref_grads[1])):  # the head too, when asked
        np.testing.assert_allclose(g, r, atol=1e-6)


def test_bad_arguments_raise_one_line_errors():
    h, head, targets, mask = random_case()
    for kwargs in (dict(chunk_size=0), dict(label_smoothing=1.0)):
        with pytest.raises(losses.LossConfigError, match="^[^\n]+$"):
            losses.chunked_token_cross_entropy(h, head, targets, mask, **kwargs)


def temp_bytes(fn, *args) -> int:
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_neither_pass_holds_the_full_logits():
    batch, length, width, vocab, chunk = 4, 256, 64, 32768, 128
    logits_bytes = batch * length * vocab * 4  # 128 MiB
    h = jax.ShapeDtypeStruct((batch, length, width), jnp.float32)
    head = losses.LMHead(jax.ShapeDtypeStruct((vocab, width), jnp.float32))
    targets = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    mask = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    chunked = mean_loss(lambda *a: losses.chunked_token_cross_entropy(*a, chunk_size=chunk))
    full = mean_loss(lambda h, head, t, m: losses.token_cross_entropy(head.logits(h), t, m))
    grad = lambda f: jax.grad(f)  # d loss / d hidden states only, as prefix tuning asks
    full_bytes, chunked_bytes = temp_bytes(grad(full), h, head, targets, mask), temp_bytes(grad(chunked), h, head,
                                                                                          targets, mask)
    chunk_logits_bytes = chunk * vocab * 4
    assert full_bytes >= logits_bytes  # the logits path holds [B, T, V] float32 (and its gradient)
    assert chunked_bytes <= 3 * chunk_logits_bytes, (chunked_bytes, full_bytes)  # a few chunks' worth, no more
    assert temp_bytes(chunked, h, head, targets, mask) <= 3 * chunk_logits_bytes
    default_chunk = mean_loss(losses.chunked_token_cross_entropy)  # 512 tokens at V=32k: two chunks here
    assert temp_bytes(grad(default_chunk), h, head, targets, mask) < full_bytes / 2


# --- Each model's head, as `lm_head_for` describes it, against the model's own logits ---


def _t5(tied: bool):
    hf = transformers.T5Config(vocab_size=V, d_model=D, d_kv=4, d_ff=32, num_layers=1, num_heads=4,
                               relative_attention_num_buckets=8, dropout_rate=0.0, decoder_start_token_id=0,
                               tie_word_embeddings=tied)
    return t5.Config.from_hf(hf, set() if tied else {"lm_head.weight"}), t5.Model, "decoder"


def _bart():
    hf = transformers.BartConfig(vocab_size=V, d_model=D, encoder_layers=1, decoder_layers=1,
                                 encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=32,
                                 decoder_ffn_dim=32, max_position_embeddings=64, dropout=0.0)
    return bart.Config.from_hf(hf, set()), bart.Model, "decoder"


def _gpt2():
    # Token ids inside the vocabulary: the separator (bos) starts the target side.
    hf = transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=D, n_layer=1, n_head=4, bos_token_id=1,
                                 eos_token_id=2)
    return gpt2.Config.from_hf(hf, set()), gpt2.Model, "transformer"


def _llama(tied: bool):
    hf = transformers.LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                  tie_word_embeddings=tied)
    return llama.Config.from_hf(hf, set() if tied else {"lm_head.weight"}), llama.Model, "model"


MODELS = {"t5-v1.0-tied-scaled": lambda: _t5(True), "t5-untied": lambda: _t5(False), "bart": _bart,
          "gpt2": _gpt2, "llama-untied": lambda: _llama(False), "llama-tied": lambda: _llama(True)}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_lm_head_for_reproduces_each_models_loss(name):
    config, model_cls, stack_name = MODELS[name]()
    model = model_cls(config)
    rng = np.random.default_rng(1)
    source_len = 5
    batch = {"source_ids": jnp.asarray(rng.integers(3, V, (2, source_len)), jnp.int32),
             "source_mask": jnp.ones((2, source_len), jnp.int32),
             "target_ids": jnp.asarray(rng.integers(3, V, (2, 4)), jnp.int32),
             "target_mask": jnp.asarray([[1, 1, 1, 1], [1, 1, 0, 0]], jnp.int32)}
    params = jax.jit(model.init)(jax.random.PRNGKey(0), batch)["params"]
    if "final_logits_bias" in params:  # zeros at init: make the bias matter
        params = {**params, "final_logits_bias": jnp.asarray(rng.normal(size=(V,)), jnp.float32)}
    stack_outputs = []

    def record_stack_output(next_fn, args, kwargs, context):
        out = next_fn(*args, **kwargs)
        if context.module.name == stack_name and context.method_name == "__call__":
            stack_outputs.append(out[0])
        return out

    @jax.jit
    def logits_and_stack_output(params):
        with nn.intercept_methods(record_stack_output):
            logits = model.apply({"params": params}, batch)
        return logits, stack_outputs[-1]

    logits, h = logits_and_stack_output(params)
    h = h[:, -batch["target_ids"].shape[1]:]  # decoder-only stacks run over [source; target]
    ref_total, _ = losses.token_cross_entropy(logits, batch["target_ids"], batch["target_mask"], 0.1)
    head = losses.lm_head_for(config, params)
    total, _ = losses.chunked_token_cross_entropy(h, head, batch["target_ids"], batch["target_mask"], 0.1, 3)
    assert np.isfinite(float(ref_total))
    np.testing.assert_allclose(total, ref_total, rtol=1e-6)


# --- Training with `loss_chunk_tokens`: the same step as the logits path, without [B, T, V] logits ---


def _step_inputs(name: str, tasks: tuple[str, ...] = ()):
    config, model_cls, _ = MODELS[name]()
    model = model_cls(config)
    rng = np.random.default_rng(2)
    rows, source_len, target_len = 4, 5, 6
    batch = {"source_ids": jnp.asarray(rng.integers(3, V, (rows, source_len)), jnp.int32),
             "source_mask": jnp.asarray(np.arange(source_len)[None] >= np.array([[0], [2], [0], [1]]), jnp.int32),
             "target_ids": jnp.asarray(rng.integers(3, V, (rows, target_len)), jnp.int32),
             "target_mask": jnp.asarray(np.arange(target_len)[None] < np.array([[6], [3], [1], [5]]), jnp.int32)}
    lm_params = jax.jit(model.init)(jax.random.PRNGKey(0), batch)["params"]
    if "final_logits_bias" in lm_params:
        lm_params = {**lm_params, "final_logits_bias": jnp.asarray(rng.normal(size=(V,)), jnp.float32)}
    if tasks:
        batch["task_ids"] = jnp.asarray([1, 0, 1, 0], jnp.int32)
    geometry = config.prefix_geometry()
    spec = prefix_lib.PrefixSpec(length=3, placements=tuple(geometry), geometry=geometry,
                                 hidden_size=config.hidden_size, mlp_hidden=8, dropout=0.1, tasks=tasks)
    return model, spec, lm_params, batch


def _train_step(model, spec, lm_params, batch, **kwargs):
    """One step with SGD at learning rate 1: the params move by exactly minus the gradient."""
    tx = optax.sgd(1.0)
    state = train_steps.init_state(prefix_lib.init_params(spec, jax.random.PRNGKey(1)), tx, jax.random.PRNGKey(2))
    step = jax.jit(functools.partial(train_steps.train_step, model=model, spec=spec, tx=tx,
                                     schedule=optax.constant_schedule(1.0), **kwargs))
    new_state, metrics = step(state, lm_params, batch)
    return metrics, jax.tree.map(jnp.subtract, state.params, new_state.params)


STEP_CASES = [  # (label_smoothing, grad_accum_steps, loss_chunk_tokens, tasks): all at once, then simpler cases
    (0.1, 2, 3, ("a", "b")), (0.0, 1, 5, ()), (0.1, 1, 64, ())]
STEP_MODELS = ["t5-v1.0-tied-scaled", "bart", "gpt2", "llama-untied"]


def _step_params() -> list:
    """Every case on every model; by default only the first (all at once) on GPT-2, the rest with -m slow."""
    return [pytest.param(*case, name, id=f"{case[0]}-{case[1]}-{case[2]}-tasks{i}-{name}",
                         marks=[] if (i, name) == (0, "gpt2") else [pytest.mark.slow])
            for name in STEP_MODELS for i, case in enumerate(STEP_CASES)]


@pytest.mark.parametrize("label_smoothing,grad_accum_steps,chunk,tasks,name", _step_params())
def test_chunked_train_step_equals_the_logits_step(name, label_smoothing, grad_accum_steps, chunk, tasks):
    model, spec, lm_params, batch = _step_inputs(name, tasks)
    kwargs = dict(label_smoothing=label_smoothing, grad_accum_steps=grad_accum_steps)
    ref_metrics, ref_grads = _train_step(model, spec, lm_params, batch, **kwargs)
    metrics, grads = _train_step(model, spec, lm_params, batch, loss_chunk_tokens=chunk, **kwargs)
    assert float(metrics["tokens"]) == float(ref_metrics["tokens"]) == float(batch["target_mask"].sum())
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-5)
    assert float(ref_metrics["grad_norm"]) > 1e-3  # the prefix gets a real gradient
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        # The chunked loss sums the same terms in another order: f32 round-off is relative to the leaf's largest
        # entry, not to each entry (a 5e-4 entry of a 4e-3 leaf moved by 1.2e-7 under XLA's unfused CPU emitters).
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-4 * float(np.abs(r).max()))


def _f32_logits_buffers(hlo_text: str, rows: int, length: int, vocab: int) -> int:
    """How many times the HLO names a float32 `[rows, length, vocab]` (or flattened `[rows*length, vocab]`) array."""
    return len(re.findall(rf"f32\[(?:{rows},{length}|{rows * length}),{vocab}\]", hlo_text))


def test_chunked_train_step_holds_no_full_logits():
    """The jitted step's compiled HLO: the logits path names f32[B, T, V]; the chunked path only [chunk, V]."""
    vocab, rows, target_len, chunk = 4099, 4, 6, 8  # a vocabulary size no other dimension has
    hf = transformers.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=D, n_layer=1, n_head=4, bos_token_id=1,
                                 eos_token_id=2)
    model = gpt2.Model(gpt2.Config.from_hf(hf, set()))
    rng = np.random.default_rng(0)
    batch = {"source_ids": jnp.asarray(rng.integers(3, vocab, (rows, 5)), jnp.int32),
             "source_mask": jnp.ones((rows, 5), jnp.int32),
             "target_ids": jnp.asarray(rng.integers(3, vocab, (rows, target_len)), jnp.int32),
             "target_mask": jnp.ones((rows, target_len), jnp.int32)}
    lm_params = jax.jit(model.init)(jax.random.PRNGKey(0), batch)["params"]
    geometry = model.config.prefix_geometry()
    spec = prefix_lib.PrefixSpec(length=3, placements=tuple(geometry), geometry=geometry, hidden_size=D, mlp_hidden=8)
    tx = optax.sgd(1.0)
    state = train_steps.init_state(prefix_lib.init_params(spec, jax.random.PRNGKey(1)), tx, jax.random.PRNGKey(2))

    def compiled_hlo(loss_chunk_tokens: int) -> str:
        step = train_steps.jit_train_step(model, spec, tx, optax.constant_schedule(1.0),
                                       loss_chunk_tokens=loss_chunk_tokens)
        return step.lower(state, lm_params, batch).compile().as_text()

    assert _f32_logits_buffers(compiled_hlo(0), rows, target_len, vocab) > 0  # the check can see the logits
    chunked = compiled_hlo(chunk)
    assert _f32_logits_buffers(chunked, rows, target_len, vocab) == 0
    assert re.search(rf"f32\[{chunk},{vocab}\]", chunked)  # one chunk's logits at a time


@pytest.mark.parametrize("value", [-1, True])  # (ml_collections refuses a float for an int field itself)
def test_loss_chunk_tokens_is_validated_with_a_one_line_error(value):
    from configs import gpt2_e2e_offline
    from prefix_jax import config_checks, run_options

    config = gpt2_e2e_offline.get_config()
    config.train.loss_chunk_tokens = 0
    run_options.check(config)  # the default (off) is valid
    config.train.loss_chunk_tokens = value
    with pytest.raises(config_checks.ConfigError, match=r"^train\.loss_chunk_tokens=[^\n]+$"):
        run_options.check(config)


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_token_losses_value_and_written_out_gradient_equal_torch(epsilon):
    """`losses.token_losses` (its backward written out, not autodiff): the mean loss over real tokens and its
    gradient w.r.t. the logits equal torch autograd through `cross_entropy` / transformers' `LabelSmoother`."""
    import torch
    from transformers.trainer_pt_utils import LabelSmoother

    rng = np.random.default_rng(1)
    logits = (rng.normal(size=(3, 4, 11)) * 3).astype(np.float32)
    targets = rng.integers(0, 11, (3, 4))
    mask = (np.arange(4)[None] < np.array([4, 2, 1])[:, None]).astype(np.int32)

    def mean_loss(l):
        total, count = losses.token_cross_entropy(l, jnp.asarray(targets), jnp.asarray(mask), epsilon)
        return total / count

    loss, grad = jax.value_and_grad(mean_loss)(jnp.asarray(logits))
    logits_pt = torch.tensor(logits, requires_grad=True)
    labels = torch.tensor(np.where(mask == 1, targets, -100))
    if epsilon:
        expected = LabelSmoother(epsilon=epsilon)({"logits": logits_pt}, labels)
    else:
        expected = torch.nn.functional.cross_entropy(logits_pt.reshape(-1, 11), labels.reshape(-1))
    expected.backward()
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), logits_pt.grad.numpy(), atol=1e-7, rtol=1e-5)
    assert not np.asarray(grad)[2, 1:].any()  # pads get no gradient
