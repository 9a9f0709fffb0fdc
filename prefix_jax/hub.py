"""Finding a pretrained checkpoint (local directory or Hugging Face Hub id) and reading its files.

Weights are read from safetensors only: nothing is ever unpickled. A name that looks like a path is
never sent to the Hub, and every Hub request has a timeout. Every unreadable file is a one-line error
naming the file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np

# What a model directory needs for us: config, weights, tokenizer. Never `*.bin`/`*.pt` (pickles).
TOKENIZER_PATTERNS = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "spiece.model",
    "tokenizer.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
]
_MODEL_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                   *TOKENIZER_PATTERNS]

# A Hub repo id: `name` or `owner/name`, letters, digits, `-`, `_`, `.`.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


class ModelNotFoundError(ValueError):
    """The model could not be found locally nor downloaded."""


class ModelFileError(ModelNotFoundError):
    """A file of the model directory is unreadable (truncated, corrupt, invalid JSON, missing shard)."""


# --- Local paths vs Hub ids ---


def looks_local(name: str) -> bool:
    """True when `name` can only mean a local path, so it must never be sent to the Hub.

    Local: starts with `/`, `~` or `.` (`./x`, `../x`), has a backslash or more than one `/`, ends with
    `/`, is not a valid Hub id, or its first component exists here (`runs/mymodel` when `runs/` exists).
    """
    if not name or name.startswith(("/", "~", ".")) or name.endswith("/") or "\\" in name:
        return True
    if name.count("/") > 1 or not _HUB_ID.fullmatch(name):
        return True
    return "/" in name and Path(name.split("/")[0]).exists()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0].strip() if text else ""


def describe(e: BaseException) -> str:
    """`Type: first line` of an exception, plus its root cause when that says more (e.g. a timeout)."""
    out = f"{type(e).__name__}: {_first_line(e)}".rstrip(": ")
    root, seen = e, set()
    while (root.__cause__ or root.__context__) is not None and id(root) not in seen:
        seen.add(id(root))
        root = root.__cause__ or root.__context__
    if root is not e:
        out += f" <- {type(root).__name__}: {_first_line(root)}".rstrip(": ")
    return out


def _timed_out(e: BaseException) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if "timeout" in type(e).__name__.lower() or "timed out" in str(e).lower():
            return True
        e = e.__cause__ or e.__context__
    return False


def unreachable(e: BaseException) -> bool:
    """True when `e` (or its cause) says the Hub could not be reached: offline mode, no connection, timeout."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        kind = type(e).__name__
        if any(word in kind for word in ("Connect", "Timeout", "Offline", "LocalEntryNotFound", "NetworkError")) or \
                "timed out" in str(e).lower() or "offline" in str(e).lower():
            return True
        e = e.__cause__ or e.__context__
    return False


# --- Hub access with timeouts ---


def hub_timeout_s() -> float:
    """Seconds any one Hub request may wait: `HF_HUB_ETAG_TIMEOUT` / `HF_HUB_DOWNLOAD_TIMEOUT` (default 10)."""
    from huggingface_hub import constants

    return float(max(constants.HF_HUB_ETAG_TIMEOUT, constants.HF_HUB_DOWNLOAD_TIMEOUT))


def _fill_missing_timeouts(request: Any) -> None:
    """httpx request hook: huggingface_hub passes `timeout=None` (wait forever) on some calls
    (e.g. `repo_info`); behind a firewall that drops packets those hang. Give them our bound."""
    bound = hub_timeout_s()
    timeout = dict(request.extensions.get("timeout") or {})
    request.extensions["timeout"] = {k: bound if timeout.get(k) is None else timeout[k]
                                      for k in ("connect", "read", "write", "pool")}


_timeouts_installed = False


