"""bfloat16 compute (`model.compute_dtype="bfloat16"`): what must stay float32 does.

Read from the traced training step of every architecture: no reduction, exponential, logarithm or rsqrt
takes a bfloat16 operand (attention scores/softmax, norm statistics, the loss and the prefix gradient's sum
over the batch all run in float32), except inside the MLP activations, which run in the compute dtype as
transformers runs them. And the bf16 step's loss and prefix gradient stay close to float32's.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import source_info_util

from prefix_jax import models, optim, train_steps
from prefix_jax import prefix as prefix_lib

# Primitives whose bfloat16 use would lose what float32 keeps: sums/maxima (softmax, norms, loss, gradient
# accumulation), and the transcendental parts of softmax, log-softmax and norms.
PRECISION_SENSITIVE = {"reduce_sum", "reduce_max", "reduce_min", "exp", "exp2", "log", "log1p", "rsqrt", "sqrt",
                       "cumsum", "cumlogsumexp"}


def _hf_config(architecture: str):
    import transformers

    vocab = 96
    if architecture == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                       bos_token_id=1, eos_token_id=1)
    if architecture == "t5":
        return transformers.T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                     relative_attention_num_buckets=8, decoder_start_token_id=0)
    if architecture == "bart":
        return transformers.BartConfig(vocab_size=vocab, d_model=32, encoder_layers=2, decoder_layers=2,
                                       encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                       decoder_ffn_dim=64, max_position_embeddings=64)
    if architecture == "gemma2":  # soft-caps, a sliding layer (window 4 < source + target) and a global one
        return transformers.Gemma2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                                         layer_types=["sliding_attention", "full_attention"], pad_token_id=0,
                                         attn_logit_softcapping=2.0, final_logit_softcapping=3.0)
    if architecture == "phi3":  # partial rotary, longrope's scaled tables, every layer sliding
        return transformers.Phi3Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       original_max_position_embeddings=32, sliding_window=4, pad_token_id=0,
                                       rope_parameters=dict(rope_type="longrope", rope_theta=500.0,
                                                            partial_rotary_factor=0.5, short_factor=[1.0, 2.0],
                                                            long_factor=[2.0, 4.0]))
    return transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _setup(architecture: str, compute_dtype: str, placements: tuple[str, ...]):
    hf = _hf_config(architecture)
    arch = models.architecture(hf.model_type)
    config = dataclasses.replace(arch.Config.from_hf(hf, set()), dtype=compute_dtype)
    model = arch.Model(config)
    rng = np.random.default_rng(0)
    batch = {"source_ids": jnp.asarray(rng.integers(3, 90, (4, 6)), jnp.int32),
             "source_mask": jnp.ones((4, 6), jnp.int32),
             "target_ids": jnp.asarray(rng.integers(3, 90, (4, 5)), jnp.int32),
             "target_mask": jnp.asarray([[1] * 5, [1] * 5, [1] * 3 + [0] * 2, [1] * 4 + [0]], jnp.int32)}
    lm_params = arch.Model(dataclasses.replace(config, dtype="float32")).init(jax.random.PRNGKey(0), batch)["params"]
    spec = prefix_lib.PrefixSpec(length=3, placements=placements, geometry=config.prefix_geometry(),
                                 hidden_size=config.hidden_size, mlp_hidden=16)
    params = prefix_lib.init_params(spec, jax.random.PRNGKey(1))
    return model, spec, params, lm_params, batch


def _placements(architecture: str) -> tuple[str, ...]:
    return ("encoder", "decoder", "cross") if architecture in ("t5", "bart") else ("decoder",)


def _subjaxprs(eqn):
    for value in eqn.params.values():
        for v in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(v, jax.extend.core.ClosedJaxpr):
                yield v.jaxpr
            elif isinstance(v, jax.extend.core.Jaxpr):
                yield v


def _in_activation(eqn) -> bool:
    """Whether `eqn` comes from an MLP activation (`models.common.ACTIVATIONS`), which runs in the compute dtype."""
    frame = source_info_util.user_frame(eqn.source_info.traceback)
    return frame is not None and frame.file_name.endswith("models/common.py") and frame.function_name == "<lambda>"


def bf16_precision_ops(jaxpr) -> list[str]:
    """Every precision-sensitive op with a bfloat16 operand in `jaxpr` (nested jaxprs included), with its source."""
    found = []
    for eqn in jaxpr.eqns:
        for sub in _subjaxprs(eqn):
            found += bf16_precision_ops(sub)
        if eqn.primitive.name not in PRECISION_SENSITIVE or _in_activation(eqn):
            continue
        if any(getattr(getattr(v, "aval", None), "dtype", None) == jnp.bfloat16 for v in eqn.invars):
            found.append(f"{eqn.primitive.name} at {source_info_util.summarize(eqn.source_info)}")
    return found


def _train_step(model, spec, params, loss_chunk_tokens: int = 0):
    tx, schedule = optim.make_optimizer(params, learning_rate=1e-3, total_steps=10)
    step = functools.partial(train_steps.train_step, model=model, spec=spec, tx=tx, schedule=schedule,
                             loss_chunk_tokens=loss_chunk_tokens)
    return step, train_steps.init_state(params, tx, jax.random.PRNGKey(2))


@pytest.mark.parametrize("architecture, loss_chunk_tokens", [  # t5 in the slow set: bart is the encoder-decoder
    ("gpt2", 0), pytest.param("t5", 0, marks=pytest.mark.slow), ("bart", 0), ("llama", 0), ("gpt2", 8),
    pytest.param("t5", 8, marks=pytest.mark.slow), ("gemma2", 0), ("phi3", 0), ("phi3", 8)])
def test_bf16_step_keeps_softmax_norms_loss_and_prefix_gradient_in_float32(architecture, loss_chunk_tokens):
    """Logits loss and chunked loss (`train.loss_chunk_tokens`)."""
    model, spec, params, lm_params, batch = _setup(architecture, "bfloat16", _placements(architecture))
    step, state = _train_step(model, spec, params, loss_chunk_tokens)
    lm_bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), lm_params)  # param_dtype bfloat16 too
    jaxpr = jax.make_jaxpr(step)(state, lm_bf16, batch).jaxpr
    assert bf16_precision_ops(jaxpr) == []
    assert sum(1 for _ in _walk(jaxpr)) > 0
    new_state, metrics = jax.eval_shape(step, state, lm_bf16, batch)
    assert metrics["loss"].dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new_state.params))  # the prefix stays float32


def _walk(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in _subjaxprs(eqn):
            yield from _walk(sub)


def test_audit_sees_a_bf16_softmax():
    """The audit itself: a softmax computed in bfloat16 is reported."""
    jaxpr = jax.make_jaxpr(lambda x: jax.nn.softmax(x.astype(jnp.bfloat16)))(jnp.ones((2, 3))).jaxpr
    assert any(op.startswith(("exp", "reduce_")) for op in bf16_precision_ops(jaxpr))


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["gpt2", "t5"])
def test_bf16_loss_and_prefix_gradient_close_to_float32(architecture):
    """Loss within 2% and the prefix gradient pointing the same way (cosine > 0.99) as in float32."""
    results = {}
    for dtype in ("float32", "bfloat16"):
        model, spec, params, lm_params, batch = _setup(architecture, dtype, _placements(architecture))

        def loss_fn(p):
            total, count = train_steps.batch_loss(model, spec, p, lm_params, batch, None)
            return total / count

        results[dtype] = jax.jit(jax.value_and_grad(loss_fn))(params)
    (loss32, grad32), (loss16, grad16) = results["float32"], results["bfloat16"]
    flat32 = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grad32)])
    flat16 = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grad16)])
    cosine = flat32 @ flat16 / (np.linalg.norm(flat32) * np.linalg.norm(flat16))
    assert abs(float(loss16) - float(loss32)) < 0.02 * abs(float(loss32))
    assert cosine > 0.99, cosine
