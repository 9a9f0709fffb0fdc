"""Multi-head attention that also attends to a per-layer prefix of keys and values.

Shape letters as in `prefix_jax.shapes` (Q queries, C real-token key slots, M = P + C keys).

A prefix is never batched: one `[H, P, K]` key/value pair per layer serves every example, beam and
padding layout, so batch size and beam expansion cannot change it. Nor is it copied in front of the keys:
`attend` reads it as its own block of keys (see there), so a decoding cache holds real tokens only.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from prefix_jax.models import fused_attention, masks
from prefix_jax.models.dropout import Dropout
from prefix_jax.models.prefix_contract import CROSS, DECODER, ENCODER, KV, BankKV

# Finite, so a row whose keys are all masked (a pad query) softmaxes to uniform instead of NaN.
_MASKED_SCORE = -1e30


def _rows_of(bank: BankKV) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per row: key, value `[B, H, P, K]` and slot validity `[B, P]` (one layer's bank)."""
    return bank.key[bank.rows], bank.value[bank.rows], bank.slot_valid[bank.rows]


def tokens_after_prefix(prefix: KV | BankKV | None) -> int | jax.Array:
    """How many prefix slots precede the real tokens: P, or per row `[B]` for a bank (its own length)."""
    if prefix is None:
        return 0
    if isinstance(prefix, BankKV):
        valid_JxP = prefix.slot_valid.reshape(-1, *prefix.slot_valid.shape[-2:])[0]
        rows_B = prefix.rows.reshape(-1, prefix.rows.shape[-1])[0]
        return jnp.sum(valid_JxP, axis=-1).astype(jnp.int32)[rows_B]
    return prefix.key.shape[-2]


def write_cache(cache: dict, k_BxQxHxK: jax.Array, v_BxQxHxK: jax.Array) -> tuple[jax.Array, jax.Array, dict]:
    """Incremental decoding: this call's keys/values written at `cache["index"]`; returns every cached key/value
    so far (`[B, C, H, K]`, C the cache size) and the updated cache."""
    index = cache["index"]
    k = jax.lax.dynamic_update_slice_in_dim(cache["key"], k_BxQxHxK.astype(cache["key"].dtype), index, axis=1)
    v = jax.lax.dynamic_update_slice_in_dim(cache["value"], v_BxQxHxK.astype(cache["value"].dtype), index, axis=1)
    return k, v, {"key": k, "value": v, "index": index + k_BxQxHxK.shape[1]}


def empty_cache(num_layers: int, num_heads: int, head_dim: int, batch_size: int, capacity: int, dtype: str) -> dict:
    """A layer-stacked `MultiHeadAttention` cache with nothing written: keys/values `[L, B, C, H, K]`, index `[L]`."""
    zeros = jnp.zeros((num_layers, batch_size, capacity, num_heads, head_dim), dtype)
    return {"key": zeros, "value": zeros, "index": jnp.zeros((num_layers,), jnp.int32)}