def bound_hub_timeouts() -> None:
    """Makes every `huggingface_hub` request (models, tokenizers, `datasets`) time out. Idempotent."""
    global _timeouts_installed
    if _timeouts_installed:
        return
    import huggingface_hub
    from huggingface_hub.utils import _http

    previous: Callable[[], Any] = getattr(_http, "_GLOBAL_CLIENT_FACTORY", _http.default_client_factory)

    def client_factory() -> Any:
        client = previous()
        hooks = dict(client.event_hooks)
        hooks["request"] = [*hooks.get("request", []), _fill_missing_timeouts]
        client.event_hooks = hooks
        return client

    huggingface_hub.set_client_factory(client_factory)
    _timeouts_installed = True


def hub_error_hint(e: BaseException) -> str:
    """What went wrong talking to the Hub, in a few words."""
    if _timed_out(e):
        return (f"no answer within {hub_timeout_s():g} s ({describe(e)}); behind a firewall or offline? Raise "
                "HF_HUB_ETAG_TIMEOUT / HF_HUB_DOWNLOAD_TIMEOUT to wait longer")
    return describe(e)


def download(repo_id: str, patterns: list[str], field: str, what: str) -> Path:
    """`snapshot_download` of the files matching `patterns`, or a one-line error saying how to go local."""
    bound_hub_timeouts()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=patterns, etag_timeout=hub_timeout_s()))
    except Exception as e:  # offline, unknown id, gated repo, timeout ...
        raise ModelNotFoundError(
            f"{field}={repo_id!r} is not a local directory and the {what} could not be fetched from the Hugging "
            f"Face Hub ({hub_error_hint(e)}). On a machine with internet run `hf download {repo_id} --local-dir "
            f"DIR`, copy DIR here and pass --config.{field}=./DIR (a path starting with ./ or / is never looked "
            "up on the Hub)."
        ) from e


def _local_dir(name_or_path: str, field: str) -> Path | None:
    """The local directory `name_or_path` names; None for a Hub id; an error for a missing local path."""
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise ModelNotFoundError(f"{field}={name_or_path!r} is a file; point it at the directory that holds it.")
    if looks_local(name_or_path):
        raise ModelNotFoundError(f"{field}={name_or_path!r}: no such directory (a path is never looked up on the "
                                 "Hub); check the spelling, or give a Hub id such as 'google-t5/t5-base'.")
    return None


def resolve_model_dir(name_or_path: str, field: str = "model.name_or_path") -> Path:
    """A local directory holding `config.json` + safetensors: `name_or_path` itself, or a Hub download."""
    local = _local_dir(name_or_path, field)
    if local is None:
        local = download(name_or_path, _MODEL_PATTERNS, field, "model")
    if not (local / "config.json").is_file():
        raise ModelNotFoundError(f"{field}={name_or_path!r} is a directory without config.json; point it at a "
                                 "directory written by `save_pretrained` (config.json + *.safetensors).")
    return local


def resolve_tokenizer_dir(name_or_path: str, field: str = "model.tokenizer") -> Path:
    """A local directory that should hold tokenizer files: `name_or_path` itself, or a Hub download of them."""
    local = _local_dir(name_or_path, field)
    return local if local is not None else download(name_or_path, [*TOKENIZER_PATTERNS, "config.json"], field,
                                                    "tokenizer")


# --- Reading the files ---


def read_json(path: Path, what: str) -> Any:
    """A JSON file of the model directory, or a one-line error naming the file, line and column."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ModelFileError(f"{path}: not UTF-8 text (byte {e.start}); the {what} is corrupt, download or "
                             "save it again.") from None
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{path}: not valid JSON (line {e.lineno} column {e.colno}: {e.msg}); the {what} is "
                             "corrupt or truncated, download or save it again.") from None
    except OSError as e:
        raise ModelFileError(f"{path}: cannot be read ({describe(e)}).") from None


def read_model_type(model_dir: Path) -> str:
    """`model_type` of `model_dir/config.json`, after checking the file is a JSON object that has one."""
    path = model_dir / "config.json"
    config = read_json(path, "model config")
    if not isinstance(config, dict):
        raise ModelFileError(f"{path}: expected a JSON object, got {type(config).__name__}; the file is not a "
                             "transformers config, save the model again with `save_pretrained`.")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ModelFileError(f"{path}: has no \"model_type\"; it is not a transformers config (save the model "
                             "with `save_pretrained`).")
    return model_type


def load_hf_config(model_dir: Path) -> Any:
    """`transformers.AutoConfig` of `model_dir`, its errors as one line naming config.json."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir)
    except Exception as e:
        raise ModelFileError(f"{model_dir / 'config.json'}: transformers cannot read it ({describe(e)}); fix the "
                             "file or save the model again with `save_pretrained`.") from None


