"""Tiny GGUF files written as llama.cpp's converter writes them (tensor names, Q/K row permutation, GPT-2's
transposed Conv1D weights, block quantization), from tiny random transformers models.

The name table here is written from llama.cpp's converter independently of `prefix_jax.models.gguf_checkpoint`'s
(a test that derived one from the other could not catch a wrong entry).
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
import transformers

REPO = Path(__file__).resolve().parent.parent
GPT2_TOKENIZER = REPO / "data" / "gpt2-tokenizer"
VOCAB, SEP, EOS = 101, 1, 2


def _llama_like(kind: str, **fields) -> transformers.PretrainedConfig:
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, bos_token_id=SEP, eos_token_id=EOS,
                rope_parameters=dict(rope_type="default", rope_theta=500.0), attn_implementation="eager")
    return getattr(transformers, f"{kind}Config")(**{**base, **fields})


FAMILIES = {  # name -> HF config: GQA + permuted Q/K (llama), biases + tied head (qwen2), q/k norms (qwen3)
    "llama": lambda: _llama_like("Llama", head_dim=16),
    "mistral": lambda: _llama_like("Mistral", num_key_value_heads=1),
    "qwen2": lambda: _llama_like("Qwen2", tie_word_embeddings=True),
    "qwen3": lambda: _llama_like("Qwen3"),
    "phi3": lambda: _llama_like("Phi3", pad_token_id=0),  # fused attn_qkv and ffn_up (gate + up)
    # transformers reads a GPT-2 GGUF's vocabulary size from its tokenizer and keeps n_positions at 1024 (it maps
    # context_length to n_ctx): the tiny GPT-2 has the bundled GPT-2 tokenizer's 50257 tokens and 1024 positions.
    "gpt2": lambda: transformers.GPT2Config(vocab_size=50257, n_positions=1024, n_embd=32, n_layer=2, n_head=4,
                                            attn_implementation="eager"),
}


def random_model(family: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A tiny `*ForCausalLM` with every parameter random (norm scales and biases too)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family]()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


# Storage types the `gguf` package can write (the K-quants it only reads: see test_gguf's kernel test).
WRITABLE_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")

_LLAMA_LAYER = {  # HF name inside `model.layers.N.` -> llama.cpp name inside `blk.N.`
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    **{f"self_attn.{h}_proj.{kind}": f"attn_{g}.{kind}" for g, h in (("q", "q"), ("k", "k"), ("v", "v"),
                                                                   ("output", "o")) for kind in ("weight", "bias")},
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    **{f"mlp.{g}_proj.weight": f"ffn_{g}.weight" for g in ("gate", "up", "down")},
    "self_attn.qkv_proj.weight": "attn_qkv.weight", "mlp.gate_up_proj.weight": "ffn_up.weight",  # Phi-3's fused
}
_GPT2_LAYER = {"ln_1.weight": "attn_norm.weight", "ln_1.bias": "attn_norm.bias", "ln_2.weight": "ffn_norm.weight",
               "ln_2.bias": "ffn_norm.bias", "attn.c_attn.weight": "attn_qkv.weight",
               "attn.c_attn.bias": "attn_qkv.bias", "attn.c_proj.weight": "attn_output.weight",
               "attn.c_proj.bias": "attn_output.bias", "mlp.c_fc.weight": "ffn_up.weight",
               "mlp.c_fc.bias": "ffn_up.bias", "mlp.c_proj.weight": "ffn_down.weight",
               "mlp.c_proj.bias": "ffn_down.bias"}


def llama_cpp_permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute` (convert_hf_to_gguf.py): the RoPE halves of each head interleaved."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(arch: str, hf_name: str) -> str | None:
    """llama.cpp's name for a HF tensor (None: llama.cpp writes no such tensor)."""
    if arch == "gpt2":
        whole = {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
                 "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias"}
        prefix, layer = "transformer.h.", _GPT2_LAYER
    else:
        whole = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}
        prefix, layer = "model.layers.", _LLAMA_LAYER
    if hf_name in whole:
        return whole[hf_name]
    if hf_name.startswith(prefix):
        index, rest = hf_name[len(prefix):].split(".", 1)
        return f"blk.{index}.{layer[rest]}" if rest in layer else None
    return None


