"""Attention through `jax.nn.dot_product_attention` (`model.attention_kernel`): XLA's composition or cuDNN's kernel.

`attention.attend` dispatches here unless the kernel is "einsum" (ours: the prefix as its own key block) or
attention-probability dropout is active in the call (`jax.nn.dot_product_attention` has no dropout; the
einsum path then serves that call, so with a model's attention dropout > 0 training steps use einsum and only
evaluation and decoding use the kernel chosen here).

The kernels (`ATTENTION_KERNELS`):
- "einsum": `attention.attend`'s own path (the default; parity is defined on it).
- "jax": `jax.nn.dot_product_attention(..., implementation=None)`. In JAX 0.10 and 0.11 (read in its source,
  `jax/_src/nn/functions.py`, v0.10.0 to v0.11.1) `None` always means the "xla" implementation ("It defaults
  to `None`, which currently falls back to `xla`"; a TODO to pick the best backend automatically): einsum,
  float32 softmax, einsum, compiled by XLA like any other ops, on every backend. It never selects cuDNN,
  and XLA no longer rewrites such attention into cuDNN's fused kernel (its cuDNN FMHA rewriter was deleted
  in 2025, openxla/xla#23389). Measured on an H200 (benchmarks/results/attention_impl_ab.h200.json) it is
  1.1-1.2x faster than "einsum"; the fused speed-up needs "cudnn".
- "cudnn": `implementation="cudnn"`, cuDNN's fused flash attention: NVIDIA GPUs only, bf16/fp16 only, head
  dim a multiple of 8 up to 128 (256 on Hopper and later). `check_attention_kernel` probes it when a model
  config is built, so an unsupported host fails at setup, not inside a traced step.

Either way the prefix (`[N, P, K]` shared by every row, or a bank's per-row prefixes) is broadcast and
concatenated in front of the keys and values (a `[B, P + C, N, K]` copy per layer and call, which the
einsum path avoids), a bank's empty slots masked. Semantics against "einsum": scores and softmax in float32
for float32 inputs; for bf16 inputs the "xla" implementation accumulates scores in float32 and takes the
softmax in float32, cuDNN does the same inside its kernel but adds the mask as a bf16 bias of -2**41.
Masked scores are finite in all three (einsum -1e30, xla -0.7 * float32 max, cuDNN -2**41), so a query
row with every key masked (a pad query) attends uniformly, without NaN; with "cudnn" and an odd key count
that includes the masked slot added to make it even (see `_cudnn`). No real token reads such a row: pads
are masked as keys.
"""

from __future__ import annotations

import functools
import logging
from typing import Iterable

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

ATTENTION_KERNELS = ("einsum", "jax", "cudnn")
FIELD = "model.attention_kernel"
_CUDNN_DTYPES = ("bfloat16", "float16")


class AttentionKernelError(ValueError):
    """`model.attention_kernel` cannot run here; the message names the field and the fix."""


def check_attention_kernel(kernel: str, dtype: str, head_dims: Iterable[int], attention_dropout: float = 0.0) -> None:
    """Fails with a one-line `AttentionKernelError` when `kernel` is unknown or, for "cudnn", cannot run in this
    process (no cuDNN, a dtype or head dim cuDNN refuses): called when a model config is built.

    With `attention_dropout` > 0 it logs that training steps will use the einsum path (see the module docstring).
    """
    if kernel not in ATTENTION_KERNELS:
        raise AttentionKernelError(f"{FIELD}={kernel!r} is not an attention kernel; use one of {ATTENTION_KERNELS}.")
    if kernel == "einsum":
        return
    if kernel == "cudnn":
        _check_cudnn(str(dtype), tuple(sorted(set(head_dims))))
    if attention_dropout > 0:
        log.warning("%s=%r serves calls without attention dropout only: this model's attention dropout is %g, so "
                    "training steps use the einsum path (evaluation and decoding use %r).", FIELD, kernel,
                    attention_dropout, kernel)


@functools.cache
def _check_cudnn(dtype: str, head_dims: tuple[int, ...]) -> None:
    """Compiles and runs a tiny forward + backward cuDNN attention per head dim (cached once it succeeds)."""
    if dtype not in _CUDNN_DTYPES:
        raise AttentionKernelError(f"{FIELD}='cudnn' needs model.compute_dtype 'bfloat16' (cuDNN's fused attention "
                                   f"takes bf16/fp16 only; the compute dtype is {dtype!r}); set it, or use "
                                   f"{FIELD}='jax'.")
    backend = jax.default_backend()
    if backend != "gpu":
        raise AttentionKernelError(f"{FIELD}='cudnn' needs an NVIDIA GPU with cuDNN, and JAX's backend here is "
                                   f"{backend!r}; use {FIELD}='jax' (XLA) or 'einsum'.")
    for head_dim in head_dims:
        try:
            _probe_cudnn(jnp.dtype(dtype), head_dim)
        except Exception as error:  # noqa: BLE001 - whatever cuDNN or JAX refuses, said on one line
            reason = " ".join(str(error).split())[:200]
            raise AttentionKernelError(f"{FIELD}='cudnn' cannot run here with head dim {head_dim} in {dtype} "
                                       f"({type(error).__name__}: {reason}); use {FIELD}='jax' or 'einsum'.") from None


