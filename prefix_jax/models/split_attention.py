"""Attention over a prefix and the tokens as two key blocks sharing one softmax, without copying the prefix.

`attention.attend(q, *attention.prepend_prefix(prefix, k, v), mask, bias, ...)` broadcasts the layer's
unbatched prefix `[H, P, K]` to `[B, P, H, K]` and concatenates it in front of every example's keys and
values: two `[B, P + S, H, K]` copies per layer and step (per decoding step too). Here the prefix block
is contracted directly in its own layout (`bqhk,hpk->bhqp`), the token block as usual, and the softmax
normalizer is shared: `softmax([s_p; s_t]) @ [v_p; v_t] = (exp(s_p - m) @ v_p + exp(s_t - m) @ v_t) / z`
with `m` the maximum and `z` the sum over both blocks. Same result, same masks and bias (laid out over
`P + S` keys exactly as `masks.attention_mask` makes them), no `[B, P + S, H, K]` buffers.

A standalone function with a parity test (`tests/test_split_attention.py`); the models still call
`attention.attend`. Wiring it in means replacing `prepend_prefix` + `attend` in
`MultiHeadAttention.__call__` by `attend_with_prefix(q, k, v, prefix, mask, bias, scale, dropout, det)`.
With dropout on, each block draws its own dropout mask (same distribution, other random numbers than
dropout on the concatenated weights).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from prefix_jax.models.attention import _MASKED_SCORE, KV, attend


def _prefix_scores(q_BxQxHxK: jax.Array, key: jax.Array) -> jax.Array:
    """Scores `[B, H, Q, P]` against a prefix `[H, P, K]` (shared) or `[B, H, P, K]` (per row)."""
    pattern = "bqhk,hpk->bhqp" if key.ndim == 3 else "bqhk,bhpk->bhqp"
    return jnp.einsum(pattern, q_BxQxHxK, key, preferred_element_type=jnp.float32)


def _prefix_mix(weights_BxHxQxP: jax.Array, value: jax.Array, dtype: jnp.dtype) -> jax.Array:
    pattern = "bhqp,hpk->bqhk" if value.ndim == 3 else "bhqp,bhpk->bqhk"
    return jnp.einsum(pattern, weights_BxHxQxP.astype(dtype), value.astype(dtype))


def attend_with_prefix(
    q_BxQxHxK: jax.Array,
    k_BxSxHxK: jax.Array,
    v_BxSxHxK: jax.Array,
    prefix: KV | None,
    mask_BxHxQxT: jax.Array,
    bias_BxHxQxT: jax.Array | None,
    scale: float,
    dropout: nn.Dropout | None = None,
    deterministic: bool = True,
) -> jax.Array:
    """`attend(q, *prepend_prefix(prefix, k, v), mask, bias, scale)` without concatenating the prefix.

    `T = P + S`: mask and bias cover the prefix slots first, as everywhere in the models. Scores and the
    softmax run in float32 whatever the compute dtype.
    """
    if prefix is None:
        return attend(q_BxQxHxK, k_BxSxHxK, v_BxSxHxK, mask_BxHxQxT, bias_BxHxQxT, scale, dropout, deterministic)
    prefix = KV(prefix.key.astype(k_BxSxHxK.dtype), prefix.value.astype(v_BxSxHxK.dtype))  # as prepend_prefix
    prefix_len = prefix.key.shape[-2]

    def block(scores: jax.Array, keys: slice) -> jax.Array:
        scores = scores * scale
        if bias_BxHxQxT is not None:
            scores = scores + bias_BxHxQxT[..., keys].astype(jnp.float32)
        return jnp.where(mask_BxHxQxT[..., keys], scores, _MASKED_SCORE)

    prefix_scores = block(_prefix_scores(q_BxQxHxK, prefix.key), slice(None, prefix_len))
    token_scores = block(jnp.einsum("bqhk,bshk->bhqs", q_BxQxHxK, k_BxSxHxK, preferred_element_type=jnp.float32),
                         slice(prefix_len, None))
    top = jax.lax.stop_gradient(jnp.maximum(prefix_scores.max(-1, keepdims=True), token_scores.max(-1, keepdims=True)))
    prefix_exp, token_exp = jnp.exp(prefix_scores - top), jnp.exp(token_scores - top)
    total = prefix_exp.sum(-1, keepdims=True) + token_exp.sum(-1, keepdims=True)
    prefix_weights, token_weights = prefix_exp / total, token_exp / total
    if dropout is not None:
        prefix_weights = dropout(prefix_weights, deterministic=deterministic)
        token_weights = dropout(token_weights, deterministic=deterministic)
    dtype = v_BxSxHxK.dtype
    return (_prefix_mix(prefix_weights, prefix.value, dtype)
            + jnp.einsum("bhqs,bshk->bqhk", token_weights.astype(dtype), v_BxSxHxK))
