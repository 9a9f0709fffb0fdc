"""Phi-3 decoders (HF `model_type` phi3: Phi-3 mini/medium, Phi-3.5 mini, Phi-4 mini) as Llama's blocks.

Phi-3 is the Llama block (`models/llama.py`: RMSNorm, SwiGLU, grouped-query attention, no biases) with three
differences, each handled here and nowhere else:

* fused projections: HF's `qkv_proj` (`[H*K + 2*N*K, D]`: queries, keys, values) and `gate_up_proj`
  (`[2F, D]`: gate, then up) are read into Llama's separate `q_proj`/`k_proj`/`v_proj` and `gate_proj`/
  `up_proj` params through the one HF table (`hf_table`: each part an offset into the fused tensor), and
  written back fused on export; so the params, partition rules and quantization are Llama's;
* partial rotary positions (`partial_rotary_factor`, Phi-4 mini: 0.75): only the first
  `int(head_dim * factor)` dims of each head are rotated (`rotate_half` within them), the rest pass as they
  are; the frequencies use that rotary dim as HF's;
* `rope_type` "longrope" (Phi-3 128k, Phi-3.5, Phi-4 mini; "su" in older configs): HF picks the short factors
  while the longest position + 1 <= `original_max_position_embeddings` and the long ones past it, for the whole
  batch at once, and scales cos/sin by an attention factor. We compute the short branch exactly and refuse
  (`check_lengths`, `max_positions`) a prefix + text longer than `original_max_position_embeddings`.

A sliding window (`sliding_window`, Phi-3 mini 4k: 2047) applies to every layer, as HF's Phi-3 does; it is
Gemma's rule (`gemma.window_mask`: exactly HF's mask with the prefix given as `past_key_values`), so inputs
longer than the window are computed, not refused.

Layout, positions and the prefix as in `models/llama.py`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Collection

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from prefix_jax.models import common, decoder_config, llama, masks
from prefix_jax.models import hf_mapping as hm
from prefix_jax.models.gemma import window_mask
from prefix_jax.models.prefix_contract import DECODER, KV, BankKV, DecoderOnlyPositions, StackGeometry, TextPositions

MODEL_TYPES = ("phi3",)
ROPE_TYPES = ("default", "longrope")
_ROPE_KEYS = {  # rope_parameters keys each rope type reads
    "default": {"rope_type", "rope_theta", "partial_rotary_factor", "original_max_position_embeddings"},
    "longrope": {"rope_type", "rope_theta", "partial_rotary_factor", "original_max_position_embeddings",
                 "short_factor", "long_factor", "factor", "attention_factor"},
}

PARAM_AXES = llama.PARAM_AXES  # the same params as Llama's (the fused HF tensors are split on load)


@dataclasses.dataclass(frozen=True)
class Config(DecoderOnlyPositions):
    model_type: str  # phi3 (HF's name; `architecture`)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int = 4096  # longrope: the longest prefix + text we compute
    rope_theta: float = 10000.0
    rope_type: str = "default"  # default | longrope
    partial_rotary_factor: float = 1.0  # rotate the first int(head_dim * factor) dims of each head
    rope_short_factor: tuple[float, ...] = ()  # longrope: per rotary frequency (rotary_dim / 2 of them)
    rope_attention_factor: float = 1.0  # longrope: cos and sin scaled by it
    sliding_window: int | None = None  # every layer; HF semantics (a query sees itself and window - 1 keys back)
    tie_word_embeddings: bool = False
    attention_dropout: float = 0.0
    bos_token_id: int | None = 1
    eos_token_id: int = 32000
    pad_token_id: int | None = None
    separator_token_id: int | None = None  # starts the target side; None: bos_token_id, else eos_token_id
    positions_after_prefix: bool = True
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: bool | str = "none"
    attention_kernel: str = "einsum"

    is_encoder_decoder = False
    # What Llama's blocks read and Phi-3 never has.
    qkv_bias = o_bias = mlp_bias = qk_norm = False

    def __post_init__(self) -> None:
        common.activation(self.hidden_act, "hidden_act")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type={self.model_type!r} is not one of {MODEL_TYPES}.")
        decoder_config.check_heads_and_set_separator(self)
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_parameters.rope_type={self.rope_type!r} is not supported; use one of {ROPE_TYPES}.")
        if not 0 < self.rotary_dim <= self.head_dim or self.rotary_dim % 2:
            raise ValueError(f"partial_rotary_factor={self.partial_rotary_factor} gives {self.rotary_dim} rotary dims "
                             f"of head_dim={self.head_dim}; they must be even and at least 2.")
        object.__setattr__(self, "rope_short_factor", tuple(float(f) for f in self.rope_short_factor))
        if self.rope_type == "longrope" and len(self.rope_short_factor) != self.rotary_dim // 2:
            raise ValueError(f"rope_parameters.short_factor has {len(self.rope_short_factor)} entries; longrope with "
                             f"{self.rotary_dim} rotary dims needs {self.rotary_dim // 2}.")
        common.check_attention_kernel(self, self.attention_dropout)

    @classmethod
    def from_hf(cls, hf: Any, tensor_names: Collection[str], **overrides: Any) -> "Config":
        """From a `transformers` Phi3Config; refuses any setting we do not compute."""
        decoder_config.check_model_type(hf, MODEL_TYPES, "Phi-3")
        for name in ("resid_pdrop", "embd_pdrop"):  # HF drops out the residual branches / embeddings in training
            value = float(getattr(hf, name, 0.0) or 0.0)
            if value:
                raise ValueError(f"{name}={value} (dropout of the frozen LM's residual stream or embeddings) is not "
                                 f"implemented; set it to 0.0 in the checkpoint's config.json.")
        window = getattr(hf, "sliding_window", None)
        fields = dict(
            **decoder_config.shared_fields(hf, default_eos=32000, default_tie=False),
            hidden_act=hf.hidden_act,
            sliding_window=int(window) if window is not None else None,
            **_rope_fields(hf),
        )
        fields.update(overrides)
        return cls(**fields)

    @property
    def architecture(self) -> str:
        return self.model_type

    @property
    def rotary_dim(self) -> int:
        """The leading dims of each head that are rotated (HF: `int(head_dim * partial_rotary_factor)`)."""
        return int(self.head_dim * self.partial_rotary_factor)

    def prefix_geometry(self) -> dict[str, StackGeometry]:
        return {DECODER: StackGeometry(self.num_hidden_layers, self.num_key_value_heads, self.head_dim)}

    @property
    def max_positions(self) -> int:
        """Prefix + tokens one sequence may span: the trained context; with longrope, its short-factor range."""
        if self.rope_type == "longrope":
            return min(self.max_position_embeddings, self.original_max_position_embeddings)
        return self.max_position_embeddings


def _rope_fields(hf: Any) -> dict:
    """`rope_parameters` (transformers 5; `rope_scaling` + `rope_theta` in older configs) -> our rope fields."""
    params = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    legacy_type = params.pop("type", None)  # older configs' name for rope_type (transformers may keep both)
    rope_type = params.get("rope_type") or legacy_type or "default"
    rope_type = {"su": "longrope"}.get(rope_type, rope_type)
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_parameters.rope_type={rope_type!r} (rope_scaling) is not supported for phi3; use one "
                         f"of {ROPE_TYPES}.")
    unknown = sorted(set(params) - _ROPE_KEYS[rope_type])
    if unknown:
        raise ValueError(f"rope_parameters.{unknown[0]}={params[unknown[0]]!r} (rope_scaling) is not supported for "
                         f"rope_type={rope_type!r}; only {sorted(_ROPE_KEYS[rope_type])} are.")
    max_positions = int(hf.max_position_embeddings)
    original = int(params.get("original_max_position_embeddings")
                   or getattr(hf, "original_max_position_embeddings", None) or max_positions)
    out = dict(rope_theta=float(params.get("rope_theta", getattr(hf, "rope_theta", None) or 10000.0)),
               rope_type=rope_type, original_max_position_embeddings=original,
               partial_rotary_factor=float(params.get("partial_rotary_factor")
                                           or getattr(hf, "partial_rotary_factor", None) or 1.0))
    if rope_type == "longrope":
        # As transformers: factor defaults to the context extension, the attention factor to LongRoPE's formula.
        factor = params.get("factor") or max_positions / original
        attention = params.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        out.update(rope_short_factor=tuple(float(f) for f in params["short_factor"]),
                   rope_attention_factor=float(attention))
    return out


# --- Rotary positions ---


def rope_inverse_frequencies(cfg: Config) -> np.ndarray:
    """`[R/2]` float32 inverse frequencies over the rotary dims R, as transformers computes them (in float32)."""
    dim = cfg.rotary_dim
    exponents = (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)).astype(np.float32)
    base_powers = (np.float32(cfg.rope_theta) ** exponents).astype(np.float32)
    if cfg.rope_type == "longrope":
        base_powers = (np.asarray(cfg.rope_short_factor, np.float32) * base_powers).astype(np.float32)
    return (np.float32(1.0) / base_powers).astype(np.float32)


def rope_tables(cfg: Config, positions_BxQ: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin `[B, Q, R]` (R rotary dims; `llama.rotate` leaves the rest of each head as it is): float32
    angles, times longrope's attention factor, then the compute dtype (as HF)."""
    freqs_BxQxR2 = positions_BxQ.astype(jnp.float32)[..., None] * jnp.asarray(rope_inverse_frequencies(cfg))[None, None]
    angles_BxQxR = jnp.concatenate([freqs_BxQxR2, freqs_BxQxR2], axis=-1)
    scale = cfg.rope_attention_factor
    return (jnp.cos(angles_BxQxR) * scale).astype(cfg.dtype), (jnp.sin(angles_BxQxR) * scale).astype(cfg.dtype)


