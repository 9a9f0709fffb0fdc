"""Loading a checkpoint straight into the shards of a mesh: no host ever holds the whole model.

Each architecture describes its HF -> ours conversion per leaf as data (`hf_layout(config, tensor
names)` -> a tree of `FromHF`, next to its `params_from_hf`): which HF tensor(s), transposed or not,
how each HF axis splits into our axes (`[H*K]` -> `(H, K)`), and where our part starts in a fused
tensor (GPT-2's `c_attn` thirds). Knowing that, any block of our array maps to one rectangular slice
of each HF tensor, which `safetensors`' `get_slice` reads without touching the rest of the file.
`jax.make_array_from_callback` asks for the block each addressable device holds; devices holding the
same block (replicated axes) share one read. Values are cast per block, so a bfloat16 checkpoint
loaded as bfloat16 never exists in float32. The result equals `load_pretrained` + placement bitwise.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable

import logging

import jax
import numpy as np
from jax.sharding import Mesh

from prefix_jax import hub, models, partitioning, sharding
from prefix_jax.models import gguf_checkpoint

log = logging.getLogger("prefix_jax")

# (start, stop) per dimension of a block of our array.
Bounds = tuple[tuple[int, int], ...]


@dataclasses.dataclass(frozen=True)
class FromHF:
    """How one of our param leaves is read from HF tensors, block by block.

    names: the HF tensor, or one per layer for a stacked leaf (our leading axis is then the layer).
    split: per HF axis (after `transpose`), the sizes of our dims it becomes: `(D,)` kept, `(H, K)` for
      `[H*K]`, `()` for a size-1 axis that disappears.
    transpose: the HF tensor is 2-D and ours is its transpose (torch Linear `[out, in]` -> `[in, out]`).
    offset: per HF axis (after `transpose`), where our part starts (a third of a fused q/k/v tensor).
    """

    names: tuple[str, ...]
    split: tuple[tuple[int, ...], ...]
    stacked: bool = False
    transpose: bool = False
    offset: tuple[int, ...] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        lead = (len(self.names),) if self.stacked else ()
        return lead + tuple(d for group in self.split for d in group)

    def hf_extent(self) -> tuple[int, ...]:
        """The smallest HF shape this reads from (a fused tensor may be larger along an offset axis)."""
        offset = self.offset or (0,) * len(self.split)
        extent = tuple(o + math.prod(g) for o, g in zip(offset, self.split))
        return extent[::-1] if self.transpose else extent


@dataclasses.dataclass(frozen=True)
class Zeros:
    """A leaf the checkpoint may lack, which is then zeros (BART's `final_logits_bias` buffer)."""

    shape: tuple[int, ...]


def tensor(name: str, *split: tuple[int, ...], transpose: bool = False, offset: tuple[int, ...] | None = None
           ) -> FromHF:
    """One HF tensor -> one leaf (see `FromHF`)."""
    return FromHF((name,), tuple(split), False, transpose, offset)


def layers(num_layers: int, name: str, *split: tuple[int, ...], transpose: bool = False,
           offset: tuple[int, ...] | None = None) -> FromHF:
    """Per-layer HF tensors `name.format(i=layer)` -> one leaf with a leading layer axis."""
    return FromHF(tuple(name.format(i=i) for i in range(num_layers)), tuple(split), True, transpose, offset)


def _hf_read(src: FromHF, bounds: Bounds) -> tuple[tuple[slice, ...], tuple[int, ...], tuple[slice, ...]]:
    """For a block of our (per-layer) array: the HF slice to read, the shape to give what was read, and the
    slice of that which is the block. An HF axis split into (H, K) is read over whole K rows."""
    hf_index, shape, inner = [], [], []
    position = 0
    offset = src.offset or (0,) * len(src.split)
    for group, start in zip(src.split, offset):
        dims = bounds[position:position + len(group)]
        position += len(group)
        if not group:
            hf_index.append(slice(start, start + 1))
            continue
        (lo, hi), rest = dims[0], math.prod(group[1:])
        hf_index.append(slice(start + lo * rest, start + hi * rest))
        shape += [hi - lo, *group[1:]]
        inner += [slice(None)] + [slice(a, b) for a, b in dims[1:]]
    if src.transpose:
        hf_index = hf_index[::-1]
    return tuple(hf_index), tuple(shape), tuple(inner)


def read_block(read: Callable[[str, tuple[slice, ...]], np.ndarray], src: FromHF | Zeros, bounds: Bounds,
               dtype: Any) -> np.ndarray:
    """The block `bounds` of our leaf, reading only the HF slices it needs (`read(name, index)`)."""
    block_shape = tuple(b - a for a, b in bounds)
    if isinstance(src, Zeros):
        return np.zeros(block_shape, dtype)
    names = src.names[slice(*bounds[0])] if src.stacked else src.names
    hf_index, shape, inner = _hf_read(src, bounds[1:] if src.stacked else bounds)
    parts = []
    for name in names:
        x = read(name, hf_index)
        x = (x.T if src.transpose else x).reshape(shape)[inner]
        parts.append(np.asarray(x, dtype=dtype))
    out = np.stack(parts) if src.stacked else parts[0]
    return np.ascontiguousarray(out)


def _bounds(index: tuple[slice, ...], shape: tuple[int, ...]) -> Bounds:
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def _open(path: Path) -> Any:
    """A safetensors file opened for slice reads, checked (a seam for tests that count what is read)."""
    return hub.open_safetensors(path)


class Checkpoint:
    """The safetensors files of a model directory, opened lazily; reads slices by tensor name."""

    def __init__(self, model_dir: Path):
        single, index = model_dir / "model.safetensors", model_dir / "model.safetensors.index.json"
        self.model_dir = model_dir
        self.bytes_read = 0  # by this process
        if single.is_file():
            self._files = {single: None}
            self.files = {name: single for name in self._handle(single).keys()}
        elif index.is_file():
            self.files = hub.shard_map(model_dir)
            self._files = {}
            for path in sorted(set(self.files.values())):  # every shard's header now, not mid-placement
                self._handle(path)
        else:
            raise hub.no_weights_error(model_dir)

    def _handle(self, path: Path) -> Any:
        if self._files.get(path) is None:
            self._files[path] = _open(path)
        return self._files[path]

    def _slice(self, name: str) -> Any:
        if name not in self.files:
            raise hub.ModelNotFoundError(
                f"checkpoint {self.model_dir} has no tensor {name!r}: it is not the architecture its config names, "
                "or it was saved by an incompatible library version.")
        return self._handle(self.files[name]).get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        block = self._slice(name)[index]
        self.bytes_read += block.nbytes
        return block

    def total_bytes(self) -> int:
        """Size of the checkpoint's files (headers included)."""
        return sum(path.stat().st_size for path in set(self.files.values()))

    def check(self, layout: Any) -> None:
        """Every tensor a layout reads exists and is at least as large as the layout expects."""
        for src in jax.tree.leaves(layout, is_leaf=_is_source):
            if isinstance(src, Zeros):
                continue
            expected = src.hf_extent()
            for name in src.names:
                shape = self.shape(name)
                if len(shape) != len(expected) or any(s < e for s, e in zip(shape, expected)):
                    raise hub.ModelNotFoundError(
                        f"checkpoint {self.model_dir}: tensor {name!r} has shape {shape}, but its config implies "
                        f"{expected}; the config.json does not describe these weights.")


def _is_source(x: Any) -> bool:
    return isinstance(x, (FromHF, Zeros))


def place_from_checkpoint(checkpoint: Checkpoint, layout: Any, shardings: Any, dtype: Any) -> Any:
    """Our params as global arrays with `shardings`, each device's block read from `checkpoint` (once per block)."""
    def build(src: FromHF | Zeros, sharding: Any) -> jax.Array:
        blocks: dict[Bounds, np.ndarray] = {}

        def block(index: tuple[slice, ...]) -> np.ndarray:
            bounds = _bounds(index, src.shape)
            if bounds not in blocks:
                blocks[bounds] = read_block(checkpoint.read, src, bounds, dtype)
            return blocks[bounds]

        return jax.make_array_from_callback(src.shape, sharding, block)

    return jax.tree.map(build, layout, shardings, is_leaf=_is_source)


def layout_shapes(layout: Any, dtype: Any) -> Any:
    """`ShapeDtypeStruct` per leaf of a layout (what the partition rules need)."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, np.dtype(dtype)), layout, is_leaf=_is_source)


def load_sharded(name_or_path: str, mesh: Mesh, strategy: str = "fsdp_tensor", param_dtype: str = "float32",
                 compute_dtype: str | None = None, **config_overrides: Any) -> Any:
    """`models.load_pretrained`, with the params read straight into their shards on `mesh`.

    The params are global `jax.Array`s laid out by `partitioning.lm_shardings(..., strategy, mesh)`; every
    process reads only the blocks its own devices hold. Architectures without an `hf_layout`, and GGUF
    files (dequantized tensor by tensor), are read whole and then placed.
    """
    for field, value in (("model.param_dtype", param_dtype), ("model.compute_dtype", compute_dtype)):
        if value is not None and value not in models.DTYPES:
            raise ValueError(f"{field}={value!r} is not supported; use one of {models.DTYPES}.")
    partitioning.check_strategy(strategy)
    is_gguf = gguf_checkpoint.resolve(name_or_path) is not None
    if not is_gguf:
        model_dir = hub.resolve_model_dir(name_or_path)
        arch, hf_config = models.read_config(model_dir)
    if is_gguf or not hasattr(arch, "hf_layout"):
        lm = models.load_pretrained(name_or_path, param_dtype, compute_dtype, **config_overrides)
        shardings = partitioning.lm_shardings(lm.params, models.architecture(lm.config.architecture).PARAM_AXES,
                                              strategy, mesh)
        return dataclasses.replace(lm, params=sharding.place(lm.params, shardings))
    known = {f.name for f in dataclasses.fields(arch.Config)}
    for field in config_overrides:
        if field not in known:
            raise ValueError(f"model.{field} does not apply to {hf_config.model_type} models; leave it unset.")
    checkpoint = Checkpoint(model_dir)
    config = arch.Config.from_hf(hf_config, set(checkpoint.files), dtype=compute_dtype or param_dtype,
                                 param_dtype=param_dtype, **config_overrides)
    layout = arch.hf_layout(config, set(checkpoint.files))
    checkpoint.check(layout)
    shardings = partitioning.lm_shardings(layout_shapes(layout, param_dtype), arch.PARAM_AXES, strategy, mesh)
    params = place_from_checkpoint(checkpoint, layout, shardings, np.dtype(param_dtype))
    log.info("LM loaded into its shards (%s on mesh %s): process %d read %d of the checkpoint's %d bytes",
             strategy, dict(mesh.shape), jax.process_index(), checkpoint.bytes_read, checkpoint.total_bytes())
    return models.PretrainedLM(name_or_path, model_dir, config, arch.Model(config), params, hf_config)


def shardings_of(params: Any) -> Any:
    """The sharding of each placed leaf (what a jitted step takes as the LM's in_shardings)."""
    return jax.tree.map(lambda x: x.sharding, params)

