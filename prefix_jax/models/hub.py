"""Finding a pretrained checkpoint (local directory or Hugging Face Hub id) and reading its tensors.

Weights are read from safetensors only: nothing is ever unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# What a model directory needs for us: config, weights, tokenizer. Never `*.bin`/`*.pt` (pickles).
_HUB_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "spiece.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
]


class ModelNotFoundError(ValueError):
    """The model could not be found locally nor downloaded."""


def resolve_model_dir(name_or_path: str, field: str = "model.name_or_path") -> Path:
    """A local directory holding `config.json` + safetensors: `name_or_path` itself, or a Hub download."""
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelNotFoundError(f"{field}={name_or_path!r} is a directory without config.json; point it at a "
                                     "directory written by `save_pretrained` (config.json + *.safetensors).")
        return local
    if name_or_path.startswith((".", "/", "~")) or local.suffix:
        raise ModelNotFoundError(f"{field}={name_or_path!r}: no such directory.")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # offline, unknown id, gated repo, ...
        raise ModelNotFoundError(
            f"{field}={name_or_path!r} is not a local directory and could not be fetched from the Hugging Face Hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}).\n"
            f"On a machine with internet: `huggingface-cli download {name_or_path} --local-dir DIR` (or "
            f"`hf download ...`), copy DIR here and pass --config.{field}=DIR."
        ) from e


def _load_file(path: Path) -> dict[str, np.ndarray]:
    """One safetensors file as numpy arrays; bfloat16 tensors (which `safetensors.numpy` cannot give, numpy
    having no bfloat16) as `ml_dtypes.bfloat16` arrays read from the file's header and bytes."""
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except TypeError:  # "data type 'bfloat16' not understood"
        pass
    import ml_dtypes

    dtypes = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8,
              "I16": np.int16, "I32": np.int32, "I64": np.int64, "U8": np.uint8, "BOOL": np.bool_}
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in dtypes:
            raise ModelNotFoundError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which we do not read.")
        start, end = info["data_offsets"]
        tensors[name] = np.array(data[start:end].view(dtypes[info["dtype"]]).reshape(info["shape"]))
    return tensors


def read_safetensors(model_dir: Path) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory (single file or sharded with an index), as numpy arrays."""
    single = model_dir / "model.safetensors"
    index = model_dir / "model.safetensors.index.json"
    if single.is_file():
        return _load_file(single)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        tensors: dict[str, np.ndarray] = {}
        for shard in shards:
            tensors.update(_load_file(model_dir / shard))
        return tensors
    pickles = [p.name for p in model_dir.glob("*.bin")] + [p.name for p in model_dir.glob("*.pt")]
    hint = (f" It has {pickles}, which we do not load (unpickling runs code). Convert once with transformers: "
            "`AutoModel...from_pretrained(DIR).save_pretrained(OUT, safe_serialization=True)`.") if pickles else ""
    raise ModelNotFoundError(f"{model_dir} holds no model.safetensors or model.safetensors.index.json.{hint}")


def take(tensors: dict[str, np.ndarray], name: str, model_dir: str = "") -> np.ndarray:
    """`tensors[name]`, or an error saying the checkpoint is not of the expected architecture."""
    try:
        return tensors[name]
    except KeyError:
        raise ModelNotFoundError(
            f"checkpoint {model_dir} has no tensor {name!r}: it is not the architecture its config names, "
            "or it was saved by an incompatible library version."
        ) from None
