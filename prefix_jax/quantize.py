"""Weight-only quantization of the frozen LM (`model.quantize = none | int8 | int4 | gguf`), with Google's qwix.

What is quantized: the kernel of every `nn.Dense` / `nn.DenseGeneral` of the LM (attention projections, MLP),
and (`embeddings=True`, `model.quantize_embeddings`, the default) the vocabulary matrices: the token embedding
table `[V, D]` (a tied LM head reads it too) and an untied LM head kernel `[D, V]`. int8: one scale per output
channel (absmax over the contraction axes); for a vocabulary matrix one scale per vocabulary row (the lookup's
row, the head's output channel). int4: one scale per group of `group_size` consecutive values along the
contraction axes (per output channel; a group never spans two heads of an output projection); for a
vocabulary matrix along its width D, per row. gguf: a GGUF file's own Q8_0 / Q4_0 / Q4_1 blocks (32 values
along the contraction, a float16 scale, and a float16 min for Q4_1) kept as they are (`GGUFBlocks`), a
token_embd / output tensor included; one stored otherwise (K-quants, Q5_x, F16/F32) is dequantized and
quantized to int8, said in the log. What stays float: norms, biases, position tables (and the vocabulary
matrices with `embeddings=False`). A quantized vocabulary matrix is read by `models.common.Embed` /
`common.LMHead` and the chunked loss (`losses.LMHead`) through `quantized_vocab`: the lookup dequantizes only
the gathered rows, the head a block of rows at a time, so no float copy of the matrix is ever made.

How: qwix's post-training-quantization provider (`qwix.PtqProvider`) intercepts `jax.lax.dot_general` inside
the LM's methods. A quantized kernel is a `WithAux(QArray(qvalue int8/int4, scale float))` leaf of the params
tree (gguf: `WithAux(GGUFBlocks)`): that tree is what the jitted step takes as its explicit LM argument and what
is sharded. In a matmul with a float activation the weight is dequantized in the dot (qwix's
`_slow_dot_general`; `dequantize_blocks` for kept blocks): on GPU/TPU XLA fuses it into the matmul; on CPU it
is a per-layer temporary inside the layer scan, never a float copy of the whole LM. The dot is rematerialized
(`_dequantizing_dot_general`): the backward pass recomputes the dequantized kernel instead of keeping it as a
residual, so even `model.remat=none` holds no float copy of the kernels.

Where: on the host, never on a device. `quantize_host` is qwix's `qarray.quantize` in numpy, bitwise (tested
against qwix jitted). Loading a checkpoint quantizes on load (`models.quantize_on_load`, as `on_load_how` says:
one more transform of the family's HF table, `hf_mapping.Transformed`), each kernel block quantized as it is read
and placed straight into its shard
(`models.load_pretrained(..., quantize=)`, `sharded_load.load_sharded(..., quantize=)`).

Use:
    lm = models.load_pretrained(path, quantize="int8")      # lm.model reads quantized kernels, lm.params holds them
    logits = lm.model.apply({"params": lm.params}, batch, prefix)
    qmodel = quantized_model(model, lm_params, "int4", 64)   # or: quantize params already in memory
    qparams = quantize_params(qmodel, lm_params)
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import flax.struct
import qwix
from qwix._src.core import dot_general as qwix_dot_general
from qwix._src.core import qarray as qwix_qarray
from qwix._src.providers.ptq import WithAux

from prefix_jax.models import common
from prefix_jax.partitioning import path_name

log = logging.getLogger("prefix_jax")

MODES = ("none", "int8", "int4", "gguf")
QTYPES = {"int8": jnp.int8, "int4": jnp.int4}
# int4's group (`model.quantize_group_size`'s default): 64, not 128: 128 does not divide SmolLM2's width 576;
# 64 divides it and every common hidden, MLP and head size.
DEFAULT_GROUP_SIZE = 64
# Model methods run under `model.apply(..., method=...)` anywhere (train, eval, decoding, prefix init).
_APPLIED_METHODS = ("__call__", "decode", "decoder_hidden_states", "embed", "encode", "head", "hidden_states",
                    "packed_hidden_states", "target_hidden_states")
# Kernels that are read outside a dot_general of their own module, or on purpose kept float (see docstring).
_KEPT_FLOAT = re.compile(r"(.*/)?lm_head")
# The vocabulary matrices (quantized by `quantized_model(..., embeddings=True)`, not by qwix): param path ->
# its vocabulary axis. The token embedding table [V, D] (a tied head reads it) and an untied head kernel [D, V].
_VOCAB_MATRICES = ((re.compile(r"(.*/)?(shared|wte|embed_tokens)/embedding"), 0), (re.compile(r"(.*/)?lm_head/kernel"), 1))


class QuantizeError(ValueError):
    """A `model.quantize` setting that cannot be applied to this LM."""


def check_mode(mode: str, field: str = "model.quantize") -> str:
    """`mode` if it is one of `MODES`, else a one-line error naming the field."""
    if mode not in MODES:
        raise QuantizeError(f"{field}={mode!r} is not a quantization mode; use one of {MODES}.")
    return mode


def quantized_modules(lm_params: Any) -> list[str]:
    """The "/"-joined module paths whose `kernel` gets quantized (every Dense kernel but the LM head's)."""
    names = [path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(lm_params)[0]]
    modules = sorted({name.rsplit("/", 1)[0] for name in names if name.endswith("/kernel")})
    return [m for m in modules if not _KEPT_FLOAT.fullmatch(m)]


def vocab_matrices(lm_params: Any) -> dict[str, int]:
    """The "/"-joined paths of the LM's vocabulary matrices (token embedding table, untied LM head kernel), each
    with its vocabulary axis."""
    names = [path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(lm_params)[0]]
    return {name: axis for name in names for pattern, axis in _VOCAB_MATRICES if pattern.fullmatch(name)}


def _vocab_leaf(name: str, shape: tuple[int, ...], dtype: Any, vocab_axis: int, qtype: Any, group: int,
                field: str) -> WithAux:
    """The abstract quantized leaf of a vocabulary matrix: one scale per vocabulary row and group of `group`
    values along the width (int8: the whole width, one scale per row)."""
    width_axis = 1 - vocab_axis
    if shape[width_axis] % group:
        raise QuantizeError(f"{field}={group} does not divide the width of {name} (shape {shape}); choose a group "
                            "size that divides every hidden, MLP and head dimension (e.g. 32 or 64).")
    how = qwix_qarray.HowToQuantize(qtype=qtype, channelwise_axes=[vocab_axis], tiled_axes={width_axis: group})
    scale_shape = tuple(n if axis == vocab_axis else n // group for axis, n in enumerate(shape))
    array = qwix_qarray.QArray(jax.ShapeDtypeStruct(shape, qtype), jax.ShapeDtypeStruct(scale_shape, dtype), None,
                               qtype)
    return WithAux(array=array, how=how)


def _vocab_leaves(lm_params: Any, mode: str, group_size: int, field: str) -> dict[str, WithAux]:
    shapes = {path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(lm_params)[0]}
    out = {}
    for name, axis in vocab_matrices(lm_params).items():
        shape, dtype = tuple(shapes[name].shape), shapes[name].dtype
        if not jnp.issubdtype(dtype, jnp.floating):
            raise QuantizeError(f"model.quantize: LM param {name} is {dtype}, not floating point; load a float "
                                "(fp32/bf16/fp16) LM to quantize it.")
        qtype, group = (jnp.int4, group_size) if mode == "int4" else (jnp.int8, shape[1 - axis])
        out[name] = _vocab_leaf(name, shape, dtype, axis, qtype, group, field)
    return out


def _init_batch() -> dict:
    ones = jnp.ones((1, 4), jnp.int32)
    return {"source_ids": ones, "source_mask": ones, "target_ids": ones, "target_mask": ones}


def _wrap(model: nn.Module, rules: list[qwix.QuantizationRule], vocab: dict[str, WithAux]) -> nn.Module:
    """`model` whose rule-matched Dense kernels qwix reads quantized (`_dequantizing_dot_general`, rematerialized
    when the model's `config.remat` is "none"). `vocab`: the vocabulary matrices' abstract leaves, kept on the
    quantized model's class (made for this call by qwix) as `quantized_vocab`, for `_abstract`."""
    methods = [m for m in _APPLIED_METHODS if hasattr(type(model), m)]
    rematerialize = common.remat_policy(getattr(model.config, "remat", "none")) == "none"
    dot = functools.partial(_dequantizing_dot_general, rematerialize=rematerialize)
    provider = qwix.PtqProvider(rules, _dot_general_fn=dot)
    qmodel = qwix.quantize_model(model, provider, methods=methods)
    type(qmodel).quantized_vocab = vocab
    return qmodel


def _abstract(qmodel: nn.Module) -> Any:
    """The quantized model's params as shapes (no weights are made): `WithAux` leaves carry qwix's `how`
    (the vocabulary matrices' from `quantized_model`)."""
    params = jax.eval_shape(lambda: qmodel.init(jax.random.key(0), _init_batch()))["params"]
    vocab = getattr(type(qmodel), "quantized_vocab", {})
    return jax.tree_util.tree_map_with_path(lambda path, x: vocab.get(path_name(path), x), params)


def _int4_tiles(module: str, how: qwix_qarray.HowToQuantize, kernel_shape: tuple[int, ...],
                group_size: int, field: str) -> dict[int, int]:
    """qwix tile sizes giving groups of `group_size` consecutive values along the flattened contraction axes.

    The innermost contraction axis is tiled by `group_size` when it is at least that long (any outer
    contraction axis, an output projection's heads, by 1: a group never spans heads); when it is shorter (an
    output projection's head_dim), it stays whole and the next contraction axis out is tiled by
    `group_size // head_dim`, so that a group still covers `group_size` values.
    """
    contraction = [a for a in range(len(kernel_shape)) if a not in how.channelwise_axes]
    inner = contraction[-1]
    size = kernel_shape[inner]
    if size % group_size == 0:  # outer contraction axes (an output projection's heads): one group each
        return {inner: group_size, **{outer: 1 for outer in contraction[:-1]}}
    if len(contraction) > 1 and group_size % size == 0:
        outer, heads_per_group = contraction[-2], group_size // size
        if kernel_shape[outer] % heads_per_group == 0:
            return {outer: heads_per_group}
    raise QuantizeError(f"{field}={group_size} does not divide the contraction of {module}/kernel "
                        f"(shape {kernel_shape}, contracted over axes {contraction}); choose a group size that "
                        "divides every hidden, MLP and head dimension (e.g. 32 or 64).")


def quantized_model(model: nn.Module, lm_params: Any, mode: str, group_size: int = DEFAULT_GROUP_SIZE,
                    field: str = "model.quantize_group_size", int4_calibration: str = "absmax",
                    embeddings: bool = True) -> nn.Module:
    """`model` whose Dense kernels (`quantized_modules`) are read as quantized `mode` weights; `model` for none.

    `lm_params` (arrays or shapes) only names the modules; `group_size` is int4's group along the contraction;
    `int4_calibration` qwix's weight calibration for int4 kernels: "absmax" (symmetric) or "minmax" (a scale and
    a zero point per group, as GGUF's Q4_1 blocks). `embeddings` (`model.quantize_embeddings`): the vocabulary
    matrices (`vocab_matrices`) are quantized too (absmax; "gguf": int8 unless the file's blocks are kept).
    """
    check_mode(mode)
    if mode == "none":
        return model
    modules = quantized_modules(lm_params)
    if not modules:
        raise QuantizeError(f"model.quantize={mode!r}: this LM has no Dense kernel to quantize.")
    vocab = _vocab_leaves(lm_params, mode, group_size, field) if embeddings else {}
    if mode in ("int8", "gguf"):  # gguf: each kernel's leaf (`on_load_how`) says how it is read in the matmul
        return _wrap(model, [qwix.QuantizationRule(module_path="|".join(map(re.escape, modules)),
                                                   weight_qtype=jnp.int8)], vocab)
    # int4: qwix needs each module's tiling; the contraction axes are read off an int8 pass (per layer).
    abstract8 = _abstract(quantized_model(model, lm_params, "int8", embeddings=False))
    rules = []
    for path, leaf in _with_aux_leaves(abstract8):
        module = path.rsplit("/", 1)[0]
        per_layer_shape = tuple(leaf.array.qvalue.shape[_layer_axes(leaf):])
        tiles = _int4_tiles(module, leaf.how, per_layer_shape, group_size, field)
        rules.append(qwix.QuantizationRule(module_path=re.escape(module), weight_qtype=jnp.int4, tile_size=tiles,
                                           weight_calibration_method=int4_calibration))
    return _wrap(model, rules, vocab)


def _with_aux_leaves(tree: Any) -> list[tuple[str, WithAux]]:
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, WithAux))[0]
    return [(path_name(path), leaf) for path, leaf in flat if isinstance(leaf, WithAux)]