def _by_kv_head(x_BxHxQxM: jax.Array | None, num_kv_heads: int) -> jax.Array | None:
    """A mask or bias `[B, H or 1, Q, M]` as `[B, N, G, Q, M]` (or `[B, 1, 1, Q, M]`), to match grouped queries."""
    if x_BxHxQxM is None or x_BxHxQxM.shape[1] == 1:
        return None if x_BxHxQxM is None else x_BxHxQxM[:, :, None]
    batch, num_heads, *rest = x_BxHxQxM.shape
    return x_BxHxQxM.reshape(batch, num_kv_heads, num_heads // num_kv_heads, *rest)


def _prefix_block(prefix: KV | BankKV, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """The prefix as attention reads it: key, value `[N, P, K]` (shared) or `[B, N, P, K]` (a bank's rows, each
    its own prefix), and for a bank which slots are real `[B, P]` (None: all)."""
    if isinstance(prefix, BankKV):
        key, value, valid_BxP = _rows_of(prefix)
    else:
        key, value, valid_BxP = prefix.key, prefix.value, None
    return key.astype(dtype), value.astype(dtype), valid_BxP


def attend(
    q_BxQxHxK: jax.Array,
    k_BxCxNxK: jax.Array,
    v_BxCxNxK: jax.Array,
    mask_BxHxQxM: jax.Array,
    bias_BxHxQxM: jax.Array | None,
    scale: float,
    dropout: Dropout | None = None,
    deterministic: bool = True,
    prefix: KV | BankKV | None = None,
    kernel: str = "einsum",
    softcap: float | None = None,
) -> jax.Array:
    """Scaled dot-product attention over an optional prefix and the keys, with a boolean mask and an additive bias.

    `M = P + C`: mask and bias cover the P prefix slots first, then the C keys (as `masks.attention_mask`
    makes them); they broadcast over any axis of size one, and their head axis is H or 1. Grouped-query
    attention when the keys have N < H heads: query head `h` reads key/value head `h // G`, nothing repeated.

    The prefix (`[N, P, K]` for every row, or a bank's per-row prefixes, whose empty slots are masked) is
    never copied in front of the keys: its scores and the tokens' are two blocks sharing one float32
    softmax, `softmax([s_p; s_c]) @ [v_p; v_c] = (exp(s_p - m) @ v_p + exp(s_c - m) @ v_c) / z`, with `m` the
    maximum and `z` the sum over both blocks. So no `[B, P + C, N, K]` copy exists per layer and step, in
    training or when decoding. With attention dropout on, each block draws its own dropout mask: the same
    distribution as dropout on the concatenated weights, other random numbers.

    `softcap` (Gemma 2's `attn_logit_softcapping`): scaled scores become `softcap * tanh(s / softcap)` before
    the bias and the mask, as HF computes them; only the "einsum" path implements it.

    `kernel` (`model.attention_kernel`): "einsum" is what is described above; "jax" and "cudnn" hand the call to
    `jax.nn.dot_product_attention` (`fused_attention.attend`: the prefix copied in front of the keys) unless
    attention dropout is active, which only this path implements.
    """
    if isinstance(mask_BxHxQxM, masks.BlockMask):
        return _attend_in_blocks(q_BxQxHxK, k_BxCxNxK, v_BxCxNxK, mask_BxHxQxM, bias_BxHxQxM, scale, dropout,
                                 deterministic, prefix, kernel, softcap)
    if kernel != "einsum" and softcap is not None:
        raise ValueError(f"attention soft-capping is only implemented by model.attention_kernel='einsum', not "
                         f"{kernel!r}.")
    if kernel != "einsum" and (dropout is None or deterministic):
        block = None if prefix is None else _prefix_block(prefix, k_BxCxNxK.dtype)
        return fused_attention.attend(q_BxQxHxK, k_BxCxNxK, v_BxCxNxK, mask_BxHxQxM, bias_BxHxQxM, scale, kernel,
                                      block)
    batch, num_queries, num_heads, head_dim = q_BxQxHxK.shape
    num_kv_heads = k_BxCxNxK.shape[2]
    q = q_BxQxHxK.reshape(batch, num_queries, num_kv_heads, num_heads // num_kv_heads, head_dim)
    mask, bias = _by_kv_head(mask_BxHxQxM, num_kv_heads), _by_kv_head(bias_BxHxQxM, num_kv_heads)
    prefix_len = 0 if prefix is None else prefix.key.shape[-2]

    def scores(raw_BxNxGxQxX: jax.Array, slots: slice, valid_BxX: jax.Array | None = None) -> jax.Array:
        raw_BxNxGxQxX = raw_BxNxGxQxX * scale
        if softcap is not None:
            raw_BxNxGxQxX = softcap * jnp.tanh(raw_BxNxGxQxX / softcap)
        if bias is not None:
            raw_BxNxGxQxX = raw_BxNxGxQxX + bias[..., slots].astype(jnp.float32)
        visible = mask[..., slots]
        if valid_BxX is not None:
            visible = visible & valid_BxX[:, None, None, None, :]
        return jnp.where(visible, raw_BxNxGxQxX, _MASKED_SCORE)

    token_scores = scores(jnp.einsum("bqngk,bcnk->bngqc", q, k_BxCxNxK, preferred_element_type=jnp.float32),
                          slice(prefix_len, None))
    mix = lambda weights, pattern, value: jnp.einsum(pattern, weights.astype(value.dtype), value)
    if prefix is None:
        token_weights = jax.nn.softmax(token_scores, axis=-1)
        if dropout is not None:
            token_weights = dropout(token_weights, deterministic=deterministic)
        y = mix(token_weights, "bngqc,bcnk->bqngk", v_BxCxNxK)
        return y.reshape(batch, num_queries, num_heads, head_dim)

    key, value, valid_BxP = _prefix_block(prefix, k_BxCxNxK.dtype)
    shared = key.ndim == 3  # else one prefix per row (a bank)
    prefix_scores = scores(jnp.einsum("bqngk,npk->bngqp" if shared else "bqngk,bnpk->bngqp", q, key,
                                      preferred_element_type=jnp.float32), slice(None, prefix_len), valid_BxP)
    top = jax.lax.stop_gradient(jnp.maximum(prefix_scores.max(-1, keepdims=True), token_scores.max(-1, keepdims=True)))
    prefix_exp, token_exp = jnp.exp(prefix_scores - top), jnp.exp(token_scores - top)
    total = prefix_exp.sum(-1, keepdims=True) + token_exp.sum(-1, keepdims=True)
    prefix_weights, token_weights = prefix_exp / total, token_exp / total
    if dropout is not None:
        prefix_weights = dropout(prefix_weights, deterministic=deterministic)
        token_weights = dropout(token_weights, deterministic=deterministic)
    y = (mix(prefix_weights, "bngqp,npk->bqngk" if shared else "bngqp,bnpk->bqngk", value)
         + mix(token_weights, "bngqc,bcnk->bqngk", v_BxCxNxK))
    return y.reshape(batch, num_queries, num_heads, head_dim)


def _attend_in_blocks(q_BxWxHxK, k_BxWxNxK, v_BxWxNxK, mask: masks.BlockMask, bias, scale, dropout, deterministic,
                      prefix, kernel, softcap) -> jax.Array:
    """`attend` over packed rows in query blocks: each block of queries against its window of keys
    (`masks.BlockMask`), the blocks as rows of one batched `attend`, the prefix shared by all."""
    if bias is not None or isinstance(prefix, BankKV):
        raise ValueError("attention in query blocks (packed rows) takes no additive bias and one shared prefix.")
    batch, width, num_heads, head_dim = q_BxWxHxK.shape
    num_blocks, block, span = width // mask.block, mask.block, mask.span
    as_rows = lambda x: x.reshape(batch * num_blocks, *x.shape[2:])
    y = attend(as_rows(q_BxWxHxK.reshape(batch, num_blocks, block, num_heads, head_dim)),
               as_rows(masks.key_windows(k_BxWxNxK, block, span)), as_rows(masks.key_windows(v_BxWxNxK, block, span)),
               as_rows(mask.visible)[:, None], None, scale, dropout, deterministic, prefix, kernel, softcap)
    return y.reshape(batch, width, num_heads, head_dim)


class MultiHeadAttention(nn.Module):
    """Projections + `attend`, with an optional prefix K/V and an optional decoding cache.

    `query_scale` multiplies the scores (T5 folds it into its initialisation and uses 1.0).
    With `cache` (keys/values `[B, C, H, K]` and an int32 `index`), the new keys are written at
    `index` and attention runs over the whole cache; the caller's mask hides unwritten slots.
    """

    num_heads: int
    head_dim: int
    out_features: int
    use_bias: bool
    query_scale: float
    dropout_rate: float = 0.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention_kernel: str = "einsum"  # see `attend`

    def setup(self) -> None:
        def heads(name: str) -> nn.DenseGeneral:
            return nn.DenseGeneral(
                (self.num_heads, self.head_dim),
                use_bias=self.use_bias,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=name,
            )

        self.query, self.key, self.value = heads("query"), heads("key"), heads("value")
        self.out = nn.DenseGeneral(
            self.out_features,
            axis=(-2, -1),
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="out",
        )
        self.dropout = Dropout(self.dropout_rate) if self.dropout_rate > 0 else None

    def project_kv(self, x_BxCxD: jax.Array) -> KV:
        """Keys and values of `x` in `[B, C, H, K]` (used to precompute cross-attention memory)."""
        return KV(self.key(x_BxCxD), self.value(x_BxCxD))

    def __call__(
        self,
        x_BxQxD: jax.Array,
        memory: jax.Array | KV | None,
        mask_BxHxQxM: jax.Array,
        bias_BxHxQxM: jax.Array | None = None,
        prefix: KV | BankKV | None = None,
        cache: dict | None = None,
        deterministic: bool = True,
    ) -> tuple[jax.Array, dict | None]:
        """Attends from `x` to `memory` (self-attention when None; precomputed K/V when a `KV`)."""
        q = checkpoint_name(self.query(x_BxQxD), "query")  # names saved by remat policy "minimal"
        if isinstance(memory, KV):
            k, v = memory
        else:
            k, v = self.project_kv(x_BxQxD if memory is None else memory)
            k, v = checkpoint_name(k, "key"), checkpoint_name(v, "value")
        # Real-token keys/values, for callers that read them (`mutable=["intermediates"]`): prefix init from text.
        self.sow("intermediates", "key_value", KV(k, v))
        if cache is not None:
            k, v, cache = write_cache(cache, k, v)
        y = attend(q, k, v, mask_BxHxQxM, bias_BxHxQxM, self.query_scale, self.dropout, deterministic, prefix,
                   self.attention_kernel)
        return self.out(y), cache


def _placement_of(path: Sequence[Any]) -> str:
    """The placement whose attention sowed the K/V at `path` (from the module names the models use)."""
    names = [str(getattr(k, "key", k)) for k in path]
    if "cross_attention" in names:
        return CROSS
    return ENCODER if "encoder" in names else DECODER


def collect_kv(intermediates: Any, length: int, start: int = 0) -> dict[str, KV]:
    """Per placement, the real-token K/V `MultiHeadAttention` sowed (`mutable=["intermediates"]`) for slots
    `start .. start+length` of row 0: `[layers, H, P, K]`."""
    found: dict[str, KV] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(intermediates, is_leaf=lambda x: isinstance(x, KV))[0]:
        if isinstance(leaf, KV):  # [L, B, C, H, K] -> [L, H, P, K]
            found[_placement_of(path)] = KV(*(jnp.transpose(x[:, 0, start:start + length], (0, 2, 1, 3))
                                               for x in leaf))
    return found
