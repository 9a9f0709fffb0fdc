"""Multi-head attention that also attends to a per-layer prefix of keys and values.

Shape letters as in `prefix_jax.shapes` (Q queries, C real-token key slots, M = P + C keys).

A prefix is never batched: one `[H, P, K]` key/value pair per layer serves every example, beam and
padding layout, so batch size and beam expansion cannot change it.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

# Finite, so a row whose keys are all masked (a pad query) softmaxes to uniform instead of NaN.
_MASKED_SCORE = -1e30


class KV(NamedTuple):
    """Keys and values of a prefix: `[..., H, P, K]` each (a leading layer axis when stacked)."""

    key: jax.Array
    value: jax.Array


class BankKV(NamedTuple):
    """J prefixes in one array and which one each row uses (see `prefix_jax.prefix_bank`).

    key/value `[..., J, H, P, K]`: prefixes shorter than the longest are right-aligned, their leading
    slots empty; slot_valid `[..., J, P]` marks the real slots; rows `[..., B]` is each row's prefix index.
    (A leading layer axis on all four when stacked, so scanning over layers slices them together.)
    """

    key: jax.Array
    value: jax.Array
    slot_valid: jax.Array
    rows: jax.Array


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


def mask_empty_prefix_slots(prefix: KV | BankKV | None, mask_BxHxQxM: jax.Array) -> jax.Array:
    """Hides a bank's empty slots (the first P mask columns) from every query; other prefixes unchanged."""
    if not isinstance(prefix, BankKV):
        return mask_BxHxQxM
    num_slots = prefix.key.shape[-2]
    valid_BxP = _rows_of(prefix)[2]
    mask_BxHxQxM = jnp.broadcast_to(mask_BxHxQxM, (valid_BxP.shape[0], *mask_BxHxQxM.shape[1:]))
    slots = mask_BxHxQxM[..., :num_slots] & valid_BxP[:, None, None, :]
    return jnp.concatenate([slots, mask_BxHxQxM[..., num_slots:]], axis=-1)


def write_cache(cache: dict, k_BxQxHxK: jax.Array, v_BxQxHxK: jax.Array) -> tuple[jax.Array, jax.Array, dict]:
    """Incremental decoding: this call's keys/values written at `cache["index"]`; returns every cached key/value
    so far (`[B, C, H, K]`, C the cache size) and the updated cache."""
    index = cache["index"]
    k = jax.lax.dynamic_update_slice_in_dim(cache["key"], k_BxQxHxK.astype(cache["key"].dtype), index, axis=1)
    v = jax.lax.dynamic_update_slice_in_dim(cache["value"], v_BxQxHxK.astype(cache["value"].dtype), index, axis=1)
    return k, v, {"key": k, "value": v, "index": index + k_BxQxHxK.shape[1]}


def prepend_prefix(prefix: KV | BankKV | None, k_BxCxHxK: jax.Array,
                   v_BxCxHxK: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Concatenates an unbatched prefix `[H, P, K]` (or each row's prefix of a bank) in front of keys and values."""
    if prefix is None:
        return k_BxCxHxK, v_BxCxHxK
    batch = k_BxCxHxK.shape[0]
    if isinstance(prefix, BankKV):
        key_BxHxPxK, value_BxHxPxK, _ = _rows_of(prefix)
        row = lambda p, like: jnp.swapaxes(p, 1, 2).astype(like.dtype)
        return (jnp.concatenate([row(key_BxHxPxK, k_BxCxHxK), k_BxCxHxK], axis=1),
                jnp.concatenate([row(value_BxHxPxK, v_BxCxHxK), v_BxCxHxK], axis=1))

    def expand(p_HxPxK: jax.Array, like: jax.Array) -> jax.Array:
        # Broadcast, then cast: the gradient's sum over the batch then runs in the prefix's float32, not in a
        # bfloat16 compute dtype (XLA fuses both; no float32 [B, P, H, K] buffer is kept).
        p_PxHxK = jnp.swapaxes(p_HxPxK, 0, 1)
        return jnp.broadcast_to(p_PxHxK[None], (batch, *p_PxHxK.shape)).astype(like.dtype)

    k = jnp.concatenate([expand(prefix.key, k_BxCxHxK), k_BxCxHxK], axis=1)
    v = jnp.concatenate([expand(prefix.value, v_BxCxHxK), v_BxCxHxK], axis=1)
    return k, v


def empty_cache(num_layers: int, num_heads: int, head_dim: int, batch_size: int, capacity: int, dtype: str) -> dict:
    """A layer-stacked `MultiHeadAttention` cache with nothing written: keys/values `[L, B, C, H, K]`, index `[L]`."""
    zeros = jnp.zeros((num_layers, batch_size, capacity, num_heads, head_dim), dtype)
    return {"key": zeros, "value": zeros, "index": jnp.zeros((num_layers,), jnp.int32)}


def attend(
    q_BxQxHxK: jax.Array,
    k_BxMxHxK: jax.Array,
    v_BxMxHxK: jax.Array,
    mask_BxHxQxM: jax.Array,
    bias_BxHxQxM: jax.Array | None,
    scale: float,
    dropout: nn.Dropout | None = None,
    deterministic: bool = True,
) -> jax.Array:
    """Scaled dot-product attention with a boolean mask and an optional additive bias.

    Scores and softmax run in float32 whatever the compute dtype. `M` = P + C keys. Mask and bias
    broadcast over any axis of size one.
    """
    scores = jnp.einsum("bqhk,bmhk->bhqm", q_BxQxHxK, k_BxMxHxK, preferred_element_type=jnp.float32)
    scores = scores * scale
    if bias_BxHxQxM is not None:
        scores = scores + bias_BxHxQxM.astype(jnp.float32)
    scores = jnp.where(mask_BxHxQxM, scores, _MASKED_SCORE)
    weights = jax.nn.softmax(scores, axis=-1)
    if dropout is not None:
        weights = dropout(weights, deterministic=deterministic)
    return jnp.einsum("bhqm,bmhk->bqhk", weights.astype(v_BxMxHxK.dtype), v_BxMxHxK)


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
        self.dropout = nn.Dropout(self.dropout_rate) if self.dropout_rate > 0 else None

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
        k, v = prepend_prefix(prefix, k, v)
        mask_BxHxQxM = mask_empty_prefix_slots(prefix, mask_BxHxQxM)
        y = attend(q, k, v, mask_BxHxQxM, bias_BxHxQxM, self.query_scale, self.dropout, deterministic)
        return self.out(y), cache


def _placement_of(path: Sequence[Any]) -> str:
    """The placement whose attention sowed the K/V at `path` (from the module names the models use)."""
    from prefix_jax.models.interface import CROSS, DECODER, ENCODER  # interface imports KV from here

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
