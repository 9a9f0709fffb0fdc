"""One HF mapping per architecture: a declarative table from which loading, sharded loading and export derive.

Each architecture writes its HF <-> ours conversion once, as data: `hf_table(config, tensor_names)` -> a tree
shaped like our params with a `FromHF` per leaf: which HF tensor(s) (one per layer for a stacked leaf),
transposed or not, how each HF axis splits into our axes (`[H*K]` -> `(H, K)`), where our part starts in a
fused tensor (GPT-2's `c_attn` thirds), whether the checkpoint may lack it (then zeros), and where llama.cpp
keeps it (`GGUF`: its name and the layout changes its converter made). From that one table:

* `load`: our params from any `TensorSource` (an in-memory dict, safetensors slices, a GGUF file);
* `read_block`: any block of a leaf, reading only the rectangular HF slices it needs (sharded loading);
* `to_hf`: our params back to an HF state dict (the inverse of each leaf: merged axes, transposed back,
  fused tensors written from their parts);
* `gguf_names`: the GGUF name of every HF tensor the table reads.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Collection, Mapping, Protocol

import jax
import numpy as np

from prefix_jax import hub

# (start, stop) per dimension of a block of our array.
Bounds = tuple[tuple[int, int], ...]


@dataclasses.dataclass(frozen=True)
class GGUF:
    """Where llama.cpp keeps a leaf's HF tensor: its name (`{i}`: the layer) and its converter's layout changes.

    transposed: stored as the transpose of HF's tensor (GPT-2's Conv1D weights are `[in, out]` in HF).
    rope_heads: rows interleaved per head for llama.cpp's RoPE layout (Llama's Q/K): the number of heads.
    plus_one: stored plus one (Gemma's `(1 + w)` norm weights, as llama.cpp's Gemma converters write them).
    """

    name: str
    transposed: bool = False
    rope_heads: int | None = None
    plus_one: bool = False


@dataclasses.dataclass(frozen=True)
class FromHF:
    """How one of our param leaves is read from HF tensors (and written back).

    names: the HF tensor, or one per layer for a stacked leaf (our leading axis is then the layer).
    split: per HF axis (after `transpose`), the sizes of our dims it becomes: `(D,)` kept, `(H, K)` for
      `[H*K]`, `()` for a size-1 axis that disappears.
    transpose: the HF tensor is 2-D and ours is its transpose (torch Linear `[out, in]` -> `[in, out]`).
    offset: per HF axis (after `transpose`), where our part starts (a third of a fused q/k/v tensor).
    optional: the checkpoint may lack it; it is then zeros (BART's `final_logits_bias` buffer).
    gguf: where a GGUF file keeps it (None: no GGUF of this family).
    """

    names: tuple[str, ...]
    split: tuple[tuple[int, ...], ...]
    stacked: bool = False
    transpose: bool = False
    offset: tuple[int, ...] | None = None
    optional: bool = False
    gguf: GGUF | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        lead = (len(self.names),) if self.stacked else ()
        return lead + tuple(d for group in self.split for d in group)

    def hf_extent(self) -> tuple[int, ...]:
        """The smallest HF shape this reads from (a fused tensor is larger along an offset axis)."""
        offset = self.offset or (0,) * len(self.split)
        extent = tuple(o + math.prod(g) for o, g in zip(offset, self.split))
        return extent[::-1] if self.transpose else extent


@dataclasses.dataclass(frozen=True)
class Zeros:
    """An optional leaf the checkpoint lacks: zeros (what `bind` puts in place of its `FromHF`)."""

    shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Transformed:
    """A leaf made from `src`'s blocks as they are read: a kernel quantized on load (`models.quantize_on_load`).

    `how` (`quantize.OnLoad`) says its parts (`parts()`: name -> shape/dtype; `assemble(parts)` -> the leaf,
    `split(leaf)` -> its parts), which block of `src` a block of a part is made from (`covering`), how
    (`compute(read, bounds, part)`, reading through this table) and which piece of it the block is (`take`).
    """

    src: FromHF
    how: Any

    @property
    def shape(self) -> tuple[int, ...]:
        return self.src.shape


def tensor(name: str, *split: tuple[int, ...], transpose: bool = False, offset: tuple[int, ...] | None = None,
           optional: bool = False, gguf: GGUF | None = None) -> FromHF:
    """One HF tensor -> one leaf (see `FromHF`)."""
    return FromHF((name,), tuple(split), False, transpose, offset, optional, gguf)


def layers(num_layers: int, name: str, *split: tuple[int, ...], transpose: bool = False,
           offset: tuple[int, ...] | None = None, gguf: GGUF | None = None) -> FromHF:
    """Per-layer HF tensors `name.format(i=layer)` -> one leaf with a leading layer axis."""
    return FromHF(tuple(name.format(i=i) for i in range(num_layers)), tuple(split), True, transpose, offset,
                  False, gguf)


def is_leaf(x: Any) -> bool:
    return isinstance(x, (FromHF, Zeros, Transformed))


def leaves(table: Any) -> list[FromHF | Zeros]:
    return jax.tree.leaves(table, is_leaf=is_leaf)


# --- Where tensors come from ---


class TensorSource(Protocol):
    """HF-named tensors, read by rectangular slices: a dict in memory, safetensors files, a GGUF file."""

    where: str  # the file or directory, for messages

    def names(self) -> set[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray: ...


class InMemory:
    """A state dict already in memory (a whole-file read)."""

    def __init__(self, tensors: Mapping[str, np.ndarray], where: str = ""):
        self.tensors, self.where = tensors, where

    def names(self) -> set[str]:
        return set(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        return self.tensors[name][index]


class SafetensorsFiles:
    """The safetensors files of a model directory, opened lazily, read by slices (`get_slice`): a block costs
    only its bytes. Counts the bytes this process read."""

    def __init__(self, model_dir: Path):
        single, index = model_dir / "model.safetensors", model_dir / "model.safetensors.index.json"
        self.where = str(model_dir)
        self.bytes_read = 0
        self._handles: dict[Path, Any] = {}
        if single.is_file():
            self.files = {name: single for name in self._handle(single).keys()}
        elif index.is_file():
            self.files = hub.shard_map(model_dir)
            for path in sorted(set(self.files.values())):  # every shard's header now, not mid-placement
                self._handle(path)
        else:
            raise hub.no_weights_error(model_dir)

    def _handle(self, path: Path) -> Any:
        if path not in self._handles:
            self._handles[path] = hub.open_safetensors(path)
        return self._handles[path]

    def names(self) -> set[str]:
        return set(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self.files[name]).get_slice(name).get_shape())

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        block = self._handle(self.files[name]).get_slice(name)[index]
        self.bytes_read += block.nbytes
        return block

    def total_bytes(self) -> int:
        """Size of the checkpoint's files (headers included)."""
        return sum(path.stat().st_size for path in set(self.files.values()))


def bind(table: Any, source: TensorSource, what: str) -> Any:
    """`table` checked against `source`: every tensor present (an optional leaf's absence makes it `Zeros`) and of
    the shape the config implies (`what`: where the config came from, e.g. "its config.json")."""
    present = source.names()

    def resolve(src: FromHF) -> FromHF | Zeros:
        return Zeros(src.shape) if src.optional and not all(n in present for n in src.names) else src

    bound = jax.tree.map(resolve, table, is_leaf=is_leaf)
    missing = sorted(name for name in hf_shapes(bound) if name not in present)
    if missing:
        names = ", ".join(repr(n) for n in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise hub.ModelNotFoundError(
            f"checkpoint {source.where} has no tensor {names}: it is not the architecture its config names, or it "
            "was saved by an incompatible library version.")
    for name, expected in hf_shapes(bound).items():
        shape = source.shape(name)
        if shape != expected:
            raise hub.ModelFileError(
                f"{source.where}: tensor {name!r} has shape {shape}, but {what} implies {expected}; the files come "
                "from different models, save the model again.")
    return bound


def hf_shapes(table: Any) -> dict[str, tuple[int, ...]]:
    """The shape of every HF tensor the table reads (a fused tensor: the union of its parts)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for src in leaves(table):
        if isinstance(src, FromHF):
            for name in src.names:
                old = shapes.get(name, (0,) * len(src.split))
                shapes[name] = tuple(max(a, b) for a, b in zip(old, src.hf_extent()))
    return shapes


# --- HF -> ours ---


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


def read_block(source: TensorSource, src: FromHF | Zeros, bounds: Bounds, dtype: Any,
               stored: str | None = None) -> np.ndarray:
    """The block `bounds` of our leaf, in `dtype`, reading only the HF slices it needs. `stored`: instead of
    the float values, a quantized file's stored "values" / "scale" / "min" per value (`GGUFTensors.read`),
    in their own dtype."""
    block_shape = tuple(b - a for a, b in bounds)
    if isinstance(src, Zeros):
        return np.zeros(block_shape, dtype)
    names = src.names[slice(*bounds[0])] if src.stacked else src.names
    hf_index, shape, inner = _hf_read(src, bounds[1:] if src.stacked else bounds)
    parts = []
    for name in names:
        x = source.read(name, hf_index) if stored is None else source.read(name, hf_index, stored)
        x = (x.T if src.transpose else x).reshape(shape)[inner]
        parts.append(np.asarray(x, dtype=dtype) if stored is None else x)
    out = np.stack(parts) if src.stacked else parts[0]
    return np.ascontiguousarray(out)


def full_bounds(shape: tuple[int, ...]) -> Bounds:
    return tuple((0, n) for n in shape)


def read_part(source: TensorSource, leaf: Transformed, part: str, bounds: Bounds, dtype: Any,
              made: dict) -> np.ndarray:
    """The block `bounds` of the array `part` of a transformed leaf, made from the block of `leaf.src` covering
    it (kept in `made`, by that block's bounds, for the other blocks and parts it makes)."""
    covering = leaf.how.covering(part, bounds)
    got = made.setdefault(covering, {})
    if part not in got:
        read = lambda b, stored=None: read_block(source, leaf.src, b, dtype, stored)
        got.update(leaf.how.compute(read, covering, part))
    return leaf.how.take(part, got[part], covering, bounds)


def load(table: Any, source: TensorSource, dtype: Any) -> Any:
    """Our params (host numpy arrays in `dtype`; a transformed leaf: its parts) from a bound table (`bind`)."""
    dtype = np.dtype(dtype)

    def whole(src: FromHF | Zeros | Transformed) -> Any:
        if not isinstance(src, Transformed):
            return read_block(source, src, full_bounds(src.shape), dtype)
        made: dict = {}
        return src.how.assemble({part: read_part(source, src, part, full_bounds(s.shape), dtype, made)
                                 for part, s in src.how.parts().items()})

    return jax.tree.map(whole, table, is_leaf=is_leaf)


def shapes(table: Any, dtype: Any) -> Any:
    """`ShapeDtypeStruct` per leaf (what the partition rules need; a transformed leaf: per part)."""
    def shape(src: FromHF | Zeros | Transformed) -> Any:
        if isinstance(src, Transformed):
            return src.how.assemble(src.how.parts())
        return jax.ShapeDtypeStruct(src.shape, np.dtype(dtype))

    return jax.tree.map(shape, table, is_leaf=is_leaf)


class _Unread:
    """A leaf not read yet: its shape and dtype, and any block of it read when indexed (a fingerprint's corner)."""

    def __init__(self, source: TensorSource, src: FromHF | Zeros, dtype: Any):
        self.source, self.src, self.shape, self.dtype = source, src, src.shape, np.dtype(dtype)

    def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
        bounds = tuple(s.indices(n)[:2] for s, n in zip(index, self.shape))
        return read_block(self.source, self.src, bounds, self.dtype)


def unread(table: Any, source: TensorSource, dtype: Any) -> Any:
    """The float params of `table` (transformed leaves: before their transform) as leaves read only when indexed."""
    return jax.tree.map(lambda src: _Unread(source, src.src if isinstance(src, Transformed) else src, dtype), table,
                        is_leaf=is_leaf)


# --- ours -> HF ---


def to_hf(table: Any, params: Any) -> dict[str, np.ndarray]:
    """Our params -> an HF state dict: each leaf's axes merged back, transposed back, fused tensors written from
    their parts. Tensors the table does not read (a tied head) are not written."""
    extents = hf_shapes(table)
    oriented: dict[str, np.ndarray] = {}  # per HF name, in our orientation (before transposing back)
    transposed: dict[str, bool] = {}
    sources, treedef = jax.tree_util.tree_flatten(table, is_leaf=is_leaf)
    for src, value in zip(sources, treedef.flatten_up_to(params)):  # raises if params are not the table's tree
        if not isinstance(src, FromHF):
            continue
        value = np.asarray(value)
        for name, x in zip(src.names, value if src.stacked else [value]):
            x = x.reshape(tuple(math.prod(g) for g in src.split))
            if src.offset is None:
                oriented[name] = x
            else:
                extent = extents[name][::-1] if src.transpose else extents[name]
                buffer = oriented.setdefault(name, np.zeros(extent, x.dtype))
                buffer[tuple(slice(o, o + n) for o, n in zip(src.offset, x.shape))] = x
            transposed[name] = src.transpose
    return {name: np.ascontiguousarray(x.T if transposed[name] else x) for name, x in oriented.items()}


# --- GGUF ---


def gguf_names(table: Any) -> dict[str, tuple[str, GGUF]]:
    """HF tensor name -> (its llama.cpp name, layout changes) for every leaf with a GGUF column."""
    out = {}
    for src in leaves(table):
        if isinstance(src, FromHF) and src.gguf is not None:
            for i, name in enumerate(src.names):
                out[name] = (src.gguf.name.format(i=i), src.gguf)
    return out


def base_prefix(names: Collection[str] | None, probe: str, prefix: str) -> str:
    """`prefix` (e.g. `model.`) unless the checkpoint names `probe` without it (a bare `*Model` was saved)."""
    return "" if names is not None and probe in names and prefix + probe not in names else prefix
