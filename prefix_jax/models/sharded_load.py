"""Loading a checkpoint straight into the shards of a mesh: no host ever holds the whole model.

The architecture's HF table (`hf_mapping`) says, per leaf, which HF tensor slices make any block of our
array. `jax.make_array_from_callback` asks for the block each addressable device holds; devices holding the
same block (replicated axes) share one read, and `safetensors`' `get_slice` (or a GGUF file's rows) reads
the block without touching the rest of the file. Values are cast per block, so a bfloat16 checkpoint loaded
as bfloat16 never exists in float32. The result equals `load_pretrained` + placement bitwise.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from prefix_jax import models, partitioning
from prefix_jax.models import hf_mapping

log = logging.getLogger("prefix_jax")


def _bounds(index: tuple[slice, ...], shape: tuple[int, ...]) -> hf_mapping.Bounds:
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def place(table: Any, source: hf_mapping.TensorSource, shardings: Any, dtype: Any) -> Any:
    """Our params as global arrays with `shardings`, each device's block read from `source` (once per block).

    A transformed (quantized) leaf: each part's blocks (integer values, scales) are made on the host from the
    blocks of the float kernel that cover them (`hf_mapping.read_part`) and placed as they are.
    """
    def build(src: Any, sharding: Any) -> Any:
        if isinstance(src, hf_mapping.Transformed):
            made: dict = {}
            shards = src.how.split(sharding)
            return src.how.assemble({
                part: jax.make_array_from_callback(s.shape, shards[part], lambda index, part=part, s=s: (
                    hf_mapping.read_part(source, src, part, _bounds(index, s.shape), dtype, made)))
                for part, s in src.how.parts().items()})

        blocks: dict[hf_mapping.Bounds, np.ndarray] = {}

        def block(index: tuple[slice, ...]) -> np.ndarray:
            bounds = _bounds(index, src.shape)
            if bounds not in blocks:
                blocks[bounds] = hf_mapping.read_block(source, src, bounds, dtype)
            return blocks[bounds]

        return jax.make_array_from_callback(src.shape, sharding, block)

    return jax.tree.map(build, table, shardings, is_leaf=hf_mapping.is_leaf)


def load_sharded(name_or_path: str, mesh: Mesh, strategy: str = "fsdp_tensor", param_dtype: str = "float32",
                 compute_dtype: str | None = None, quantize: str = "none",
                 quantize_group_size: int | None = None, quantize_embeddings: bool = True,
                 **config_overrides: Any) -> models.PretrainedLM:
    """`models.load_pretrained`, with the params read straight into their shards on `mesh`.

    The params are global `jax.Array`s laid out by `partitioning.lm_shardings(..., strategy, mesh)`; every
    process reads only the blocks its own devices hold (a GGUF: only the rows of its tensors they need).
    `quantize` (`model.quantize`): kernels quantized on the host as they are read, straight into their shards
    (no float kernel is ever a device array). Where the mesh splits a kernel along its contraction, a block's
    scale needs the whole group: int4 groups are read whole (local when the group divides the shard); int8's
    group is the whole contraction, so a process reads the full contraction for the output channels it holds.
    A quantized vocabulary matrix is split along its vocabulary rows under every strategy
    (`quantize.quantized_param_axes`), so its scales are local and a process reads only its rows.
    """
    models.check_dtypes(param_dtype, compute_dtype)
    partitioning.check_strategy(strategy)
    opened = models.open_checkpoint(name_or_path, param_dtype, compute_dtype, lazy=True, **config_overrides)
    dtype = np.dtype(jax.numpy.dtype(param_dtype))
    model, table, fingerprint = models.quantize_on_load(opened, dtype, quantize, quantize_group_size,
                                                        quantize_embeddings)
    axes = opened.arch.PARAM_AXES
    if quantize != "none":  # qwix: only quantized loads import it
        from prefix_jax.quantize import quantized_param_axes

        axes = quantized_param_axes(axes)
    shardings = partitioning.lm_shardings(hf_mapping.shapes(table, dtype), axes, strategy, mesh)
    params = place(table, opened.source, shardings, dtype)
    log.info("LM loaded into its shards (%s on mesh %s): process %d read %d of the checkpoint's %d bytes",
             strategy, dict(mesh.shape), jax.process_index(), opened.source.bytes_read,
             opened.source.total_bytes())
    return models.PretrainedLM(name_or_path, opened.model_dir, opened.config, model, params, opened.hf_config,
                               fingerprint)


def shardings_of(params: Any) -> Any:
    """The sharding of each placed leaf (what a jitted step takes as the LM's in_shardings)."""
    return jax.tree.map(lambda x: x.sharding, params)
