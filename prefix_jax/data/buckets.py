"""Length buckets: a few static widths, chosen from the data's lengths, so that evaluation and decoding batches
are padded to the smallest width that fits their rows instead of the split's longest (each width is one compiled
program; there are at most `count` per side)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def bucket_widths(lengths: Sequence[int], cap: int, count: int) -> tuple[int, ...]:
    """At most `count` increasing widths: the lengths' quantiles 1/count, 2/count, ..., 1 (the longest) rounded up
    to a multiple of 8, at most `cap` (rows are never longer than `cap`), so every row fits one.
    `count` <= 1: `(cap,)`, what unbucketed batches use."""
    if count <= 1 or not len(lengths):
        return (cap,)
    quantiles = np.quantile(np.asarray(lengths), np.arange(1, count + 1) / count, method="higher")
    return tuple(sorted({min(cap, max(8, -(-int(q) // 8) * 8)) for q in quantiles}))


def bucket_of(length: int, widths: Sequence[int]) -> int:
    """The smallest of `widths` (increasing) that holds `length` (the last one when none does)."""
    return next((w for w in widths if length <= w), widths[-1])
