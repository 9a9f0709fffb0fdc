"""Examples -> token ids (truncated, counted), and ids -> fixed-width padded or packed rows."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import numpy as np

from prefix_jax.batch import Batch
from prefix_jax.data.records import DataError, Example
from prefix_jax.models import masks


@dataclasses.dataclass
class TokenizedSplit:
    """Token ids of a split; ragged until batched."""

    source_ids: list[list[int]]
    target_ids: list[list[int]]
    examples: list[Example]
    task_ids: list[int] | None = None  # multi-task: each example's prefix index (batches carry it)

    def __len__(self) -> int:
        return len(self.source_ids)


def tokenize(examples: Sequence[Example], tokenizer: Any, max_source_length: int, max_target_length: int,
             encoder_decoder: bool, source_prefix: str = "", target_prefix: str = "", name: str = "") -> TokenizedSplit:
    """Source and target ids, truncated (with `name`, how many were cut is logged). Encoder-decoders get the
    tokenizer's special tokens (T5: `</s>`, BART: `<s> ... </s>`); decoder-only targets end with EOS (the
    separator is added by the model)."""
    sources = [source_prefix + e.source for e in examples]
    targets = [target_prefix + e.target for e in examples]
    if encoder_decoder:
        src_full = tokenizer(sources)["input_ids"]
        tgt_full = tokenizer(targets)["input_ids"]
        src = _truncated(tokenizer, sources, src_full, max_source_length)
        tgt = _truncated(tokenizer, targets, tgt_full, max_target_length)
    else:
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no eos token; decoder-only targets need one to end generation.")
        src_full = tokenizer(sources, add_special_tokens=False)["input_ids"]
        tgt_full = [ids + [tokenizer.eos_token_id] for ids in tokenizer(targets, add_special_tokens=False)["input_ids"]]
        src = [ids[:max_source_length] for ids in src_full]
        tgt = [_cut(ids, max_target_length) for ids in tgt_full]
    if name:
        for what, full, limit, field in (("sources", src_full, max_source_length, "data.max_source_length"),
                                         ("targets", tgt_full, max_target_length, "data.max_target_length")):
            cut = sum(len(ids) > limit for ids in full)
            if cut:
                logging.getLogger("prefix_jax").warning(
                    "%s: %d of %d %s are longer than %s=%d tokens and were truncated (the longest has %d)", name, cut,
                    len(full), what, field, limit, max(len(ids) for ids in full))
    return TokenizedSplit(list(src), list(tgt), list(examples))


def _cut(ids: Sequence[int], limit: int) -> list[int]:
    """`ids` cut to `limit` tokens, keeping the last one (the EOS the sequence ends with)."""
    ids = list(ids)
    return ids if len(ids) <= limit else ids[:limit - 1] + ids[-1:]


def _truncated(tokenizer: Any, texts: Sequence[str], full: Sequence[list[int]], limit: int) -> list[list[int]]:
    """`full` with the rows longer than `limit` tokenized again by the tokenizer's own truncation (which keeps
    its special tokens)."""
    long = [i for i, ids in enumerate(full) if len(ids) > limit]
    out = [list(ids) for ids in full]
    if long:
        cut = tokenizer([texts[i] for i in long], truncation=True, max_length=limit)["input_ids"]
        for i, ids in zip(long, cut):
            out[i] = list(ids)
    return out


def round_up(n: int, multiple: int) -> int:
    """`n` rounded up to a multiple of `multiple`."""
    return -(-n // multiple) * multiple


def padded_lengths(split: TokenizedSplit, max_source_length: int, max_target_length: int) -> tuple[int, int]:
    """Static batch widths: the longest sequence rounded up to a multiple of 8, capped by the maxima."""
    longest_source = max((len(s) for s in split.source_ids), default=1)
    longest_target = max((len(t) for t in split.target_ids), default=1)
    return (min(max_source_length, round_up(longest_source, 8)), min(max_target_length, round_up(longest_target, 8)))


def pad(rows: Sequence[Sequence[int]], width: int, pad_id: int, left: bool) -> tuple[np.ndarray, np.ndarray]:
    """Ragged ids -> `[N, width]` ids and 0/1 mask, padded on the left or the right."""
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        row = list(row)[:width]
        sl = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, sl] = row
        mask[i, sl] = 1
    return ids, mask


def pack_rows(lengths: Sequence[int], order: Sequence[int], width: int, target_lengths: Sequence[int] = (),
              targets_per_row: int = 0) -> list[list[int]]:
    """Example indices packed into rows of at most `width` tokens, in `order`: each example joins the current
    row when it fits, else starts the next one (deterministic; the order within and across rows is kept).

    `targets_per_row` > 0 (with each example's `target_lengths`): a row also holds at most that many target tokens,
    the static number of slots the loss reads per row (`packed_batch`)."""
    rows: list[list[int]] = []
    used = used_targets = width
    for i in order:
        targets = target_lengths[i] if targets_per_row else 0
        if lengths[i] > width:
            raise DataError(f"an example of {lengths[i]} tokens does not fit data.pack_width={width}; raise it.")
        if targets > targets_per_row:
            raise DataError(f"an example with {targets} target tokens does not fit {targets_per_row} target slots "
                            "per packed row.")
        if used + lengths[i] > width or (targets_per_row and used_targets + targets > targets_per_row):
            rows.append([])
            used = used_targets = 0
        rows[-1].append(int(i))
        used += lengths[i]
        used_targets += targets
    return rows


def packed_batch(split: TokenizedSplit, rows: Sequence[Sequence[int]], width: int, separator_id: int,
                 pad_id: int, targets_per_row: int = 0, window_span: int = 0,
                 block: int = masks.ATTENTION_BLOCK) -> Batch:
    """Packed decoder-only rows: each example's `[x; SEP; y[:-1]]` after the previous one (`ids`), which example
    each slot holds (`segment_ids`: 1, 2, ...; 0 padding), and the targets compacted to `targets_per_row` (K;
    0: `width`) entries per row: `target_slots` `[B, K]` says which slot predicts each of `target_ids` (counted
    where `target_mask` is 1: the target side of each example, as in unpacked batches; unused entries point at
    slot 0, masked). The loss then reads K slots of a row, not all `width`.

    `window_span` > 0 (`masks.window_span` of the split's longest example): `window_segment_ids`
    `[B, W / block, window_span * block]`, the segment ids of each query block's key window, so the model attends in
    blocks of `block` queries over windows (`masks.BlockMask`) instead of over the whole row."""
    targets_per_row = targets_per_row or width
    shape, compact = (len(rows), width), (len(rows), targets_per_row)
    ids, segment_ids = np.full(shape, pad_id, np.int32), np.zeros(shape, np.int32)
    target_slots, target_ids = np.zeros(compact, np.int32), np.full(compact, pad_id, np.int32)
    target_mask = np.zeros(compact, np.int32)
    for r, indices in enumerate(rows):
        start = filled = 0
        for segment, i in enumerate(indices, start=1):
            source, target = list(split.source_ids[i]), list(split.target_ids[i])
            sequence = source + [separator_id] + target[:-1]
            end = start + len(sequence)
            ids[r, start:end], segment_ids[r, start:end] = sequence, segment
            if filled + len(target) > targets_per_row:
                raise DataError(f"packed row {r} holds more than {targets_per_row} target tokens; pack it with "
                                "pack_rows(..., targets_per_row).")
            target_slots[r, filled:filled + len(target)] = np.arange(start + len(source), end)
            target_ids[r, filled:filled + len(target)], target_mask[r, filled:filled + len(target)] = target, 1
            start, filled = end, filled + len(target)
    batch = {"ids": ids, "segment_ids": segment_ids, "target_slots": target_slots, "target_ids": target_ids,
             "target_mask": target_mask}
    if window_span:
        longest = max((len(split.source_ids[i]) + len(split.target_ids[i]) for row in rows for i in row), default=0)
        if masks.window_blocks(longest, block) > window_span:
            raise DataError(f"an example of {longest} tokens does not fit attention windows of {window_span} blocks "
                            f"of {block}.")
        batch["window_segment_ids"] = masks.key_windows(segment_ids, block, window_span)
    return batch


def packed_encoder_decoder_batch(split: TokenizedSplit, rows: Sequence[Sequence[int]], source_width: int,
                                 target_width: int, pad_id: int) -> Batch:
    """Packed encoder-decoder rows (as T5X packs them): each row's examples' sources one after another in
    `source_ids` `[B, source_width]` and their targets, in the same order, in `target_ids` / `target_mask`
    `[B, target_width]`; `source_segment_ids` and `target_segment_ids` say which example each slot holds (1, 2, ...
    in both rows; 0: padding). The model shifts each target right within its segment."""
    source_ids, target_ids = np.full((len(rows), source_width), pad_id, np.int32), np.full((len(rows), target_width),
                                                                                           pad_id, np.int32)
    source_segments, target_segments = np.zeros_like(source_ids), np.zeros_like(target_ids)
    for r, indices in enumerate(rows):
        for side, ids, segments, width in (("source", source_ids, source_segments, source_width),
                                           ("target", target_ids, target_segments, target_width)):
            start = 0
            for segment, i in enumerate(indices, start=1):
                tokens = (split.source_ids if side == "source" else split.target_ids)[i]
                if start + len(tokens) > width:
                    raise DataError(f"packed row {r} holds more than {width} {side} tokens; pack it with pack_rows.")
                ids[r, start:start + len(tokens)], segments[r, start:start + len(tokens)] = tokens, segment
                start += len(tokens)
    return {"source_ids": source_ids, "source_segment_ids": source_segments, "target_ids": target_ids,
            "target_mask": (target_segments > 0).astype(np.int32), "target_segment_ids": target_segments}
