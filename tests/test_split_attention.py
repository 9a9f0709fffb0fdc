"""Two-block attention (prefix, tokens; one softmax) == the concatenating attention of the models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import F32_ATOL

from prefix_jax.models import masks
from prefix_jax.models.attention import attend
from prefix_jax.models.prefix_contract import KV, BankKV

B, Q, S, P, H, K = 3, 5, 6, 4, 2, 8


def case(seed: int = 0, per_row_prefix: bool = False):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    q, k, v = normal(B, Q, H, K), normal(B, S, H, K), normal(B, S, H, K)
    prefix_shape = (B, H, P, K) if per_row_prefix else (H, P, K)
    prefix = KV(3.0 * normal(*prefix_shape), normal(*prefix_shape))  # larger prefix scores: the max sits there
    valid = jnp.asarray(np.arange(S)[None] < np.array([S, 3, 1])[:, None])  # padding; row 2: one real key
    visible = jnp.asarray(rng.random((B, Q)) < 0.7)  # infix-style: some queries cannot see the prefix
    mask = masks.attention_mask(valid, Q, P, causal=True, query_offset=1, prefix_visible_BxQ=visible)
    bias = normal(1, H, Q, P + S)  # T5-style relative bias, broadcast over the batch
    return q, k, v, prefix, mask, bias


def attend_with_prefix(q, k, v, prefix, mask, bias, scale):
    """The models' path: the prefix as its own block of keys."""
    return attend(q, k, v, mask, bias, scale, prefix=prefix)


def concatenating(q, k, v, prefix, mask, bias, scale):
    """The reference: the prefix broadcast to every row (a per-row prefix row by row) and concatenated in front."""
    if prefix is not None:
        rows = lambda p: jnp.swapaxes(jnp.broadcast_to(p, (B, *p.shape[-3:])), 1, 2)
        k, v = jnp.concatenate([rows(prefix.key), k], 1), jnp.concatenate([rows(prefix.value), v], 1)
    return attend(q, k, v, mask, bias, scale)


@pytest.mark.parametrize("per_row_prefix", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_equals_concatenating_attention_with_masks_and_bias(per_row_prefix, with_bias):
    q, k, v, prefix, mask, bias = case(per_row_prefix=per_row_prefix)
    bias = bias if with_bias else None
    ref = concatenating(q, k, v, prefix, mask, bias, K**-0.5)
    ours = attend_with_prefix(q, k, v, prefix, mask, bias, K**-0.5)
    np.testing.assert_allclose(ours, ref, atol=2e-6)


def test_gradients_equal_for_prefix_queries_and_keys():
    q, k, v, prefix, mask, bias = case(1)
    loss = lambda f: lambda q, k, v, prefix: jnp.sum(jnp.sin(f(q, k, v, prefix, mask, bias, 1.0)))
    ref = jax.grad(loss(concatenating), argnums=(0, 1, 2, 3))(q, k, v, prefix)
    ours = jax.grad(loss(attend_with_prefix), argnums=(0, 1, 2, 3))(q, k, v, prefix)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, atol=F32_ATOL)


def test_no_prefix_is_plain_attention_and_bfloat16_stays_close():
    q, k, v, prefix, mask, bias = case(2)
    token_mask = mask[..., P:]
    np.testing.assert_array_equal(attend_with_prefix(q, k, v, None, token_mask, None, 0.5),
                                  attend(q, k, v, token_mask, None, 0.5))
    bf = lambda x: x.astype(jnp.bfloat16)
    ref = concatenating(q, k, v, prefix, mask, bias, K**-0.5)
    ours = attend_with_prefix(bf(q), bf(k), bf(v), KV(bf(prefix.key), bf(prefix.value)), mask, bias, K**-0.5)
    assert ours.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(ours, np.float32), ref, atol=0.1)


def test_the_prefix_is_never_broadcast_to_the_batch():
    q, k, v, prefix, mask, bias = case(3)
    hlo = jax.jit(attend_with_prefix, static_argnums=(6,)).lower(q, k, v, prefix, mask, bias, 1.0).as_text()
    assert f"tensor<{B}x{P + S}x{H}x{K}x" not in hlo  # no [B, P + S, H, K] keys or values
    ref_hlo = jax.jit(concatenating, static_argnums=(6,)).lower(q, k, v, prefix, mask, bias, 1.0).as_text()
    assert f"tensor<{B}x{P + S}x{H}x{K}x" in ref_hlo  # (the check can see the copy where there is one)


def test_bank_rows_attend_to_their_own_prefix_and_never_to_empty_slots():
    """A bank's prefixes are right-aligned in P slots; a row sees only its prefix's real slots, as if that
    prefix (and no padding) were concatenated in front of its keys."""
    q, k, v, _, mask, bias = case(4)
    rng = np.random.default_rng(4)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    lengths = [P, 2]  # prefix 1 leaves its first P - 2 slots empty
    valid = jnp.asarray([[s >= P - n for s in range(P)] for n in lengths])
    bank = BankKV(3.0 * normal(2, H, P, K), normal(2, H, P, K), valid, jnp.asarray([1, 0, 1]))
    ours = attend(q, k, v, mask, bias, K**-0.5, prefix=bank)
    for b in range(B):
        j = int(bank.rows[b])
        start = P - lengths[j]
        own = KV(bank.key[j, :, start:][None], bank.value[j, :, start:][None])  # [1, H, P_j, K]
        row = lambda x: x[b:b + 1]
        ref = attend(row(q), *(jnp.concatenate([jnp.swapaxes(p, 1, 2), row(x)], 1) for p, x in zip(own, (k, v))),
                     row(mask)[..., start:], bias[..., start:], K**-0.5)
        np.testing.assert_allclose(ours[b:b + 1], ref, atol=2e-6)


def test_grouped_query_heads_read_their_key_value_head_and_prefix():
    """N < H key/value heads (and an N-head prefix): equal to plain attention with each K/V head repeated for its
    G = H / N query heads; a per-head mask and bias are grouped the same way."""
    q, _, _, _, _, _ = case(5)
    rng = np.random.default_rng(5)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    num_kv = 2  # G = 2 query heads per K/V head
    q = normal(B, Q, 4, K)  # H = 4 query heads
    k, v = normal(B, S, num_kv, K), normal(B, S, num_kv, K)
    prefix = KV(3.0 * normal(num_kv, P, K), normal(num_kv, P, K))
    valid = jnp.asarray(np.arange(S)[None] < np.array([S, 3, 1])[:, None])
    mask = masks.attention_mask(valid, Q, P, causal=True, query_offset=1)
    mask = mask & jnp.asarray(rng.random((B, 4, Q, P + S)) < 0.8)  # a different mask per query head
    bias = normal(1, 4, Q, P + S)
    repeat = lambda x, axis: jnp.repeat(x, 4 // num_kv, axis=axis)
    ref = concatenating(q, repeat(k, 2), repeat(v, 2), KV(repeat(prefix.key, 0), repeat(prefix.value, 0)), mask,
                        bias, K**-0.5)
    np.testing.assert_allclose(attend(q, k, v, mask, bias, K**-0.5, prefix=prefix), ref, atol=2e-6)
