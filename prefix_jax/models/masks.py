"""Positions and attention masks, derived from padding masks so results never depend on padding side.

Every mask covers `M = P + C` keys: the `P` prefix slots first (always visible unless a query is told
otherwise, as for an infix), then the `C` real key slots (shape letters: `prefix_jax.shapes`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


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


# --- Packed rows in query blocks: each block reads a window of keys, not the whole row ---

ATTENTION_BLOCK = 64  # query slots per block (`BlockMask`): small enough to skip most of a wide row's keys


@dataclasses.dataclass(frozen=True)
class BlockMask:
    """The mask of packed rows attended in query blocks (`attention.attend` reads it so): query block i (slots
    `i * block .. (i + 1) * block - 1`) sees the prefix and a window of `span` key blocks ending with its own,
    slots `(i - span + 1) * block .. (i + 1) * block - 1` (`key_windows`; slots before the row's start are
    padding). `visible` is `[B, I, block, P + span * block]`, I = W / block query blocks.

    Exact when no example is longer than `(span - 1) * block + 1` slots: every key a query's own segment holds
    then lies in its window. The scores computed shrink from `W * (P + W)` a row to `W * (P + span * block)`.
    """

    visible: jax.Array
    span: int

    @property
    def block(self) -> int:
        return self.visible.shape[2]

    def replace(self, visible: jax.Array) -> "BlockMask":
        return dataclasses.replace(self, visible=visible)


jax.tree_util.register_dataclass(BlockMask, data_fields=["visible"], meta_fields=["span"])


def key_windows(x_BxWx: jax.Array | np.ndarray, block: int, span: int) -> jax.Array | np.ndarray:
    """`[B, W, ...]` -> `[B, W / block, span * block, ...]`: for each query block, the slots of its key window
    (`BlockMask`), zeros where the window starts before the row. NumPy in (the packer), NumPy out."""
    xp = np if isinstance(x_BxWx, np.ndarray) else jnp
    batch, width = x_BxWx.shape[:2]
    num_blocks = width // block
    padded = xp.pad(x_BxWx, [(0, 0), ((span - 1) * block, 0)] + [(0, 0)] * (x_BxWx.ndim - 2))
    blocks = padded.reshape(batch, num_blocks + span - 1, block, *x_BxWx.shape[2:])
    return xp.concatenate([blocks[:, j:j + num_blocks] for j in range(span)], axis=2)


def window_span(width: int, longest: int, block: int = ATTENTION_BLOCK) -> int:
    """Key blocks per window (`BlockMask`) that hold every key of an example up to `longest` slots in a packed row
    of `width`; 0 when windows would not be smaller than the row (or `block` does not divide it): attend densely."""
    span = window_blocks(longest, block)
    return span if width % block == 0 and span < width // block else 0


def window_blocks(longest: int, block: int = ATTENTION_BLOCK) -> int:
    """Key blocks a window needs to hold every earlier key of a `longest`-slot example for any of its queries."""
    return -(-(longest - 1) // block) + 1


def packed_block_mask(segment_ids_BxW: jax.Array, window_segment_ids_BxIxK: jax.Array,
                      prefix_len: int = 0) -> BlockMask:
    """The causal `BlockMask` of packed decoder-only rows: a token sees the prefix and the earlier tokens of its own
    segment, as `packed_attention_mask`; `window_segment_ids_BxIxK` are the segment ids of each query block's key
    window (`data.token_ids.packed_batch`), its shape fixes the block and the span."""
    batch, width = segment_ids_BxW.shape
    num_blocks, window = window_segment_ids_BxIxK.shape[1:]
    block = width // num_blocks
    span = window // block
    query_seg_BxIxQ = segment_ids_BxW.reshape(batch, num_blocks, block)
    query_slot_IxQ = jnp.arange(width).reshape(num_blocks, block)
    key_slot_IxK = jnp.arange(num_blocks)[:, None] * block + jnp.arange(window)[None, :] - (span - 1) * block
    keys = window_segment_ids_BxIxK[:, :, None, :]
    same_BxIxQxK = ((query_seg_BxIxQ[..., None] == keys) & (keys > 0)
                    & (key_slot_IxK[None, :, None, :] <= query_slot_IxQ[None, :, :, None]))
    prefix_BxIxQxP = jnp.ones((batch, num_blocks, block, prefix_len), bool)
    return BlockMask(jnp.concatenate([prefix_BxIxQxP, same_BxIxQxK], axis=-1), span)


def map_visible(mask: jax.Array | BlockMask, fn: Callable[[jax.Array], jax.Array]) -> jax.Array | BlockMask:
    """`fn` applied to a mask's boolean array (key slots on the last axis): a dense mask or a `BlockMask`'s."""
    return mask.replace(fn(mask.visible)) if isinstance(mask, BlockMask) else fn(mask)