# --- The stack and the model ---


class Phi3Stack(nn.Module):
    """Input embeddings in, final-norm hidden states out (HF's `model.layers`, `model.norm`): Llama's blocks,
    Phi-3's rotary tables, every layer's mask narrowed to the sliding window if the model has one."""

    config: Config

    @nn.compact
    def __call__(self, x_BxQxD: jax.Array, positions_BxQ: jax.Array, mask_BxHxQxM: jax.Array,
                 prefix: KV | BankKV | None, cache: dict | None, deterministic: bool) -> tuple[jax.Array, dict | None]:
        cfg = self.config
        if cfg.sliding_window is not None:
            prefix_len = 0 if prefix is None else prefix.key.shape[-2]
            mask_BxHxQxM = masks.map_visible(mask_BxHxQxM, lambda m: window_mask(m, prefix_len, cfg.sliding_window))
        layers = common.stack_layers(llama.LlamaBlock, cfg.num_hidden_layers, cfg.remat,
                                     in_axes=(0, 0, nn.broadcast, nn.broadcast))(cfg, deterministic, name="layers")
        x, cache = layers(x_BxQxD, prefix, cache, mask_BxHxQxM, rope_tables(cfg, positions_BxQ))
        return llama.rms_norm(cfg, "norm")(x), cache


