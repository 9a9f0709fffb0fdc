"""Dropout with JAX's own Threefry mask, computed as straight-line integer ops that XLA fuses.

`flax.linen.Dropout` draws its mask with `jax.random.bernoulli`. On the CPU backend JAX lowers the Threefry
hash behind it as a rolled loop (five iterations, each reading and writing whole arrays), which made drawing
masks a quarter of a T5-small training step. `Dropout` here computes the same function: Threefry-2x32 of
each element's flat index, XOR of the two output words, the top 23 bits as a float in [0, 1), kept when
below the keep probability; the algorithm `jax.random.bits` runs under `jax_threefry_partitionable` (JAX's
default). Unrolled, it fuses into the multiply that applies it, and the mask is the same bit for bit
(`tests/test_dropout.py`), so training results do not change. Keys of another PRNG implementation, the
non-partitionable mode, float64 probabilities and arrays of 2^32 elements or more take `jax.random.bernoulli`.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_KEY_PARITY = 0x1BD11BDA  # Threefry's key-schedule constant


def _rotate_left(x: jax.Array, bits: int) -> jax.Array:
    return lax.shift_left(x, np.uint32(bits)) | lax.shift_right_logical(x, np.uint32(32 - bits))


def threefry_2x32(key0: jax.Array, key1: jax.Array, x0: jax.Array, x1: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Threefry-2x32 with 20 rounds (Salmon et al. 2011) on uint32 words, unrolled: JAX's `threefry2x32_p`."""
    keys = (key0, key1, key0 ^ key1 ^ np.uint32(_KEY_PARITY))
    x0, x1 = x0 + keys[0], x1 + keys[1]
    for block in range(5):
        for rotation in _ROTATIONS[block % 2]:
            x0 = x0 + x1
            x1 = _rotate_left(x1, rotation) ^ x0
        x0 = x0 + keys[(block + 1) % 3]
        x1 = x1 + keys[(block + 2) % 3] + np.uint32(block + 1)
    return x0, x1


def _flat_index(shape: Sequence[int]) -> jax.Array:
    """Row-major flat index of every element, uint32 (the caller checks the size fits)."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        if shape[axis] > 1:
            index = index + lax.broadcasted_iota(jnp.uint32, tuple(shape), axis) * np.uint32(stride)
        stride *= shape[axis]
    return index


def _threefry_key_words(key: jax.Array) -> tuple[jax.Array, jax.Array] | None:
    """The two key words when `jax.random` would draw from `key` with partitionable Threefry, else None."""
    if not jax.config.jax_threefry_partitionable:
        return None
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        if str(jax.random.key_impl(key)) != "threefry2x32" or key.shape != ():
            return None
        data = jax.random.key_data(key)
    elif key.dtype == jnp.uint32 and key.shape == (2,) and jax.config.jax_default_prng_impl == "threefry2x32":
        data = key  # a raw key: jax.random wraps it with the default implementation
    else:
        return None
    return data[0], data[1]


def bernoulli(key: jax.Array, p: float, shape: Sequence[int]) -> jax.Array:
    """`jax.random.bernoulli(key, p, shape)` for a Python float `p`: the same booleans, fusible."""
    shape = tuple(shape)
    words = _threefry_key_words(key)
    if words is None or jnp.result_type(p) != jnp.float32 or math.prod(shape) >= 2**32:
        return jax.random.bernoulli(key, p, shape)
    high_words = jnp.zeros(shape, jnp.uint32)  # the flat index's upper 32 bits: zero below 2^32 elements
    bits0, bits1 = threefry_2x32(words[0], words[1], high_words, _flat_index(shape))
    mantissa = lax.shift_right_logical(bits0 ^ bits1, np.uint32(32 - 23)) | np.uint32(0x3F800000)
    uniform = lax.bitcast_convert_type(mantissa, jnp.float32) - np.float32(1.0)
    return uniform < np.float32(p)


def drop(inputs: jax.Array, rate: float, rng: jax.Array, broadcast_dims: Sequence[int] = ()) -> jax.Array:
    """Inputs zeroed with probability `rate` (one mask shared along `broadcast_dims`), the rest scaled by
    `1 / (1 - rate)`: what `flax.linen.Dropout` computes for `0 < rate < 1`, with the mask from `bernoulli`."""
    keep_prob = 1.0 - rate
    mask_shape = [1 if axis in broadcast_dims else size for axis, size in enumerate(inputs.shape)]
    keep = jnp.broadcast_to(bernoulli(rng, keep_prob, mask_shape), inputs.shape)
    return lax.select(keep, inputs / keep_prob, jnp.zeros_like(inputs))


class Dropout(nn.Module):
    """`flax.linen.Dropout` through `drop` above: same arguments, rng stream and outputs.

    Keep the class name: Flax names an unnamed submodule after its class, and the dropout rng is folded
    in along that path, so `Dropout_0` here draws exactly what `nn.Dropout`'s `Dropout_0` drew.
    """

    rate: float
    broadcast_dims: Sequence[int] = ()
    deterministic: bool | None = None
    rng_collection: str = "dropout"

    @nn.compact
    def __call__(self, inputs: jax.Array, deterministic: bool | None = None, rng: jax.Array | None = None) -> jax.Array:
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if self.rate == 0.0 or deterministic:
            return inputs
        if self.rate == 1.0:
            return jnp.zeros_like(inputs)
        if rng is None:
            rng = self.make_rng(self.rng_collection)
        return drop(inputs, self.rate, rng, self.broadcast_dims)
