"""Positions and attention masks, derived from padding masks so results never depend on padding side.

Every mask covers `M = P + C` keys: the `P` prefix slots first (always visible unless a query is told
otherwise, as for an infix), then the `C` real key slots (shape letters: `prefix_jax.shapes`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_positions(mask_BxQ: jax.Array, start: jax.Array | int = 0) -> jax.Array:
    """Position of each token counting real tokens only: `start + (#real tokens before it)`.

    Pads get the position of the next real token; they are masked as keys and ignored as queries.
    """
    mask = mask_BxQ.astype(jnp.int32)
    start_Bx1 = jnp.asarray(start, jnp.int32).reshape(-1, 1)  # one start, or one per row
    return start_Bx1 + jnp.cumsum(mask, axis=-1) - mask


def attention_mask(
    key_valid_BxC: jax.Array,
    num_queries: int,
    prefix_len: int = 0,
    causal: bool = False,
    query_offset: jax.Array | int = 0,
    prefix_visible_BxQ: jax.Array | None = None,
) -> jax.Array:
    """Boolean mask `[B, 1, Q, P + C]`.

    `causal` lets query `i` (in slot `query_offset + i` of the key sequence) see key slots `<=` its
    own. `prefix_visible_BxQ` hides the prefix from some queries (infix: source tokens cannot see it).
    """
    batch, num_keys = key_valid_BxC.shape
    keys_BxQxC = jnp.broadcast_to(key_valid_BxC[:, None, :].astype(bool), (batch, num_queries, num_keys))
    if causal:
        query_slot = jnp.asarray(query_offset, jnp.int32) + jnp.arange(num_queries)[:, None]
        keys_BxQxC = keys_BxQxC & (jnp.arange(num_keys)[None, :] <= query_slot)[None]
    if prefix_len:
        if prefix_visible_BxQ is None:
            prefix_BxQxP = jnp.ones((batch, num_queries, prefix_len), bool)
        else:
            prefix_BxQxP = jnp.broadcast_to(prefix_visible_BxQ[:, :, None].astype(bool),
                                            (batch, num_queries, prefix_len))
        keys_BxQxC = jnp.concatenate([prefix_BxQxP, keys_BxQxC], axis=-1)
    return keys_BxQxC[:, None]


def shift_right(ids_BxT: jax.Array, start_id: int) -> jax.Array:
    """Teacher-forcing decoder inputs: `[start, y_0, ..., y_{T-2}]`."""
    start = jnp.full((ids_BxT.shape[0], 1), start_id, ids_BxT.dtype)
    return jnp.concatenate([start, ids_BxT[:, :-1]], axis=1)


# --- Packed rows: several examples per row, told apart by segment ids (1, 2, ...; 0 = padding) ---


def segment_positions(segment_ids_BxQ: jax.Array, start: jax.Array | int = 0) -> jax.Array:
    """Each token's position within its own segment, from `start`: positions restart at every example."""
    seg = segment_ids_BxQ
    slots = jnp.broadcast_to(jnp.arange(seg.shape[1], dtype=jnp.int32), seg.shape)
    first = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    segment_start = jax.lax.cummax(jnp.where(first, slots, 0), axis=1)
    start_Bx1 = jnp.asarray(start, jnp.int32).reshape(-1, 1)
    return start_Bx1 + slots - segment_start


def packed_attention_mask(segment_ids_BxQ: jax.Array, prefix_len: int = 0, causal: bool = True,
                          key_segment_ids_BxC: jax.Array | None = None) -> jax.Array:
    """Boolean mask `[B, 1, Q, P + C]` of a packed row: a token sees the prefix and the tokens of its own segment
    (the earlier ones when `causal`), as if its example were alone; padding sees nothing of the text.

    The keys are the queries' own row (self-attention), or a row of `key_segment_ids_BxC` (cross-attention: a
    target segment sees its own example's source segment)."""
    seg = segment_ids_BxQ
    keys = seg if key_segment_ids_BxC is None else key_segment_ids_BxC
    same_BxQxC = (seg[:, :, None] == keys[:, None, :]) & (keys[:, None, :] > 0)
    if causal:
        same_BxQxC = same_BxQxC & (jnp.arange(keys.shape[1])[None, :] <= jnp.arange(seg.shape[1])[:, None])[None]
    prefix_BxQxP = jnp.ones((seg.shape[0], seg.shape[1], prefix_len), bool)
    return jnp.concatenate([prefix_BxQxP, same_BxQxC], axis=-1)[:, None]


def segment_shift_right(ids_BxT: jax.Array, segment_ids_BxT: jax.Array, start_id: int) -> jax.Array:
    """Teacher-forcing decoder inputs of packed targets: `shift_right` within each segment, so every example's
    first slot reads `start_id`, never the previous example's last token."""
    seg = segment_ids_BxT
    first = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    return jnp.where(first, jnp.asarray(start_id, ids_BxT.dtype), shift_right(ids_BxT, start_id))