def _layer_axes(leaf: WithAux) -> int:
    """How many leading (scanned layer) axes a quantized leaf has beyond the per-layer kernel qwix saw."""
    per_layer_ndim = max([*leaf.how.channelwise_axes, *leaf.how.tiled_axes]) + 1  # a kernel's last axis is an output
    extra = len(leaf.array.qvalue.shape) - per_layer_ndim
    if extra not in (0, 1):
        raise QuantizeError(f"cannot read the layer axes of a quantized kernel of shape {leaf.array.qvalue.shape}.")
    return extra


def _groups(leaf: WithAux, shape: tuple[int, ...], tiles: dict[int, int] | None = None) -> tuple[int, ...]:
    """Per axis of a (stacked) kernel of `shape`, the length of one scale's group: 1 for a layer or output axis,
    the tile for a tiled contraction axis, the whole axis for an untiled contraction axis."""
    layer_axes = _layer_axes(leaf)
    tiles = dict(leaf.how.tiled_axes) if tiles is None else tiles
    groups = []
    for axis, size in enumerate(shape):
        per_layer = axis - layer_axes
        if per_layer < 0 or per_layer in leaf.how.channelwise_axes:
            groups.append(1)
        else:
            groups.append(int(tiles.get(per_layer, size)))
    return tuple(groups)


