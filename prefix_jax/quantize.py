"""Weight-only quantization of the frozen LM (`model.quantize = none | int8 | int4`), with Google's qwix.

What is quantized: the kernel of every `nn.Dense` / `nn.DenseGeneral` of the LM (attention projections, MLP),
except the LM head. int8: one scale per output channel (absmax over the contraction axes). int4: one scale per
group of `group_size` consecutive values along the contraction axes (per output channel). What stays float:
embeddings (looked up, and the tied LM head `Embed.attend` reads them), an untied `lm_head` (kept float so the
chunked loss `losses.lm_head_for` reads it as today; it is one matrix), norms, biases, position tables.

How: qwix's post-training-quantization provider (`qwix.PtqProvider`) intercepts `jax.lax.dot_general` inside
the LM's methods. A quantized kernel is a `WithAux(QArray(qvalue int8/int4, scale float))` leaf of the params
tree: that tree is what the jitted step takes as its explicit LM argument and what is sharded. In a matmul with
a float activation qwix dequantizes the weight in the dot (`qwix._src.core.dot_general._slow_dot_general`):
on GPU/TPU XLA fuses it into the matmul; on CPU it is a per-layer temporary inside the layer scan, never a
float copy of the whole LM.

Use:
    qmodel = quantized_model(model, lm_params, "int8")      # the model whose methods read quantized kernels
    qparams = quantize_params(qmodel, lm_params)             # the LM argument of every step
    logits = qmodel.apply({"params": qparams}, batch, prefix)
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import qwix
from qwix._src.core import qarray as qwix_qarray
from qwix._src.providers.ptq import WithAux

from prefix_jax.partitioning import path_name

MODES = ("none", "int8", "int4")
QTYPES = {"int8": jnp.int8, "int4": jnp.int4}
DEFAULT_GROUP_SIZE = 128
# Model methods run under `model.apply(..., method=...)` anywhere (train, eval, decoding, prefix init).
_APPLIED_METHODS = ("__call__", "decode", "decoder_hidden_states", "embed", "encode", "head", "hidden_states",
                    "packed_hidden_states", "target_hidden_states")
# Kernels that are read outside a dot_general of their own module, or on purpose kept float (see docstring).
_KEPT_FLOAT = re.compile(r"(.*/)?lm_head")


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


def _init_batch() -> dict:
    ones = jnp.ones((1, 4), jnp.int32)
    return {"source_ids": ones, "source_mask": ones, "target_ids": ones, "target_mask": ones}


def _wrap(model: nn.Module, rules: list[qwix.QuantizationRule]) -> nn.Module:
    methods = [m for m in _APPLIED_METHODS if hasattr(type(model), m)]
    return qwix.quantize_model(model, qwix.PtqProvider(rules), methods=methods)


def _abstract(qmodel: nn.Module) -> Any:
    """The quantized model's params as shapes (no weights are made): `WithAux` leaves carry qwix's `how`."""
    return jax.eval_shape(lambda: qmodel.init(jax.random.key(0), _init_batch()))["params"]


def _int4_tiles(module: str, how: qwix_qarray.HowToQuantize, kernel_shape: tuple[int, ...],
                group_size: int, field: str) -> dict[int, int]:
    """qwix tile sizes giving groups of `group_size` consecutive values along the flattened contraction axes.

    The innermost contraction axis is tiled by `group_size` when it is at least that long; when it is shorter
    (an output projection's head_dim), it stays whole and the next contraction axis out is tiled by
    `group_size // head_dim`, so that a group still covers `group_size` values.
    """
    contraction = [a for a in range(len(kernel_shape)) if a not in how.channelwise_axes]
    inner = contraction[-1]
    size = kernel_shape[inner]
    if size % group_size == 0:
        return {inner: group_size}
    if len(contraction) > 1 and group_size % size == 0:
        outer, heads_per_group = contraction[-2], group_size // size
        if kernel_shape[outer] % heads_per_group == 0:
            return {outer: heads_per_group}
    raise QuantizeError(f"{field}={group_size} does not divide the contraction of {module}/kernel "
                        f"(shape {kernel_shape}, contracted over axes {contraction}); choose a group size that "
                        "divides every hidden, MLP and head dimension (e.g. 32 or 64).")


def quantized_model(model: nn.Module, lm_params: Any, mode: str, group_size: int = DEFAULT_GROUP_SIZE,
                    field: str = "model.quantize_group_size", int4_calibration: str = "absmax") -> nn.Module:
    """`model` whose Dense kernels (`quantized_modules`) are read as quantized `mode` weights; `model` for none.

    `lm_params` (arrays or shapes) only names the modules; `group_size` is int4's group along the contraction;
    `int4_calibration` qwix's weight calibration for int4: "absmax" (symmetric) or "minmax" (a scale and a zero
    point per group, as GGUF's Q4_1 blocks).
    """
    check_mode(mode)
    if mode == "none":
        return model
    modules = quantized_modules(lm_params)
    if not modules:
        raise QuantizeError(f"model.quantize={mode!r}: this LM has no Dense kernel to quantize.")
    if mode == "int8":
        return _wrap(model, [qwix.QuantizationRule(module_path="|".join(map(re.escape, modules)),
                                                   weight_qtype=jnp.int8)])
    # int4: qwix needs each module's tiling; the contraction axes are read off an int8 pass (per layer).
    abstract8 = _abstract(quantized_model(model, lm_params, "int8"))
    rules = []
    for path, leaf in _with_aux_leaves(abstract8):
        module = path.rsplit("/", 1)[0]
        per_layer_shape = tuple(leaf.array.qvalue.shape[_layer_axes(leaf):])
        tiles = _int4_tiles(module, leaf.how, per_layer_shape, group_size, field)
        rules.append(qwix.QuantizationRule(module_path=re.escape(module), weight_qtype=jnp.int4, tile_size=tiles,
                                           weight_calibration_method=int4_calibration))
    return _wrap(model, rules)


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


def _quantize_leaf(kernel: jax.Array, leaf: WithAux) -> WithAux:
    quantize = lambda w: qwix_qarray.quantize(w, leaf.how)
    if _layer_axes(leaf):  # stacked layers: each layer its own scales
        quantize = jax.vmap(quantize)
    return leaf.replace(array=quantize(kernel))


def quantize_params(qmodel: nn.Module, lm_params: Any) -> Any:
    """The float LM params with every kernel `qmodel` quantizes replaced by its quantized `WithAux` leaf.

    One kernel at a time (a jitted quantization each), so only one float kernel is transient on a device.
    Kernels must be floating point (float32/bfloat16/float16); other leaves are returned as they are.
    """
    if not hasattr(type(qmodel), "_unquantized_type"):
        return lm_params
    abstract = dict(_with_aux_leaves(_abstract(qmodel)))
    def leaf(path: tuple, value: Any) -> Any:
        name = path_name(path)
        target = abstract.get(name)
        if target is None:
            return value
        if not jnp.issubdtype(value.dtype, jnp.floating):
            raise QuantizeError(f"model.quantize: LM param {name} is {value.dtype}, not floating point; "
                                "load a float (fp32/bf16/fp16) LM to quantize it.")
        if tuple(value.shape) != tuple(target.array.qvalue.shape):
            raise QuantizeError(f"model.quantize: LM param {name} has shape {tuple(value.shape)}, the model "
                                f"expects {tuple(target.array.qvalue.shape)}.")
        return jax.jit(lambda w: _quantize_leaf(w, target))(value)

    out = jax.tree_util.tree_map_with_path(leaf, lm_params)
    missing = set(abstract) - {path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(lm_params)[0]}
    if missing:
        raise QuantizeError(f"model.quantize: LM params lack {sorted(missing)[:3]}.")
    return out


def quantized_bytes(lm_params: Any) -> dict[str, int]:
    """Bytes of the LM tree: `quantized` (int values + scales of quantized kernels) and `float` (the rest).

    int4 values count half a byte each (their size packed, as XLA stores them on TPU/GPU).
    """
    totals = {"quantized": 0, "float": 0}
    for leaf in jax.tree_util.tree_leaves(lm_params, is_leaf=lambda x: isinstance(x, WithAux)):
        if isinstance(leaf, WithAux):
            q = leaf.array
            totals["quantized"] += _nbytes(q.qvalue) + _nbytes(q.scale)
            if q.zero_point is not None:
                totals["quantized"] += _nbytes(q.zero_point)
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
    """An architecture's `PARAM_AXES` extended to quantized kernels (`.../kernel/array/{qvalue,scale}`).

    qvalue is laid out as the kernel; a scale keeps the kernel's logical axes (its contraction axes have
    size 1 or few groups, which the partitioner replicates when they do not divide the mesh axis).
    """
    extra = []
    for pattern, names in param_axes:
        if pattern.endswith("kernel"):
            extra.append((pattern + "/array/(qvalue|scale)", names))
    return tuple(extra) + tuple(param_axes)


__all__ = ["MODES", "DEFAULT_GROUP_SIZE", "QuantizeError", "check_mode", "quantized_modules", "quantized_model",
           "quantize_params", "quantized_bytes", "float_kernel_bytes", "quantized_param_axes", "WithAux"]
