"""Settings that must not change the numbers, or only within a stated bound, for every architecture:
`model.remat` (none / full / minimal: the same loss and gradients; Gemma and Phi-3 too) and
`model.compute_dtype=bfloat16` with float32 weights (logits within `BF16_LOGITS_RTOL` of float32; softmax, norms and the loss still in float32)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from families import gemma_config, phi3_config
from tolerances import BF16_LOGITS_RTOL, F32_REORDERED_RTOL

from prefix_jax import models, train_steps
from prefix_jax import prefix as prefix_lib
from prefix_jax.models import common
from prefix_jax.tiny_checkpoints import TINY_ARCHITECTURES, _tiny_hf_config, bundled_gpt2_tokenizer

VOCAB, B, S, T = 64, 4, 10, 6
# By default the cheapest (GPT-2: the decoder-only shell) and Gemma 2 (its own block: sandwich norms, soft-caps, a
# sliding layer); the encoder-decoder shell, T5, Llama and Phi-3 (Llama's block) run with -m slow.
FAMILY_CONFIGS = {"gemma2": lambda: gemma_config("gemma2"), "phi3": lambda: phi3_config("phi3_partial")}
ARCHITECTURES = [pytest.param(a, marks=() if a in ("gpt2", "gemma2") else pytest.mark.slow)
                 for a in (*TINY_ARCHITECTURES, *FAMILY_CONFIGS)]


def small_lm(architecture: str, **config_overrides):
    """The tiny architecture (2 layers, width 64; Gemma 2 and Phi-3: the contract's width-32 variants `gemma2` and
    `phi3_partial`) with a 64-token vocabulary; (config, model, lm params, spec)."""
    if architecture in FAMILY_CONFIGS:
        hf = FAMILY_CONFIGS[architecture]()
    else:
        hf = _tiny_hf_config(architecture, bundled_gpt2_tokenizer(with_pad=architecture != "gpt2",
                                                                  eos_after_text=False))
    hf.vocab_size, hf.pad_token_id, hf.eos_token_id, hf.bos_token_id = VOCAB, 0, 1, 1
    if architecture in ("t5", "bart"):
        hf.decoder_start_token_id = 0
    arch = models.architecture(architecture)
    cfg = arch.Config.from_hf(hf, set(), **config_overrides)
    model = arch.Model(cfg)
    lm_params = jax.jit(model.init)(jax.random.PRNGKey(0), batch())["params"]  # eager init is slow
    geometry = cfg.prefix_geometry()
    spec = prefix_lib.PrefixSpec(length=3, placements=tuple(geometry), geometry=geometry, hidden_size=64,
                                 mlp_hidden=16)
    return cfg, model, lm_params, spec


def batch(seed: int = 0) -> dict:
    """Ragged rows: real source and target lengths differ per row."""
    rng = np.random.default_rng(seed)
    source_len, target_len = np.array([S, 3, 7, 1]), np.array([T, 2, 1, 4])
    return {"source_ids": jnp.asarray(rng.integers(2, VOCAB, (B, S)), jnp.int32),
            "source_mask": jnp.asarray(np.arange(S)[None] < source_len[:, None], jnp.int32),
            "target_ids": jnp.asarray(rng.integers(2, VOCAB, (B, T)), jnp.int32),
            "target_mask": jnp.asarray(np.arange(T)[None] < target_len[:, None], jnp.int32)}


def loss_and_grads(model, spec, params, lm_params, data):
    def mean_loss(p):
        total, count = train_steps.batch_loss(model, spec, p, lm_params, data, None)
        return total / count

    return jax.jit(jax.value_and_grad(mean_loss))(params)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_remat_policies_give_the_same_loss_and_gradients(architecture):
    """Rematerialization only trades memory for recomputation: full and minimal equal none (float32 rounding)."""
    results = {}
    cfg, _, lm_params, spec = small_lm(architecture)  # the same LM weights under every policy
    params = prefix_lib.init_params(spec, jax.random.PRNGKey(1))
    for policy in common.REMAT_POLICIES:
        model = models.architecture(architecture).Model(dataclasses.replace(cfg, remat=policy))
        assert common.remat_policy(model.config.remat) == policy
        results[policy] = loss_and_grads(model, spec, params, lm_params, batch())
    loss, grads = results["none"]
    assert float(loss) > 0 and all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    for policy in ("full", "minimal"):
        np.testing.assert_allclose(results[policy][0], loss, rtol=F32_REORDERED_RTOL)
        for (path, ref), g in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(results[policy][1])):
            scale = float(jnp.abs(ref).max())
            np.testing.assert_allclose(g, ref, rtol=F32_REORDERED_RTOL, atol=F32_REORDERED_RTOL * scale,
                                       err_msg=f"{policy} {jax.tree_util.keystr(path)}")


ACTIVATIONS = {"gelu", "silu", "swish", "relu", "sigmoid"}  # bfloat16 is fine there (transformers does the same)


def outside_activations(eqn) -> bool:
    return not any(frame.function_name in ACTIVATIONS for frame in eqn.source_info.traceback.frames)


def primitives_by_dtype(jaxpr, out: dict | None = None) -> dict[str, set[str]]:
    """{primitive name: dtypes of its operands} outside activation functions, through every nested jaxpr
    (scans, remat, custom derivative rules)."""
    out = {} if out is None else out
    for eqn in jaxpr.eqns:
        if outside_activations(eqn):
            out.setdefault(eqn.primitive.name, set()).update(
                str(v.aval.dtype) for v in eqn.invars if hasattr(v.aval, "dtype"))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    primitives_by_dtype(sub.jaxpr, out)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    primitives_by_dtype(sub, out)
    return out


@pytest.mark.slow  # by default tests/test_bf16_paths.py checks the bf16 step (dtype audit, loss and gradient)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_bfloat16_compute_keeps_softmax_norms_and_loss_in_float32(architecture):
    _, model32, lm_params, spec = small_lm(architecture)
    _, model16, _, _ = small_lm(architecture, dtype="bfloat16")
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(lm_params))  # float32 weights, bf16 compute
    params = prefix_lib.init_params(spec, jax.random.PRNGKey(1))
    data = batch(1)
    prefix = prefix_lib.materialize(params, spec)
    logits32 = model32.apply({"params": lm_params}, data, prefix)
    logits16 = model16.apply({"params": lm_params}, data, prefix)
    assert logits16.dtype == jnp.float32  # logits come back in float32 for the loss
    valid = np.asarray(data["target_mask"], bool)
    err = float(np.abs(np.asarray(logits16) - np.asarray(logits32))[valid].max())
    scale = float(np.abs(np.asarray(logits32))[valid].max())
    assert 0 < err < BF16_LOGITS_RTOL * scale, (err, scale)  # > 0: the compute really ran in bfloat16

    jaxpr = jax.make_jaxpr(lambda p: jax.value_and_grad(
        lambda q: train_steps.batch_loss(model16, spec, q, lm_params, data, None)[0])(p))(params)
    dtypes = primitives_by_dtype(jaxpr.jaxpr)
    assert "bfloat16" in dtypes["dot_general"]  # the matmuls run in bfloat16
    for primitive in ("exp", "log", "rsqrt", "reduce_max"):  # softmax, log-softmax (loss), norms
        assert dtypes.get(primitive, set()) <= {"float32"}, (primitive, dtypes.get(primitive))
    assert dtypes.get("exp") and dtypes.get("log") and dtypes.get("rsqrt")
