"""`Batcher`: fixed-shape batches of a tokenized split, addressed by step (train) or enumerated (eval).

Batches are drawn by a seeded per-epoch permutation and addressed by step, so a resumed run sees exactly the
batches an uninterrupted run would have seen; each process materializes only its own rows."""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator

import numpy as np

from prefix_jax.batch import Batch
from prefix_jax.data.buckets import bucket_of, bucket_widths
from prefix_jax.data.records import DataError
from prefix_jax.data.token_ids import (TokenizedSplit, pack_rows, packed_batch, packed_encoder_decoder_batch, pad,
                                      round_up)
from prefix_jax.models import masks


@dataclasses.dataclass
class Batcher:
    """Fixed-shape batches of a tokenized split, addressed by step (train) or enumerated (eval).

    Each process materializes only its own rows of the global batch.
    """

    split: TokenizedSplit
    global_batch_size: int
    source_width: int
    target_width: int
    pad_id: int
    left_pad_source: bool
    seed: int = 0
    process_index: int = 0
    process_count: int = 1
    pack_width: int = 0  # > 0: training batches are `global_batch_size` packed rows of this many tokens
    separator_id: int = 0  # packed decoder-only rows: the token that starts each target (the model's separator)
    encoder_decoder: bool = False  # packed rows: `pack_width` source tokens, their targets in `targets_per_row`
    length_buckets: int = 0  # > 1: eval and decoding batches padded to the smallest of this many widths per side

    def __post_init__(self) -> None:
        if self.global_batch_size % self.process_count:
            raise DataError(f"train.batch_size={self.global_batch_size} must be a multiple of the number of "
                            f"processes ({self.process_count}).")
        self._packed_epochs: dict[int, list[list[int]]] = {}
        self._rows_per_epoch: int | None = None
        self._targets_per_row: int | None = None

    def _pack(self, epoch: int, targets_per_row: int) -> list[list[int]]:
        """Decoder-only rows hold `pack_width` tokens of sources and targets; encoder-decoder rows `pack_width`
        source tokens (their targets go into the decoder's row); both at most `targets_per_row` target tokens."""
        lengths = [len(s) + (0 if self.encoder_decoder else len(t))
                   for s, t in zip(self.split.source_ids, self.split.target_ids)]
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.split))
        return pack_rows(lengths, order, self.pack_width, [len(t) for t in self.split.target_ids], targets_per_row)

    @property
    def targets_per_row(self) -> int:
        """Target slots the loss reads per packed row (K of `packed_batch`; an encoder-decoder's decoder row).

        Decoder-only: the most target tokens a row of the first epoch's packing holds, rounded up to a multiple of
        8 (at most `pack_width`); every epoch is packed with this budget, so the first epoch's rows are exactly
        those packed without it, and a later epoch's row that would hold more targets is closed early.
        Encoder-decoder: as many target tokens per `pack_width` source tokens as the split holds (at least its
        longest target), rounded up to a multiple of 8; a row closes when either side is full, so neither row
        is mostly padding."""
        if self._targets_per_row is None:
            targets = [len(t) for t in self.split.target_ids]
            if self.encoder_decoder:
                sources = max(1, sum(len(s) for s in self.split.source_ids))
                self._targets_per_row = round_up(max(-(-self.pack_width * sum(targets) // sources), max(targets)), 8)
            else:
                fullest = max(sum(targets[i] for i in row) for row in self._pack(0, 0))
                self._targets_per_row = min(self.pack_width, round_up(fullest, 8))
        return self._targets_per_row

    @functools.cached_property
    def window_span(self) -> int:
        """Packed decoder-only rows: key blocks per query block's attention window (`masks.window_span`) that hold
        the split's longest example whole; 0: the whole row (too narrow for windows to pay)."""
        if self.encoder_decoder or not self.pack_width:
            return 0
        longest = max((len(s) + len(t) for s, t in zip(self.split.source_ids, self.split.target_ids)), default=1)
        return masks.window_span(self.pack_width, longest)

    def packed_epoch(self, epoch: int) -> list[list[int]]:
        """The rows (example indices) of `epoch`'s shuffled examples packed `pack_width` tokens (and
        `targets_per_row` target tokens) at a time."""
        if epoch not in self._packed_epochs:
            self._packed_epochs = {epoch: self._pack(epoch, self.targets_per_row)}  # one epoch kept
        return self._packed_epochs[epoch]

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.process_count

    @property
    def steps_per_epoch(self) -> int:
        """Whole global batches per epoch (packed: of the first epoch's rows; later epochs, shuffled otherwise,
        pack into about as many: a shortfall is filled with empty rows, an excess dropped like a partial batch)."""
        if self.pack_width and self._rows_per_epoch is None:
            self._rows_per_epoch = len(self.packed_epoch(0))
        units = self._rows_per_epoch if self.pack_width else len(self.split)
        return units // self.global_batch_size

    def position(self, step: int) -> dict[str, int]:
        """Where in the data step `step` reads: epoch and batch within the epoch."""
        return {"epoch": step // self.steps_per_epoch, "batch": step % self.steps_per_epoch}

    def _rows(self, indices: np.ndarray, source_width: int = 0, target_width: int = 0) -> Batch:
        local = np.array_split(indices, self.process_count)[self.process_index]
        src_ids, src_mask = pad([self.split.source_ids[i] for i in local], source_width or self.source_width,
                                self.pad_id, self.left_pad_source)
        tgt_ids, tgt_mask = pad([self.split.target_ids[i] for i in local], target_width or self.target_width,
                                self.pad_id, False)
        batch = {"source_ids": src_ids, "source_mask": src_mask, "target_ids": tgt_ids, "target_mask": tgt_mask}
        if self.split.task_ids is not None:
            batch["task_ids"] = np.asarray([self.split.task_ids[i] for i in local], np.int32)
        return batch

    def train_batch(self, step: int) -> Batch:
        """This process's rows of the global batch of `step` (epochs reshuffle with seed (seed, epoch))."""
        if self.steps_per_epoch == 0:
            raise DataError(f"the training split has {len(self.split)} examples, fewer than one batch of "
                            f"train.batch_size={self.global_batch_size}.")
        pos = self.position(step)
        start = pos["batch"] * self.global_batch_size
        if self.pack_width:
            rows = self.packed_epoch(pos["epoch"])[start:start + self.global_batch_size]
            rows += [[]] * (self.global_batch_size - len(rows))
            local = [rows[i] for i in np.array_split(np.arange(len(rows)), self.process_count)[self.process_index]]
            if self.encoder_decoder:
                return packed_encoder_decoder_batch(self.split, local, self.pack_width, self.targets_per_row,
                                                    self.pad_id)
            return packed_batch(self.split, local, self.pack_width, self.separator_id, self.pad_id,
                                self.targets_per_row, self.window_span)
        order = np.random.default_rng([self.seed, pos["epoch"]]).permutation(len(self.split))
        return self._rows(order[start:start + self.global_batch_size])

    @property
    def bucket_widths(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The source and target widths eval and decoding batches are padded to (`length_buckets` of each side,
        from this split's lengths; one each, `source_width` and `target_width`, without buckets)."""
        return (bucket_widths([len(s) for s in self.split.source_ids], self.source_width, self.length_buckets),
                bucket_widths([len(t) for t in self.split.target_ids], self.target_width, self.length_buckets))

    def _bucketed(self, indices: list[int], of_example) -> list[tuple[tuple, list[int]]]:
        """`indices` grouped by `of_example(i)` (a bucket key), groups in key order, each in the given order."""
        groups: dict[tuple, list[int]] = {}
        for i in indices:
            groups.setdefault(of_example(i), []).append(i)
        return sorted(groups.items())

    def _eval_groups(self) -> list[tuple[tuple, list[int]]]:
        source_widths, target_widths = self.bucket_widths
        key = lambda i: (bucket_of(len(self.split.source_ids[i]), source_widths),
                         bucket_of(len(self.split.target_ids[i]), target_widths))
        return self._bucketed(list(range(len(self.split))), key)

    @property
    def num_eval_batches(self) -> int:
        """How many batches `eval_batches` yields."""
        return sum(-(-len(members) // self.global_batch_size) for _, members in self._eval_groups())

    def eval_batches(self) -> Iterator[Batch]:
        """Every example once: in order, or with `length_buckets` grouped by bucket (in order within one), each
        batch padded to its bucket's widths; a bucket's last batch is filled with fully masked rows."""
        for (source_width, target_width), members in self._eval_groups():
            for start in range(0, len(members), self.global_batch_size):
                batch = self._rows(np.asarray(members[start:start + self.global_batch_size]), source_width,
                                   target_width)
                short = self.local_batch_size - batch["source_ids"].shape[0]
                if short:
                    batch = {k: np.concatenate([v, np.zeros((short, *v.shape[1:]), v.dtype)])
                             for k, v in batch.items()}
                yield batch

    def source_batches(self, indices: list[int]) -> Iterator[tuple[list[int], Batch]]:
        """For decoding: the sources of `indices` in full global batches (the last row repeated to fill one),
        grouped by source bucket with `length_buckets`; yields (the indices a batch decodes, this process's rows
        `source_ids`, `source_mask` padded to the bucket's width)."""
        source_widths = self.bucket_widths[0]
        key = lambda i: (bucket_of(len(self.split.source_ids[i]), source_widths),)
        size = self.global_batch_size
        for (width,), members in self._bucketed(indices, key):
            for start in range(0, len(members), size):
                chosen = members[start:start + size]
                rows = chosen + [chosen[-1]] * (size - len(chosen))  # full batches: one compiled shape per width
                local = np.array_split(np.asarray(rows), self.process_count)[self.process_index]
                ids, mask = pad([self.split.source_ids[i] for i in local], width, self.pad_id, self.left_pad_source)
                yield chosen, {"source_ids": ids, "source_mask": mask}
