"""The batch: one typed structure from the `data.Batcher` through the prefetcher and the step to the model.

A plain dict at runtime (so `jax.tree` maps over it and `sharding.shard_batch` places it), numpy arrays on the
host, `jax.Array`s once placed. Which fields a batch holds (shape letters as in `prefix_jax.shapes`):

  source_ids, source_mask   `[B, S]` int32 (mask 1 on real tokens)     training, evaluation and decoding
  target_ids, target_mask   `[B, T]` int32                               training and evaluation
  task_ids                  `[B]` int32: each row's prefix in a bank     multi-task data only
  ids, segment_ids          `[B, W]` int32: packed decoder-only rows (`data.packed_batch`)
  target_slots              `[B, K]` int32: packed rows only, the slot whose hidden state predicts each of
                            target_ids / target_mask `[B, K]` (K target slots per row)
  window_segment_ids        `[B, W / block, span * block]` int32: packed decoder-only rows whose attention runs
                            in query blocks, the segment ids of each block's key window (`masks.BlockMask`)
  source_segment_ids        `[B, S]`, `[B, T]` int32: packed encoder-decoder rows
  target_segment_ids          (`data.packed_encoder_decoder_batch`: which example each source_ids / target_ids
                            slot holds, 1, 2, ...; 0 padding; no source_mask)
"""

from __future__ import annotations

from typing import TypedDict, Union

import jax
import numpy as np

Array = Union[jax.Array, np.ndarray]


class Batch(TypedDict, total=False):
    """Field name -> `[B, ...]` array (see the module docstring for which fields a batch holds)."""

    source_ids: Array
    source_mask: Array
    target_ids: Array
    target_mask: Array
    task_ids: Array
    ids: Array
    segment_ids: Array
    target_slots: Array
    window_segment_ids: Array
    source_segment_ids: Array
    target_segment_ids: Array