def _stored(w: np.ndarray, qtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """`w` as llama.cpp stores it: 1-D tensors (norms, biases) stay F32, as its converter keeps them."""
    kind = gguf.GGMLQuantizationType[qtype]
    if w.ndim == 1 or qtype == "F32":
        return w.astype(np.float32), gguf.GGMLQuantizationType.F32
    if qtype == "F16":
        return w.astype(np.float16), kind
    return gguf.quants.quantize(w.astype(np.float32), kind), kind


def add_gpt2_tokenizer(writer: gguf.GGUFWriter) -> None:
    """The bundled GPT-2 BPE tokenizer as GGUF tokenizer metadata (`tokenizer.ggml.model = gpt2`)."""
    vocab = json.loads((GPT2_TOKENIZER / "vocab.json").read_text())
    tokens = sorted(vocab, key=vocab.get)
    merges = [line for line in (GPT2_TOKENIZER / "merges.txt").read_text().splitlines()[1:] if line]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t == "<|endoftext|>" else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab["<|endoftext|>"])
    writer.add_eos_token_id(vocab["<|endoftext|>"])


def write_gguf(model: transformers.PreTrainedModel, path: Path, qtype: str = "F32", architecture: str | None = None,
               tokenizer: bool = False, skip_permute: bool = False) -> Path:
    """`model` (a tiny Llama/Mistral/Qwen2/Qwen3/Phi-3/GPT-2 `*ForCausalLM`) written as a GGUF file of `qtype`
    tensors."""
    cfg = model.config
    arch = architecture or {"mistral": "llama"}.get(cfg.model_type, cfg.model_type)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny {cfg.model_type}")
    if arch == "gpt2":
        writer.add_context_length(cfg.n_positions)
        writer.add_embedding_length(cfg.n_embd)
        writer.add_feed_forward_length(cfg.n_inner or 4 * cfg.n_embd)
        writer.add_block_count(cfg.n_layer)
        writer.add_head_count(cfg.n_head)
        writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
    else:
        writer.add_context_length(cfg.max_position_embeddings)
        writer.add_embedding_length(cfg.hidden_size)
        writer.add_feed_forward_length(cfg.intermediate_size)
        writer.add_block_count(cfg.num_hidden_layers)
        writer.add_head_count(cfg.num_attention_heads)
        writer.add_head_count_kv(cfg.num_key_value_heads)
        writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
        writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        rotary = cfg.rope_parameters.get("partial_rotary_factor", 1.0) * head_dim  # Phi-3: the rotated dims
        writer.add_rope_dimension_count(int(rotary))
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    if tokenizer:
        add_gpt2_tokenizer(writer)
    else:
        writer.add_bos_token_id(cfg.bos_token_id)
        writer.add_eos_token_id(cfg.eos_token_id)
        if cfg.model_type == "phi3":  # Phi3Config's default pad id (32000) is past the tiny vocabulary
            writer.add_pad_token_id(cfg.pad_token_id)
    seen = set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen and name == "lm_head.weight" and arch != "gpt2":
            continue  # tied: llama.cpp writes no output.weight
        seen.add(tensor.data_ptr())
        target = gguf_name(arch, name)
        if target is None:
            if arch == "gpt2" and name == "lm_head.weight":
                target = "output.weight"  # llama.cpp's GPT-2 converter writes the tied head as a copy
            else:
                continue
        w = tensor.detach().to(torch.float32).numpy()
        if arch == "llama" and not skip_permute:
            if ".attn_q." in target:
                w = llama_cpp_permute(w, cfg.num_attention_heads)
            elif ".attn_k." in target:
                w = llama_cpp_permute(w, cfg.num_key_value_heads)
        if arch == "gpt2" and target.split(".", 2)[-1] in ("attn_qkv.weight", "attn_output.weight", "ffn_up.weight",
                                                           "ffn_down.weight"):
            w = np.ascontiguousarray(w.T)
        data, kind = _stored(w, qtype)
        plain = kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)  # numpy dtypes say these
        writer.add_tensor(target, data, raw_dtype=None if plain else kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
