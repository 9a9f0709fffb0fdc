"""Partition rules for the frozen LM: param path -> logical axis names -> mesh axes.

Each architecture module holds `PARAM_AXES`, an ordered table of (regex, logical names): the first
regex that fullmatches a leaf's "/"-joined param path (e.g. `encoder/layers/self_attention/query/kernel`)
names each of its dimensions. A strategy maps logical names to mesh axes (`STRATEGIES`); a name it
does not map is replicated. Two facts keep every spec valid on every mesh: a dimension whose size
does not divide its mesh axis is replicated instead (with a log line: GPT-2's vocab 50257), and a
mesh axis is used at most once per leaf. The scanned `layers` axis is never sharded (the scan slices it).

A leaf's dimensions take their mesh axes in `LOGICAL_AXES` order. A quantized vocabulary matrix
(`quantize.quantized_param_axes` names its vocabulary axis `quantized_vocab`, first in that order) is split
along its rows under every strategy that shards the LM (fsdp too): a row's scales (int8: one per row; int4
and GGUF blocks: groups along the width) then stay within one shard, so a process loads only its rows,
quantized as the whole matrix would be. Only where the rows divide no mesh axis does fsdp split its width
(int4 / GGUF groups stay local when they divide the shard; an int8 row's scale then needs the whole row).

The trainable prefix tree and its optimizer state are replicated (they are small); how the prefix K/V a
step materializes are laid out is `prefix.constrain_kv`.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any, Mapping, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

from prefix_jax.sharding import FSDP_AXIS, MODEL_AXIS

log = logging.getLogger("prefix_jax")

# Logical axis names a PARAM_AXES table may use (None: a dimension no strategy shards).
LOGICAL_AXES = ("quantized_vocab", "layers", "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "norm",
                "positions", "buckets")

ParamAxes = Sequence[tuple[str, tuple[str | None, ...]]]

_FSDP = {"embed": FSDP_AXIS, "quantized_vocab": FSDP_AXIS}
_TENSOR = {"heads": MODEL_AXIS, "kv_heads": MODEL_AXIS, "mlp": MODEL_AXIS, "vocab": MODEL_AXIS,
           "quantized_vocab": MODEL_AXIS}
# A logical name maps to one mesh axis, or to several (a dimension split over their product, major first; an axis
# the dimension does not divide is left out).
STRATEGIES: dict[str, dict[str, str | tuple[str, ...]]] = {
    "replicated": {},
    "fsdp": _FSDP,  # weights split along d_model over `fsdp`, all-gathered per layer in the step
    "tensor": _TENSOR,  # heads / MLP / vocab split over `model` (capped by the KV-head count)
    "fsdp_tensor": {**_FSDP, **_TENSOR, "quantized_vocab": (FSDP_AXIS, MODEL_AXIS)},
}


class PartitionError(ValueError):
    """An LM leaf has no partition rule, or a rule does not fit the leaf."""


def path_name(path: tuple) -> str:
    """A pytree key path as the "/"-joined string the rules match (`decoder/layers/ffn/wo/kernel`)."""
    parts = []
    for key in path:
        name = getattr(key, "key", None)
        if name is None:
            name = getattr(key, "name", None)
        if name is None:
            name = getattr(key, "idx", key)
        parts.append(str(name))
    return "/".join(parts)


def check_strategy(strategy: str, field: str = "mesh.lm_partitioning") -> dict[str, str]:
    """The logical -> mesh axis table of a strategy name."""
    if strategy not in STRATEGIES:
        raise PartitionError(f"{field}={strategy!r} is not a strategy; choose one of {sorted(STRATEGIES)}.")
    return STRATEGIES[strategy]


def logical_axes(params: Any, param_axes: ParamAxes) -> Any:
    """Per leaf of `params` (arrays or shape structs), its tuple of logical axis names."""
    compiled = [(re.compile(pattern), names) for pattern, names in param_axes]

    def leaf_axes(path: tuple, leaf: Any) -> tuple[str | None, ...]:
        name = path_name(path)
        for pattern, names in compiled:
            if pattern.fullmatch(name):
                if len(names) != len(leaf.shape):
                    raise PartitionError(f"LM param {name} has shape {tuple(leaf.shape)} but its PARAM_AXES rule "
                                         f"{pattern.pattern!r} names {len(names)} axes {names}; fix the rule.")
                unknown = [n for n in names if n is not None and n not in LOGICAL_AXES]
                if unknown:
                    raise PartitionError(f"PARAM_AXES rule {pattern.pattern!r} uses unknown logical axes {unknown}; "
                                         f"use {LOGICAL_AXES} or None.")
                return tuple(names)
        raise PartitionError(f"LM param {name} (shape {tuple(leaf.shape)}) matches no PARAM_AXES rule; add a "
                             "(regex, axes) row for it to the architecture's table.")

    return jax.tree_util.tree_map_with_path(leaf_axes, params)


def _spec(name: str, shape: tuple[int, ...], names: tuple[str | None, ...],
          rules: Mapping[str, str | tuple[str, ...]], mesh_sizes: Mapping[str, int]) -> PartitionSpec:
    used: set[str] = set()
    spec: list[str | tuple[str, ...] | None] = [None] * len(shape)
    order = sorted(range(len(shape)), key=lambda d: LOGICAL_AXES.index(names[d]) if names[d] else len(LOGICAL_AXES))
    for dim in order:  # the dimensions in LOGICAL_AXES order: the first one mapped to a mesh axis takes it
        size, logical = shape[dim], names[dim]
        mapped = rules.get(logical) if logical not in (None, "layers") else None
        mapped = (mapped,) if isinstance(mapped, str) else mapped or ()
        # a mesh axis of size 1 splits nothing; a mesh axis may shard one dimension of a leaf only
        axes = tuple(a for a in mapped if mesh_sizes.get(a, 1) > 1 and a not in used)
        if not axes:
            continue
        kept: tuple[str, ...] = ()
        for axis in axes:  # major first, each kept while the dimension divides the product
            if size % (math.prod(mesh_sizes[a] for a in kept) * mesh_sizes[axis]) == 0:
                kept += (axis,)
            else:
                log.info("partitioning: %s dim %r (%d) does not divide mesh axis %r (%d%s); replicated along it",
                         name, logical, size, axis, mesh_sizes[axis], f" x {kept}" if kept else "")
        if kept:
            used.update(kept)
            spec[dim] = kept if len(kept) > 1 else kept[0]
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def lm_partition_specs(params: Any, param_axes: ParamAxes, strategy: str, mesh: Any) -> Any:
    """`PartitionSpec` per LM leaf under `strategy` on `mesh` (a `Mesh` or `AbstractMesh`; only sizes are read)."""
    rules = check_strategy(strategy)
    sizes = dict(mesh.shape)
    axes = logical_axes(params, param_axes)
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf, names: _spec(path_name(path), tuple(leaf.shape), names, rules, sizes),
        params, axes)  # down to the arrays: a quantized kernel (qwix WithAux) has a shape but holds two


def lm_shardings(params: Any, param_axes: ParamAxes, strategy: str, mesh: Any) -> Any:
    """`NamedSharding` per LM leaf (see `lm_partition_specs`)."""
    specs = lm_partition_specs(params, param_axes, strategy, mesh)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