def _probe_cudnn(dtype: jnp.dtype, head_dim: int) -> None:
    shape = (1, 2, 1, head_dim)  # [B, T, N, K]
    q = k = v = jnp.ones(shape, dtype)
    bias, mask = jnp.zeros((1, 1, 2, 2), dtype), jnp.ones((1, 1, 2, 2), bool)

    def loss(q, k, v):
        out = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, implementation="cudnn")
        return out.astype(jnp.float32).sum()

    jax.block_until_ready(jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v))


def with_prefix(k_BxCxNxK: jax.Array, v_BxCxNxK: jax.Array, mask_BxHxQxM: jax.Array, prefix_key: jax.Array,
                prefix_value: jax.Array, valid_BxP: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Keys and values `[B, P + C, N, K]` with the prefix (`[N, P, K]`, or `[B, N, P, K]` per row) in front, and the
    mask with a bank's empty prefix slots hidden (`valid_BxP`; None: every slot is real)."""
    batch = k_BxCxNxK.shape[0]

    def rows(x: jax.Array) -> jax.Array:  # -> [B, P, N, K]
        if x.ndim == 3:
            return jnp.broadcast_to(jnp.swapaxes(x, 0, 1)[None], (batch, x.shape[1], *x.shape[::2]))
        return jnp.swapaxes(x, 1, 2)

    k = jnp.concatenate([rows(prefix_key).astype(k_BxCxNxK.dtype), k_BxCxNxK], axis=1)
    v = jnp.concatenate([rows(prefix_value).astype(v_BxCxNxK.dtype), v_BxCxNxK], axis=1)
    if valid_BxP is None:
        return k, v, mask_BxHxQxM
    prefix_len = valid_BxP.shape[-1]
    prefix_mask = mask_BxHxQxM[..., :prefix_len] & valid_BxP[:, None, None, :]
    token_mask = jnp.broadcast_to(mask_BxHxQxM[..., prefix_len:],
                                  prefix_mask.shape[:-1] + (mask_BxHxQxM.shape[-1] - prefix_len,))
    return k, v, jnp.concatenate([prefix_mask, token_mask], axis=-1)


def _even(x: jax.Array, axis: int, fill: bool | float) -> jax.Array:
    """`x` with one `fill` slot appended on `axis` when its length there is odd."""
    if x.shape[axis] % 2 == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, 1)
    return jnp.pad(x, widths, constant_values=fill)


def _cudnn(q_BxQxHxK: jax.Array, k_BxMxNxK: jax.Array, v_BxMxNxK: jax.Array, mask_BxHxQxM: jax.Array,
           bias_BxHxQxM: jax.Array | None, scale: float) -> jax.Array:
    """cuDNN wants bias and mask over the full `[Q, M]` and, with a bias in training (a boolean mask is turned into
    one), both lengths even: odd ones get one extra query (its output dropped) or one extra key (masked; a query
    row that sees no key at all averages over it too)."""
    batch, num_queries = q_BxQxHxK.shape[:2]
    num_keys = k_BxMxNxK.shape[1]
    full = lambda x: jnp.broadcast_to(x, x.shape[:2] + (num_queries, num_keys))
    mask = _even(_even(full(mask_BxHxQxM), 2, False), 3, False)
    bias = None if bias_BxHxQxM is None else _even(_even(full(bias_BxHxQxM).astype(q_BxQxHxK.dtype), 2, 0.0), 3, 0.0)
    q, k, v = _even(q_BxQxHxK, 1, 0.0), _even(k_BxMxNxK, 1, 0.0), _even(v_BxMxNxK, 1, 0.0)
    y = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, implementation="cudnn")
    return y[:, :num_queries]


def attend(q_BxQxHxK: jax.Array, k_BxCxNxK: jax.Array, v_BxCxNxK: jax.Array, mask_BxHxQxM: jax.Array,
           bias_BxHxQxM: jax.Array | None, scale: float, kernel: str,
           prefix_block: tuple[jax.Array, jax.Array, jax.Array | None] | None = None) -> jax.Array:
    """`attention.attend` (no dropout) through `jax.nn.dot_product_attention` with `kernel` "jax" or "cudnn".

    `prefix_block`: the prefix's key, value (`[N, P, K]` or `[B, N, P, K]`) and slot validity (`[B, P]` or None),
    as `attention._prefix_block` gives them; mask and bias cover `M = P + C` keys as in `attention.attend`.
    """
    k, v, mask = k_BxCxNxK, v_BxCxNxK, mask_BxHxQxM
    if prefix_block is not None:
        k, v, mask = with_prefix(k, v, mask, *prefix_block)
    dtype = jnp.result_type(q_BxQxHxK, k, v)
    q, k, v = (x.astype(dtype) for x in (q_BxQxHxK, k, v))
    if kernel == "cudnn":
        return _cudnn(q, k, v, mask, bias_BxHxQxM, scale)
    if kernel != "jax":
        raise AttentionKernelError(f"{FIELD}={kernel!r} is not a fused attention kernel; use 'jax' or 'cudnn'.")
    return jax.nn.dot_product_attention(q, k, v, bias=bias_BxHxQxM, mask=mask, scale=scale, implementation=None)