class Model(llama.Model):
    """A Phi-3 LM: Llama's model (embedding, head, decoder-only shell) around `Phi3Stack`."""

    config: Config
    stack_class = Phi3Stack

    def check_lengths(self, where: TextPositions | None, prefix_len: int, num_keys: int) -> None:
        """Longrope's long factors are not implemented: prefix and tokens must fit its original context."""
        cfg = self.config
        if cfg.rope_type == "longrope" and prefix_len + num_keys > cfg.original_max_position_embeddings:
            raise ValueError(
                f"prefix ({prefix_len}) + tokens ({num_keys}) = {prefix_len + num_keys} exceed the model's "
                f"original_max_position_embeddings={cfg.original_max_position_embeddings}, past which rope_type="
                "'longrope' switches to its long_factor, which is not implemented; shorten the prefix, the source or "
                "the target (data.max_source_length, data.max_target_length).")


# --- HF checkpoints <-> our params: the one table ---


def hf_table(cfg: Config, tensor_names: Collection[str] | None = None) -> dict:
    """The HF mapping (`hf_mapping.FromHF` per leaf) of `Phi3ForCausalLM` (a bare `Phi3Model` saves `layers.0...`
    without `model.`) and llama.cpp's names for its GGUF files: Llama's params, each of q/k/v a slice of the fused
    `qkv_proj` and gate/up the two halves of `gate_up_proj` (llama.cpp: `attn_qkv`, `ffn_up`, rows unpermuted, as
    its Phi-3 converter writes them). A tied head is not read."""
    base = hm.base_prefix(tensor_names, "embed_tokens.weight", "model.")
    H, N, K = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    D, F = cfg.hidden_size, cfg.intermediate_size

    def layer(w: str, gguf: str, *split: tuple[int, ...], **kw) -> hm.FromHF:
        return hm.layers(cfg.num_hidden_layers, f"{base}layers.{{i}}.{w}", *split, gguf=hm.GGUF(f"blk.{{i}}.{gguf}"),
                         **kw)

    def qkv_part(heads: int, start: int) -> dict:
        return {"kernel": layer("self_attn.qkv_proj.weight", "attn_qkv.weight", (D,), (heads, K), transpose=True,
                                offset=(0, start))}

    def gate_up_part(start: int) -> dict:
        return {"kernel": layer("mlp.gate_up_proj.weight", "ffn_up.weight", (D,), (F,), transpose=True,
                                offset=(0, start))}

    attn = {"q_proj": qkv_part(H, 0), "k_proj": qkv_part(N, H * K), "v_proj": qkv_part(N, H * K + N * K),
            "o_proj": {"kernel": layer("self_attn.o_proj.weight", "attn_output.weight", (H, K), (D,), transpose=True)}}
    mlp = {"gate_proj": gate_up_part(0), "up_proj": gate_up_part(F),
           "down_proj": {"kernel": layer("mlp.down_proj.weight", "ffn_down.weight", (F,), (D,), transpose=True)}}
    layers = {"input_layernorm": {"scale": layer("input_layernorm.weight", "attn_norm.weight", (D,))},
              "self_attn": attn, "mlp": mlp,
              "post_attention_layernorm": {"scale": layer("post_attention_layernorm.weight", "ffn_norm.weight", (D,))}}
    params = {"embed_tokens": {"embedding": hm.tensor(f"{base}embed_tokens.weight", (cfg.vocab_size,), (D,),
                                                      gguf=hm.GGUF("token_embd.weight"))},
              "model": {"layers": layers,
                        "norm": {"scale": hm.tensor(f"{base}norm.weight", (D,), gguf=hm.GGUF("output_norm.weight"))}}}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = {"kernel": hm.tensor("lm_head.weight", (D,), (cfg.vocab_size,), transpose=True,
                                                 gguf=hm.GGUF("output.weight"))}
    return params
