"""The vocabulary matrices of a quantized frozen LM (the token embedding table `[V, D]`, which a tied LM head
also reads, and an untied LM head kernel `[D, V]`), read without ever making a float copy of the whole matrix.

A quantized matrix is a params leaf with an `.array` holding `qvalue` (int8 / int4 / uint4, the matrix's shape),
`scale` (one per group: per axis, `qvalue.shape[a] // scale.shape[a]` consecutive values share it) and, for a
GGUF Q4_1 block, `min`; its weights are `qvalue * scale (+ min)` (`prefix_jax.quantize` makes these leaves: a
qwix `WithAux(QArray)` with one scale per vocabulary row (int8) or per group along the width (int4), or a
GGUF file's own blocks). Here nothing imports qwix: the leaf is read by its fields.

- `lookup`: the rows of the gathered token ids, each dequantized alone (`[..., D]`).
- `logits`: `h @ W` over the vocabulary in blocks of rows (at least `MIN_BLOCKS` of them, at most `BLOCK_BYTES`
  of float weights each; a block takes a run of rows from each device's part of a matrix split along its
  vocabulary, so that each device reads its own rows in place): each block is dequantized, multiplied and
  dropped, and the backward pass recomputes it (`jax.checkpoint`), so the float temporaries are a few blocks,
  never the matrix (a training step on CPU holds about three blocks at once: measured on the tiny Llama,
  tests/test_quantized_run.py). As the head, int8's per-row scale is a per-output-channel scale.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

BLOCK_BYTES = 2**23  # float weights dequantized at once by `logits`, at most (8 MiB: 3.6k rows of SmolLM2's 576)
MIN_BLOCKS = 8  # so that the few blocks alive at once stay well under the float matrix
SPLIT_TWOS = 8  # `num_blocks` keeps each block splittable over up to 2^8 devices (as the vocabulary allows)
MAX_EXTRA_BLOCKS = 32  # ... reading the vocabulary in up to this many times the fewest blocks for it


def is_quantized(matrix: Any) -> bool:
    """Whether a params leaf is a quantized matrix (an `.array` with `qvalue` and `scale`), not a float array."""
    array = getattr(matrix, "array", None)
    return hasattr(array, "qvalue") and hasattr(array, "scale")


def _parts(matrix: Any) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    array = matrix.array
    if getattr(array, "zero_point", None) is not None:
        raise ValueError("a vocabulary matrix quantized with a zero point is not supported (use absmax scales).")
    return array.qvalue, array.scale, getattr(array, "min", None)


def dequantize(qvalue: jax.Array, scale: jax.Array, minimum: jax.Array | None = None,
               dtype: Any = jnp.float32) -> jax.Array:
    """`qvalue * scale (+ minimum)` in float32, then `dtype`; `scale` (and `minimum`) has one entry per group
    of consecutive values along each axis (`qvalue.shape[a] // scale.shape[a]` of them)."""
    split = [d for n, s in zip(qvalue.shape, scale.shape) for d in (s, n // s)]
    by_group = [d for s in scale.shape for d in (s, 1)]
    w = qvalue.astype(jnp.float32).reshape(split) * scale.astype(jnp.float32).reshape(by_group)
    if minimum is not None:
        w = w + minimum.astype(jnp.float32).reshape(by_group)
    return w.reshape(qvalue.shape).astype(dtype)


def lookup(table: Any, ids: jax.Array, dtype: Any) -> jax.Array:
    """Rows `ids` of a quantized embedding table `[V, D]` in `dtype` (`[*ids.shape, D]`): only those rows are
    dequantized."""
    qvalue, scale, minimum = _parts(table)
    rows = lambda x: None if x is None else jnp.take(x, ids, axis=0)
    return dequantize(rows(qvalue), rows(scale), rows(minimum), dtype)


def block_rows(vocab: int, width: int, block_bytes: int | None = None) -> int:
    """Vocabulary rows dequantized at once, at most: an `1 / MIN_BLOCKS` of them, fewer if they take more than
    `block_bytes` (`BLOCK_BYTES`) of float32 weights; at least one."""
    return max(1, min(-(-vocab // MIN_BLOCKS), (block_bytes or BLOCK_BYTES) // (4 * width)))


def num_blocks(vocab: int, width: int, block_bytes: int | None = None) -> int:
    """How many blocks `logits` reads the vocabulary in: a divisor of `vocab`, at least `vocab / block_rows`
    and at most `MAX_EXTRA_BLOCKS` times that, the fewest whose rows per block (`vocab / blocks`) keep the
    vocabulary's factors of two (up to `SPLIT_TWOS` of them): a vocabulary split over a power-of-two number of
    devices is then split alike in every block (e.g. Llama 3's 128256 = 2^8 x 501 rows: 501 blocks of 256 at
    width 8192). Where no divisor is in range (a prime vocabulary, which no mesh splits), the fewest blocks,
    the last one padded."""
    fewest = -(-vocab // block_rows(vocab, width, block_bytes))
    most = min(MAX_EXTRA_BLOCKS * fewest, vocab // 2)  # at least two rows a block
    divisors = [b for b in range(fewest, most + 1) if vocab % b == 0]
    if not divisors:
        return fewest
    wanted = min(_twos(vocab), SPLIT_TWOS)
    return min(divisors, key=lambda b: (max(wanted - _twos(vocab // b), 0), b))


def _twos(n: int) -> int:
    """How many factors of two `n` has."""
    return (n & -n).bit_length() - 1


def layout(vocab: int, width: int, devices: int, block_bytes: int | None = None) -> tuple[int, int, int]:
    """(groups, blocks, chunk) that `logits` views the vocabulary as (`groups * blocks * chunk` rows, the last
    block padded where `num_blocks` found no divisor): `groups` runs of consecutive rows, each made of `blocks`
    chunks of `chunk` rows; block `b` is chunk `b` of every group. `groups` is the largest number dividing both
    the rows per block and `devices`: a vocabulary split over any mesh axis (or axes) of `devices` whose size
    divides the rows per block splits `groups` alone. One device: one group, contiguous blocks (more groups write
    the logits in shorter runs: on CPU, SmolLM2's head with 256 groups took ~1.1x the time of one)."""
    blocks = num_blocks(vocab, width, block_bytes)
    if vocab % blocks:
        return 1, blocks, -(-vocab // blocks)
    groups = math.gcd(vocab // blocks, devices)
    return groups, blocks, vocab // (groups * blocks)


def logits(h_NxD: jax.Array, matrix: Any, vocab_axis: int, dtype: Any, block_bytes: int | None = None,
           devices: int | None = None) -> jax.Array:
    """`h @ W` (`[..., V]` in `dtype`) for a quantized vocabulary matrix: an embedding table `[V, D]`
    (`vocab_axis=0`, the tied head) or a head kernel `[D, V]` (`vocab_axis=1`), in `num_blocks` blocks.

    Each part's vocabulary axis is viewed as `[groups, blocks, chunk]` (`layout`, for `devices`, by default
    `jax.device_count()`) and the loop indexes `blocks`: block `b` is chunk `b` of every group. A vocabulary split
    over devices (contiguous rows, `partitioning`'s `quantized_vocab`) splits `groups`, so each device dequantizes
    its own rows of every block: no device gathers the matrix (or a block of it) from others, and the logits,
    written in the same view, come out in vocabulary order, split as the matrix is.
    """
    qvalue, scale, minimum = _parts(matrix)
    vocab, width = qvalue.shape[vocab_axis], qvalue.shape[1 - vocab_axis]
    groups, blocks, chunk = layout(vocab, width, devices or jax.device_count(), block_bytes)
    padded = groups * blocks * chunk
    h = h_NxD.astype(dtype)
    contract = (((h.ndim - 1,), (1 - vocab_axis,)), ((), ()))

    def view(x: jax.Array | None) -> jax.Array | None:  # the vocabulary axis as [groups, blocks, chunk]
        if x is None:
            return None
        if padded != vocab:  # padded with zero weights (scale 0), cut off the logits below
            x = jnp.pad(x, [(0, padded - vocab) if a == vocab_axis else (0, 0) for a in range(x.ndim)])
        return x.reshape(*x.shape[:vocab_axis], groups, blocks, chunk, *x.shape[vocab_axis + 1:])

    parts = [view(x) for x in (qvalue, scale, minimum)]

    def block(b: jax.Array) -> jax.Array:
        take = lambda x: None if x is None else jax.lax.dynamic_index_in_dim(x, b, vocab_axis + 1, keepdims=False)
        w = dequantize(*map(take, parts), dtype=dtype)  # the vocabulary axis as [groups, chunk]
        w = w.reshape(*w.shape[:vocab_axis], groups * chunk, *w.shape[vocab_axis + 2:])
        return jax.lax.dot_general(h, w, contract).reshape(*h.shape[:-1], groups, chunk)

    def write(b: jax.Array, out: jax.Array) -> jax.Array:
        return jax.lax.dynamic_update_index_in_dim(out, jax.checkpoint(block)(b), b, axis=-2)

    out = jnp.zeros((*h.shape[:-1], groups, blocks, chunk), jnp.result_type(h.dtype, dtype))
    out = jax.lax.fori_loop(0, blocks, write, out).reshape(*h.shape[:-1], padded)
    return out[..., :vocab] if padded != vocab else out