def quantize_host(kernel: np.ndarray, groups: tuple[int, ...], qtype: Any, calibration: str = "absmax") -> dict:
    """`kernel` (numpy, float32/bfloat16/float16) quantized on the host as qwix's `qarray.quantize` does it on a
    device, bitwise: one scale (and, for "minmax", one zero point) per group of `groups[a]` consecutive values
    along each axis `a`. Returns {"qvalue", "scale"[, "zero_point"]} as numpy arrays (int8 / ml_dtypes int4).

    Each operation is rounded to the kernel's dtype as XLA's CPU backend rounds it (a float32 computation, then a
    cast), and a division by a constant is a multiplication by its float32 reciprocal (XLA's simplifier rewrites
    it so); tests/test_quantize.py checks this against qwix's jitted `quantize`, float32 and bfloat16.
    """
    dtype = kernel.dtype
    if not np.issubdtype(dtype, np.floating) and dtype not in (ml_dtypes.bfloat16,):
        raise QuantizeError(f"cannot quantize a kernel of dtype {dtype}")
    in_dtype = lambda x: np.asarray(x, np.float32).astype(dtype)  # one op's result, rounded as XLA rounds it
    f32 = lambda x: np.asarray(x, np.float32)
    split = [d for n, g in zip(kernel.shape, groups) for d in (n // g, g)]
    reduced = tuple(range(1, len(split), 2))
    x = kernel.reshape(split)
    info = jnp.iinfo(qtype)
    tiny_sqrt = in_dtype(np.sqrt(f32(ml_dtypes.finfo(dtype).tiny)))
    if calibration == "absmax":
        absmax = np.max(np.abs(x), axis=reduced, keepdims=True)
        scale = in_dtype(f32(absmax) * _reciprocal(info.max + 0.5))
        scale = np.where(scale < tiny_sqrt, np.ones_like(scale), scale)
        zero_point = None
        q = in_dtype(f32(x) * (np.float32(1) / f32(scale)))  # as XLA rewrites x / broadcast(scale)
    elif calibration == "minmax":
        low = np.minimum(np.min(x, axis=reduced, keepdims=True), np.zeros((), dtype))
        high = np.maximum(np.max(x, axis=reduced, keepdims=True), np.zeros((), dtype))
        scale = in_dtype(f32(in_dtype(f32(high) - f32(low))) * _reciprocal(info.max - info.min))
        scale = np.where(scale < tiny_sqrt, np.ones_like(scale), scale)
        zero_point = in_dtype(np.float32(info.min) - f32(in_dtype(f32(low) / f32(scale))))
        zero_point = _to_int(zero_point, qtype)
        q = in_dtype(f32(in_dtype(f32(x) / f32(scale))) + f32(zero_point.astype(np.int8)))
    else:
        raise QuantizeError(f"unknown calibration {calibration!r}")
    out = {"qvalue": _to_int(q, qtype).reshape(kernel.shape),
           "scale": scale.reshape([n // g for n, g in zip(kernel.shape, groups)])}
    if zero_point is not None:
        out["zero_point"] = zero_point.reshape(out["scale"].shape)
    return out


def _reciprocal(constant: float) -> np.float32:
    return np.float32(1) / np.float32(constant)


def _to_int(x: np.ndarray, qtype: Any) -> np.ndarray:
    """Rounded half to even and saturated, as `jnp.round(x).astype(qtype)`."""
    info = jnp.iinfo(qtype)
    return np.clip(np.round(np.asarray(x, np.float32)), info.min, info.max).astype(np.int8).astype(jnp.dtype(qtype))


def _quantize_leaf(kernel: np.ndarray, leaf: WithAux) -> WithAux:
    """`kernel` (the whole stacked kernel, host) as the quantized leaf `leaf` (abstract) describes."""
    parts = quantize_host(kernel, _groups(leaf, kernel.shape), leaf.how.qtype, leaf.how.calibration_method)
    return leaf.replace(array=qwix_qarray.QArray(parts["qvalue"], parts["scale"], parts.get("zero_point"),
                                                 leaf.how.qtype))


def quantize_params(qmodel: nn.Module, lm_params: Any) -> Any:
    """The float LM params with every kernel `qmodel` quantizes replaced by its quantized `WithAux` leaf.

    On the host, kernel by kernel (`quantize_host`): no float kernel is put on a device; the leaves come back
    as numpy arrays. Kernels must be floating point (float32/bfloat16/float16); other leaves are returned as
    they are. (Loading a checkpoint quantizes on load instead: `load_targets`, `on_load_how`.)
    """
    if not hasattr(type(qmodel), "_unquantized_type"):
        return lm_params
    abstract = dict(_with_aux_leaves(_abstract(qmodel)))
    def leaf(path: tuple, value: Any) -> Any:
        name = path_name(path)
        target = abstract.get(name)
        if target is None:
            return value
        _check_kernel(name, value.dtype, tuple(value.shape), target)
        return _quantize_leaf(np.asarray(value), target)

    out = jax.tree_util.tree_map_with_path(leaf, lm_params)
    missing = set(abstract) - {path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(lm_params)[0]}
    if missing:
        raise QuantizeError(f"model.quantize: LM params lack {sorted(missing)[:3]}.")
    return out


def _check_kernel(name: str, dtype: Any, shape: tuple[int, ...], target: WithAux) -> None:
    if not jnp.issubdtype(dtype, jnp.floating):
        raise QuantizeError(f"model.quantize: LM param {name} is {dtype}, not floating point; "
                            "load a float (fp32/bf16/fp16) LM to quantize it.")
    if shape != tuple(target.array.qvalue.shape):
        raise QuantizeError(f"model.quantize: LM param {name} has shape {shape}, the model "
                            f"expects {tuple(target.array.qvalue.shape)}.")


# --- Quantizing on load: one more transform of the HF table (`hf_mapping.Transformed`) ---

# GGUF storage types whose blocks `model.quantize="gguf"` keeps: the type of their integer values.
GGUF_KEPT = {"Q8_0": jnp.int8, "Q4_0": jnp.int4, "Q4_1": jnp.uint4}
GGUF_BLOCK = 32  # values per block along a row (the contraction), one float16 scale (and min) each


@flax.struct.dataclass
class GGUFBlocks:
    """A kernel kept as a GGUF file stores it: integer values (Q8_0: int8; Q4_0: int4, the stored nibble - 8;
    Q4_1: uint4, the nibble) and one float16 scale (Q4_1: and one float16 min) per 32-value block along the
    contraction. Its weights are `qvalue * scale (+ min)` in float32, as llama.cpp dequantizes them."""

    qvalue: Any
    scale: Any
    min: Any = None

    shape = property(lambda self: self.qvalue.shape)
    ndim = property(lambda self: self.qvalue.ndim)
    dtype = property(lambda self: jnp.dtype(jnp.float32))


def dequantize_blocks(blocks: GGUFBlocks) -> jax.Array:
    """The float32 weights of `blocks`, bitwise as the `gguf` package dequantizes the file's blocks."""
    w = qwix_qarray.call_with_generic_broadcast(jnp.multiply, blocks.scale.astype(jnp.float32),
                                                blocks.qvalue.astype(jnp.float32))
    if blocks.min is not None:
        w = qwix_qarray.call_with_generic_broadcast(jnp.add, w, blocks.min.astype(jnp.float32))
    return w


def _dequantizing_dot_general(lhs: jax.Array, rhs: Any, dimension_numbers: Any, precision: Any = None,
                              preferred_element_type: Any = None, *, rematerialize: bool = False,
                              **kwargs: Any) -> jax.Array:
    """qwix's dot_general for a quantized kernel (a `QArray`), and for one kept as GGUF blocks: dequantized in
    the matmul (as qwix's own path does for a float activation), at the activation's dtype as a float kernel is
    promoted.

    `rematerialize` (the LM's `remat` is "none"): the dot is `jax.checkpoint`ed, so the backward pass keeps the
    quantized kernel and the activation and recomputes the dequantized kernel, never a residual (without it,
    the layer scan saves every layer's float kernels: their whole float32 size). Under a layer remat policy
    ("full", "minimal") the layer's own rematerialization already recomputes it, and the inner checkpoint only
    adds temporaries (measured on the tiny Llama, "minimal": +164 kB), so it is not used there.
    """

    def dot(lhs: jax.Array, rhs: Any) -> jax.Array:
        if isinstance(rhs, GGUFBlocks):
            return jax.lax.dot_general(lhs, dequantize_blocks(rhs).astype(lhs.dtype), dimension_numbers,
                                       precision=precision, preferred_element_type=preferred_element_type, **kwargs)
        return qwix_dot_general.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                            preferred_element_type=preferred_element_type, **kwargs)

    return jax.checkpoint(dot, prevent_cse=False)(lhs, rhs) if rematerialize else dot(lhs, rhs)


Bounds = tuple[tuple[int, int], ...]


@dataclasses.dataclass(frozen=True)
class OnLoad:
    """How one kernel is made while the checkpoint is read (the `how` of an `hf_mapping.Transformed` leaf).

    Quantized (int8/int4): from float blocks read through the table, on the host, each block widened to whole
    groups so its scales are the whole kernel's (`quantize_host`). Kept (`gguf_type`): the file's own integer
    values, scales and mins, read through the same table (transposes, splits, row permutations apply to them
    value by value; a scale is read at its block's first value).
    """

    leaf: WithAux  # abstract: qwix's `how` and the kernel's shape
    groups: tuple[int, ...]  # per axis of the stacked kernel: the values one scale covers (`_groups`)
    dtype: Any  # the float param dtype (a quantized kernel's scale dtype)
    gguf_type: str | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.leaf.array.qvalue.shape)

    def parts(self) -> dict[str, jax.ShapeDtypeStruct]:
        """Each array of the leaf: its shape and dtype."""
        scale_shape = tuple(n // g for n, g in zip(self.shape, self.groups))
        if self.gguf_type:
            out = {"qvalue": jax.ShapeDtypeStruct(self.shape, GGUF_KEPT[self.gguf_type]),
                   "scale": jax.ShapeDtypeStruct(scale_shape, jnp.float16)}
            if self.gguf_type == "Q4_1":
                out["min"] = jax.ShapeDtypeStruct(scale_shape, jnp.float16)
            return out
        out = {"qvalue": jax.ShapeDtypeStruct(self.shape, self.leaf.how.qtype),
               "scale": jax.ShapeDtypeStruct(scale_shape, self.dtype)}
        if self.leaf.how.calibration_method == "minmax":
            out["zero_point"] = jax.ShapeDtypeStruct(scale_shape, self.leaf.how.qtype)
        return out

    def covering(self, part: str, bounds: Bounds) -> Bounds:
        """The kernel's block (whole groups) that `bounds` of `part` is made from."""
        if part == "qvalue":
            if self.gguf_type:
                return bounds  # stored per value
            return tuple((lo // g * g, -(-hi // g) * g) for (lo, hi), g in zip(bounds, self.groups))
        return tuple((lo * g, hi * g) for (lo, hi), g in zip(bounds, self.groups))

    def compute(self, read: Callable[..., np.ndarray], kernel_bounds: Bounds, part: str) -> dict[str, np.ndarray]:
        """Parts of the kernel block `kernel_bounds` (at least `part`); `read(bounds, stored=None)` reads through
        the table: float values, or a GGUF file's stored "values" / "scale" / "min" per value."""
        if not self.gguf_type:
            return quantize_host(read(kernel_bounds), self.groups, self.leaf.how.qtype,
                                 self.leaf.how.calibration_method)
        if part == "qvalue":
            values = read(kernel_bounds, "values")
            return {"qvalue": values.astype(np.int8).astype(jnp.dtype(GGUF_KEPT[self.gguf_type]))}
        per_value = read(kernel_bounds, part)
        return {part: per_value[tuple(slice(None, None, g) for g in self.groups)]}

    def take(self, part: str, computed: np.ndarray, kernel_bounds: Bounds, bounds: Bounds) -> np.ndarray:
        """The block `bounds` of `part` out of `computed`, made from `kernel_bounds`."""
        if part == "qvalue":
            origin = [lo for lo, _ in kernel_bounds]
        else:
            origin = [lo // g for (lo, _), g in zip(kernel_bounds, self.groups)]
        return computed[tuple(slice(lo - o, hi - o) for (lo, hi), o in zip(bounds, origin))]

    def assemble(self, parts: dict[str, Any]) -> WithAux:
        """The params leaf from its parts (arrays, numpy arrays or shapes)."""
        if self.gguf_type:
            return self.leaf.replace(array=GGUFBlocks(parts["qvalue"], parts["scale"], parts.get("min")))
        return self.leaf.replace(array=qwix_qarray.QArray(parts["qvalue"], parts["scale"], parts.get("zero_point"),
                                                          self.leaf.how.qtype))

    def split(self, leaf: WithAux) -> dict[str, Any]:
        """The parts of a leaf shaped as `assemble` makes it (e.g. its shardings)."""
        array = leaf.array
        return {part: getattr(array, "zero_point" if part == "zero_point" else part) for part in self.parts()}


def load_targets(model: nn.Module, shapes: Any, mode: str, group_size: int, embeddings: bool = True,
                 int4_calibration: str = "absmax") -> tuple[nn.Module, dict[str, WithAux]]:
    """(the quantized model, its quantized leaves by "/"-joined param path, abstract) for a checkpoint whose
    float params have `shapes`: what loading quantizes (`models.quantize_on_load` makes each on load, as
    `on_load_how` says)."""
    qmodel = quantized_model(model, shapes, mode, group_size, int4_calibration=int4_calibration,
                             embeddings=embeddings)
    return qmodel, dict(_with_aux_leaves(_abstract(qmodel)))


def on_load_how(name: str, target: WithAux, shape: tuple[int, ...], dtype: Any,
                stored: set[str] | None = None) -> OnLoad:
    """How the param `name` (float `shape`, `dtype`) is made as it is read: quantized as `target` says, or,
    `stored` being the GGUF storage types of its tensors (`model.quantize="gguf"`), kept as the file's blocks
    when they are all Q8_0 / Q4_0 / Q4_1 (else `target`: int8 per output channel / vocabulary row; the returned
    `OnLoad.gguf_type` is None then)."""
    _check_kernel(name, np.dtype(dtype), shape, target)
    kind = next(iter(stored)) if stored is not None and len(stored) == 1 else None
    if kind not in GGUF_KEPT:
        return OnLoad(target, _groups(target, shape), np.dtype(dtype))
    per_layer = tuple(shape[_layer_axes(target):])
    try:
        tiles = _int4_tiles(name.rsplit("/", 1)[0], target.how, per_layer, GGUF_BLOCK, "model.quantize")
    except QuantizeError:
        raise QuantizeError(f"model.quantize='gguf': {name} is stored in {GGUF_BLOCK}-value {kind} blocks that do "
                            f"not tile its contraction (shape {per_layer}); use model.quantize=int8 or int4.") from None
    return OnLoad(target, _groups(target, shape, tiles), np.dtype(dtype), kind)


def quantized_bytes(lm_params: Any) -> dict[str, int]:
    """Bytes of the LM tree: `quantized` (int values + scales of quantized kernels) and `float` (the rest).

    int4 values count half a byte each (their size packed, as XLA stores them on TPU/GPU).
    """
    totals = {"quantized": 0, "float": 0}
    for leaf in jax.tree_util.tree_leaves(lm_params, is_leaf=lambda x: isinstance(x, WithAux)):
        if isinstance(leaf, WithAux):  # int values, scales, zero points / mins
            totals["quantized"] += sum(_nbytes(x) for x in jax.tree_util.tree_leaves(leaf.array))
        else:
            totals["float"] += _nbytes(leaf)
    return totals


def _nbytes(x: Any) -> int:
    """Bytes of an array, int4 counted packed (half a byte a value)."""
    bits = jnp.iinfo(x.dtype).bits if jnp.issubdtype(x.dtype, jnp.integer) else 8 * jnp.dtype(x.dtype).itemsize
    return int(np.prod(x.shape)) * bits // 8


def float_kernel_bytes(qmodel: nn.Module, lm_params: Any) -> int:
    """Bytes the kernels `qmodel` quantizes take in `lm_params` (float): the denominator of the ratio."""
    names = dict(_with_aux_leaves(_abstract(qmodel))) if hasattr(type(qmodel), "_unquantized_type") else {}
    return sum(_nbytes(v) for p, v in jax.tree_util.tree_flatten_with_path(lm_params)[0] if path_name(p) in names)


def quantized_param_axes(param_axes: Any) -> tuple:
    """An architecture's `PARAM_AXES` extended to quantized kernels and vocabulary matrices
    (`.../kernel/array/{qvalue,scale}`, `.../embedding/array/...`).

    A kernel's qvalue is laid out as the float kernel; a scale keeps the kernel's logical axes (its contraction
    axes have size 1 or few groups, which the partitioner replicates when they do not divide the mesh axis).
    A vocabulary matrix (a rule naming a "vocab" axis) is split along its rows first: its vocabulary axis is
    `quantized_vocab` (see `partitioning`), so a row's scales are in the shard holding the row.
    """
    extra = []
    for pattern, names in param_axes:
        if pattern.endswith(("kernel", "embedding")):
            names = tuple("quantized_vocab" if n == "vocab" else n for n in names)
            extra.append((pattern + "/array/(qvalue|scale|zero_point|min)", names))
    return tuple(extra) + tuple(param_axes)


__all__ = ["MODES", "DEFAULT_GROUP_SIZE", "GGUF_KEPT", "GGUFBlocks", "OnLoad", "QuantizeError", "check_mode",
           "dequantize_blocks", "float_kernel_bytes", "load_targets", "on_load_how", "quantize_host", "quantize_params", "quantized_bytes",
           "quantized_model", "quantized_modules", "quantized_param_axes", "vocab_matrices", "WithAux"]