def _unreadable(path: Path, e: BaseException) -> ModelFileError:
    return ModelFileError(f"{path}: not a readable safetensors file ({describe(e)}); it is truncated or corrupt, "
                          "download or save it again.")


def open_safetensors(path: Path) -> Any:
    """`safetensors.safe_open` for slice reads (it checks the header and that the data covers it), or the same
    one-line error as a whole-file read."""
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="numpy")
    except Exception as e:  # SafetensorError on a truncated/corrupt file, OSError, ...
        raise _unreadable(path, e) from None


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except TypeError:  # "data type 'bfloat16' not understood": numpy has no bfloat16
        return _load_with_bfloat16(path)
    except Exception as e:  # SafetensorError on a truncated/corrupt header, OSError, ...
        raise _unreadable(path, e) from None


_SAFETENSORS_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                       "I32": np.int32, "I64": np.int64, "U8": np.uint8, "BOOL": np.bool_}


def _load_with_bfloat16(path: Path) -> dict[str, np.ndarray]:
    """A safetensors file holding bfloat16 tensors, as `ml_dtypes.bfloat16` arrays read from its header and bytes."""
    import ml_dtypes

    dtypes = {**_SAFETENSORS_DTYPES, "BF16": ml_dtypes.bfloat16}
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
        tensors = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in dtypes:
                raise ModelFileError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which we do not read.")
            start, end = info["data_offsets"]
            tensors[name] = np.array(data[start:end].view(dtypes[info["dtype"]]).reshape(info["shape"]))
        return tensors
    except ModelFileError:
        raise
    except Exception as e:
        raise _unreadable(path, e) from None


def read_safetensors(model_dir: Path) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory (single file or sharded with an index), as numpy arrays."""
    single = model_dir / "model.safetensors"
    index = model_dir / "model.safetensors.index.json"
    if single.is_file():
        return _load_safetensors(single)
    if index.is_file():
        tensors: dict[str, np.ndarray] = {}
        for shard in sorted(set(shard_map(model_dir).values())):
            tensors.update(_load_safetensors(shard))
        return tensors
    raise no_weights_error(model_dir)


def shard_map(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> shard file of a sharded checkpoint's `model.safetensors.index.json`, checked: valid JSON,
    a `weight_map` of strings, every shard present."""
    index = model_dir / "model.safetensors.index.json"
    weight_map = read_json(index, "shard index")
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise ModelFileError(f"{index}: has no \"weight_map\" of tensor name -> shard file; save the model "
                             "again with `save_pretrained`.")
    missing = sorted({s for s in weight_map.values() if not (model_dir / s).is_file()})
    if missing:
        raise ModelFileError(f"{index}: names shard(s) {missing} that are not in {model_dir}; download the "
                             "missing files (all *.safetensors of the model).")
    return {name: model_dir / shard for name, shard in weight_map.items()}


def no_weights_error(model_dir: Path) -> ModelNotFoundError:
    """The error for a directory with neither `model.safetensors` nor an index (naming any pickles it has)."""
    pickles = [p.name for p in model_dir.glob("*.bin")] + [p.name for p in model_dir.glob("*.pt")]
    hint = (f" It has {pickles}, which we do not load (unpickling runs code). Convert once with transformers: "
            "`AutoModel...from_pretrained(DIR).save_pretrained(OUT, safe_serialization=True)`.") if pickles else ""
    return ModelNotFoundError(f"{model_dir} holds no model.safetensors or model.safetensors.index.json (the weights "
                              f"of model.name_or_path); save the model there with `save_pretrained`.{hint}")
