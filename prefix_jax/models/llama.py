"""Llama-family decoders (HF `model_type` llama, mistral, qwen2, qwen3) as one pure-functional Flax LM.

Pre-norm blocks with RMSNorm, a SwiGLU MLP, rotary positions in HF's `rotate_half` layout and
grouped-query attention (`num_key_value_heads` <= `num_attention_heads`, K/V never repeated in
memory). The variants differ only in switches of `Config`: q/k/v biases (Qwen2, Llama's
`attention_bias`), per-head q/k RMSNorm (Qwen3), an explicit `head_dim`, a tied LM head.

Layout as GPT-2 (`models/gpt2.py`): `z = [source; separator; target[:-1]]`, logits on the target
side only; positions count real tokens, so left and right padding give the same result.

The prefix (`Prefix.kv[DECODER]`, `[L, num_key_value_heads, P, head_dim]`) is used as HF uses a
`past_key_values` cache: its keys are taken as already rotated (no position is applied to them),
and with `positions_after_prefix` (HF, PEFT) real tokens sit at positions `P .. P+S-1`. Since
RoPE is relative, that equals tokens at `0 ..` with prefix keys rotated by `-P`. Infix and
embedding-only prompts are placed exactly as for GPT-2.

Shape letters as in `prefix_jax.shapes`; here N key/value heads and G = H / N queries per K/V head.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Collection

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
import numpy as np

from prefix_jax.models import common, decoder_config, decoder_only
from prefix_jax.models import hf_mapping as hm
from prefix_jax.models.attention import attend, write_cache
from prefix_jax.models.dropout import Dropout
from prefix_jax.models.prefix_contract import DECODER, KV, BankKV, DecoderOnlyPositions, StackGeometry, TextPositions


MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ROPE_TYPES = ("default", "linear", "llama3")
# rope_parameters keys each rope type reads (anything else there would change numbers we do not compute).
_ROPE_KEYS = {
    "default": {"rope_type", "rope_theta"},
    "linear": {"rope_type", "rope_theta", "factor"},
    "llama3": {"rope_type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"},
}

# Logical axes of every param (regex fullmatched against the "/"-joined path): the sharding table's input.
PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"embed_tokens/embedding", ("vocab", "embed")),
    (r"lm_head/kernel", ("embed", "vocab")),
    (r"model/norm/scale", ("norm",)),
    (r"model/layers/(input_layernorm|post_attention_layernorm)/scale", ("layers", "norm")),
    (r"model/layers/self_attn/q_proj/kernel", ("layers", "embed", "heads", "head_dim")),
    (r"model/layers/self_attn/q_proj/bias", ("layers", "heads", "head_dim")),
    (r"model/layers/self_attn/(k_proj|v_proj)/kernel", ("layers", "embed", "kv_heads", "head_dim")),
    (r"model/layers/self_attn/(k_proj|v_proj)/bias", ("layers", "kv_heads", "head_dim")),
    (r"model/layers/self_attn/(q_norm|k_norm)/scale", ("layers", "norm")),
    (r"model/layers/self_attn/o_proj/kernel", ("layers", "heads", "head_dim", "embed")),
    (r"model/layers/self_attn/o_proj/bias", ("layers", "embed")),
    (r"model/layers/mlp/(gate_proj|up_proj)/kernel", ("layers", "embed", "mlp")),
    (r"model/layers/mlp/(gate_proj|up_proj)/bias", ("layers", "mlp")),
    (r"model/layers/mlp/down_proj/kernel", ("layers", "mlp", "embed")),
    (r"model/layers/mlp/down_proj/bias", ("layers", "embed")),
)


@dataclasses.dataclass(frozen=True)
class Config(DecoderOnlyPositions):
    model_type: str  # llama | mistral | qwen2 | qwen3 (HF's name; `architecture`)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_type: str = "default"  # default | linear | llama3
    rope_factor: float = 1.0  # linear, llama3
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_original_max_position_embeddings: int = 8192  # llama3
    qkv_bias: bool = False  # Qwen2: True; Llama/Qwen3: attention_bias
    o_bias: bool = False  # Llama/Qwen3: attention_bias
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on queries and keys, before RoPE
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # refused (not implemented) when prefix + tokens exceed it
    attention_dropout: float = 0.0
    bos_token_id: int | None = None
    eos_token_id: int = 2
    pad_token_id: int | None = None
    separator_token_id: int | None = None  # starts the target side; None: bos_token_id, else eos_token_id
    positions_after_prefix: bool = True  # see module docstring
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: bool | str = "none"  # common.REMAT_POLICIES (False/True read as none/full)
    attention_kernel: str = "einsum"  # fused_attention.ATTENTION_KERNELS (model.attention_kernel)

    is_encoder_decoder = False

    def __post_init__(self) -> None:
        common.activation(self.hidden_act, "hidden_act")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type={self.model_type!r} is not one of {MODEL_TYPES}.")
        decoder_config.check_heads_and_set_separator(self)
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary positions.")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_parameters.rope_type={self.rope_type!r} is not supported; use one of {ROPE_TYPES}.")
        common.check_attention_kernel(self, self.attention_dropout)

    @classmethod
    def from_hf(cls, hf: Any, tensor_names: set[str], **overrides: Any) -> "Config":
        """From a `transformers` Llama/Mistral/Qwen2/Qwen3 config; refuses any setting we do not compute."""
        decoder_config.check_model_type(hf, MODEL_TYPES, "Llama-family")
        model_type = hf.model_type
        attention_bias = bool(getattr(hf, "attention_bias", False))
        qkv_bias, o_bias = {"qwen2": (True, False), "mistral": (False, False)}.get(
            model_type, (attention_bias, attention_bias))
        fields = dict(
            **decoder_config.shared_fields(hf, default_eos=2, default_tie=False),
            hidden_act=hf.hidden_act,
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_window=_sliding_window(hf),
            **_rope_fields(hf),
        )
        fields.update(overrides)
        return cls(**fields)

    @property
    def architecture(self) -> str:
        return self.model_type

    def prefix_geometry(self) -> dict[str, StackGeometry]:
        return {DECODER: StackGeometry(self.num_hidden_layers, self.num_key_value_heads, self.head_dim)}

    @property
    def max_positions(self) -> int:
        """Prefix + tokens one sequence may span: the trained context, or the sliding window if smaller."""
        return min(self.max_position_embeddings, self.sliding_window or self.max_position_embeddings)


def _sliding_window(hf: Any) -> int | None:
    """The sliding window some layer uses (HF semantics: a query sees the `window` newest keys), or None."""
    window = getattr(hf, "sliding_window", None)
    layer_types = getattr(hf, "layer_types", None)
    if layer_types is not None:
        unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
        if unknown:
            raise ValueError(f"layer_types has {unknown}, which is not supported (full_attention, sliding_attention).")
        if "sliding_attention" not in layer_types and hf.model_type != "mistral":
            return None
    if window is not None and hf.model_type in ("qwen2", "qwen3") and not getattr(hf, "use_sliding_window", False):
        return None
    return int(window) if window is not None else None


def _rope_fields(hf: Any) -> dict:
    """`rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (older configs) -> our rope fields."""
    params = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    rope_type = params.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_parameters.rope_type={rope_type!r} (rope_scaling) is not supported; "
                         f"use one of {ROPE_TYPES}.")
    theta = params.get("rope_theta", getattr(hf, "rope_theta", None) or 10000.0)
    for key in sorted(set(params) - _ROPE_KEYS[rope_type]):
        value = params[key]
        if key == "partial_rotary_factor" and value in (None, 1, 1.0):
            continue
        if key == "attention_factor" and value in (None, 1, 1.0):
            continue
        raise ValueError(f"rope_parameters.{key}={value!r} (rope_scaling) is not supported for rope_type="
                         f"{rope_type!r}; only {sorted(_ROPE_KEYS[rope_type])} are.")
    out = dict(rope_theta=float(theta), rope_type=rope_type)
    if rope_type in ("linear", "llama3"):
        out["rope_factor"] = float(params["factor"])
    if rope_type == "llama3":
        out.update(rope_low_freq_factor=float(params["low_freq_factor"]),
                   rope_high_freq_factor=float(params["high_freq_factor"]),
                   rope_original_max_position_embeddings=int(params["original_max_position_embeddings"]))
    return out


# --- Rotary positions ---


def rope_inverse_frequencies(cfg: Config) -> np.ndarray:
    """`[K/2]` float32 inverse frequencies, computed as transformers does (in float32) for each rope type."""
    dim = cfg.head_dim
    inv_freq = (1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))))
    inv_freq = inv_freq.astype(np.float32)
    if cfg.rope_type == "linear":
        return (inv_freq / np.float32(cfg.rope_factor)).astype(np.float32)
    if cfg.rope_type == "llama3":
        factor, low, high = (np.float32(x) for x in (cfg.rope_factor, cfg.rope_low_freq_factor,
                                                      cfg.rope_high_freq_factor))
        old_len = np.float32(cfg.rope_original_max_position_embeddings)
        wavelen = np.float32(2 * math.pi) / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rope_tables(cfg: Config, positions_BxQ: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin `[B, Q, K]` of each position (float32 angles, then the compute dtype, as HF)."""
    freqs_BxQxK2 = positions_BxQ.astype(jnp.float32)[..., None] * jnp.asarray(rope_inverse_frequencies(cfg))[None, None]
    angles_BxQxK = jnp.concatenate([freqs_BxQxK2, freqs_BxQxK2], axis=-1)
    return jnp.cos(angles_BxQxK).astype(cfg.dtype), jnp.sin(angles_BxQxK).astype(cfg.dtype)


def rotate(x_BxQxHxK: jax.Array, cos_BxQxR: jax.Array, sin_BxQxR: jax.Array) -> jax.Array:
    """RoPE in the `rotate_half` layout over the first R dims of each head (R = K unless the tables are partial,
    as Phi-3's `partial_rotary_factor` makes them): the two halves of those dims form the rotated pairs, the rest
    pass unchanged."""
    dim = cos_BxQxR.shape[-1]
    x_rot, x_pass = x_BxQxHxK[..., :dim], x_BxQxHxK[..., dim:]
    half = dim // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    out = x_rot * cos_BxQxR[:, :, None] + rotated * sin_BxQxR[:, :, None]
    return out if dim == x_BxQxHxK.shape[-1] else jnp.concatenate([out, x_pass], axis=-1)


# --- Layers ---


def rms_norm(cfg: Config, name: str) -> common.RMSNorm:
    """HF's Llama RMSNorm: normalise in float32, cast back, then scale."""
    return common.RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, cast_before_scale=True, name=name)


class LlamaAttention(nn.Module):
    config: Config
    deterministic: bool

    @nn.compact
    def __call__(self, x_BxQxD, rope, mask_BxHxQxM, prefix: KV | BankKV | None, cache: dict | None):
        cfg = self.config
        heads = lambda n, bias, name: nn.DenseGeneral((n, cfg.head_dim), use_bias=bias, dtype=cfg.dtype,
                                                      param_dtype=cfg.param_dtype, name=name)
        q = heads(cfg.num_attention_heads, cfg.qkv_bias, "q_proj")(x_BxQxD)
        k = heads(cfg.num_key_value_heads, cfg.qkv_bias, "k_proj")(x_BxQxD)
        v = heads(cfg.num_key_value_heads, cfg.qkv_bias, "v_proj")(x_BxQxD)
        if cfg.qk_norm:
            q = rms_norm(cfg, "q_norm")(q)
            k = rms_norm(cfg, "k_norm")(k)
        cos, sin = rope
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        # Post-rotation keys/values of real tokens, for `mutable=["intermediates"]` (prefix init from text).
        self.sow("intermediates", "key_value", KV(k, v))
        if cache is not None:
            k, v, cache = write_cache(cache, k, v)
        dropout = Dropout(cfg.attention_dropout) if cfg.attention_dropout > 0 else None
        y = attend(q, k, v, mask_BxHxQxM, None, cfg.head_dim**-0.5, dropout, self.deterministic, prefix,
                   cfg.attention_kernel)
        out = nn.DenseGeneral(cfg.hidden_size, axis=(-2, -1), use_bias=cfg.o_bias, dtype=cfg.dtype,
                              param_dtype=cfg.param_dtype, name="o_proj")
        return out(y), cache


class LlamaMLP(nn.Module):
    """SwiGLU: `down(act(gate(x)) * up(x))`."""

    config: Config

    @nn.compact
    def __call__(self, x_BxQxD: jax.Array) -> jax.Array:
        cfg = self.config
        dense = lambda n, name: nn.Dense(n, use_bias=cfg.mlp_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                         name=name)
        act = common.activation(cfg.hidden_act, "hidden_act")
        h_BxQxF = act(dense(cfg.intermediate_size, "gate_proj")(x_BxQxD)) * dense(cfg.intermediate_size, "up_proj")(
            x_BxQxD)
        return dense(cfg.hidden_size, "down_proj")(h_BxQxF)


class LlamaBlock(nn.Module):
    """One pre-norm layer; scanned over layers by `Model`."""

    config: Config
    deterministic: bool

    @nn.compact
    def __call__(self, x_BxQxD, prefix, cache, mask_BxHxQxM, rope):
        cfg = self.config
        h, cache = LlamaAttention(cfg, self.deterministic, name="self_attn")(
            rms_norm(cfg, "input_layernorm")(x_BxQxD), rope, mask_BxHxQxM, prefix, cache)
        x_BxQxD = x_BxQxD + h
        mlp_input = checkpoint_name(rms_norm(cfg, "post_attention_layernorm")(x_BxQxD),
                                    "mlp_input")  # saved by remat "minimal"
        x_BxQxD = x_BxQxD + LlamaMLP(cfg, name="mlp")(mlp_input)
        return x_BxQxD, cache


class LlamaStack(nn.Module):
    """Input embeddings in, final-norm hidden states out (HF's `model.layers`, `model.norm`)."""

    config: Config

    @nn.compact
    def __call__(self, x_BxQxD: jax.Array, positions_BxQ: jax.Array, mask_BxHxQxM: jax.Array, prefix: KV | None,
                 cache: dict | None, deterministic: bool) -> tuple[jax.Array, dict | None]:
        cfg = self.config
        layers = common.stack_layers(LlamaBlock, cfg.num_hidden_layers, cfg.remat,
                                     in_axes=(0, 0, nn.broadcast, nn.broadcast))(cfg, deterministic, name="layers")
        x, cache = layers(x_BxQxD, prefix, cache, mask_BxHxQxM, rope_tables(cfg, positions_BxQ))
        return rms_norm(cfg, "norm")(x), cache


class Model(decoder_only.DecoderOnly):
    """A Llama-family LM in the decoder-only shell (`decoder_only.DecoderOnly`: batch, prefix and methods)."""

    config: Config
    stack_class = LlamaStack  # Phi-3 (`models/phi3.py`) swaps in its own stack of Llama's blocks

    def setup(self) -> None:
        cfg = self.config
        # Used only to build random tiny checkpoints: token rows and head columns of norm ~1 give logits of
        # unit scale, so a prefix can visibly steer a random demo LM. Real weights are loaded.
        unit = nn.initializers.normal(cfg.hidden_size**-0.5)
        self.embed_tokens = common.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                     embedding_init=unit, name="embed_tokens")
        self.model = self.stack_class(cfg, name="model")
        if not cfg.tie_word_embeddings:
            self.lm_head = common.LMHead(cfg.vocab_size, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                    kernel_init=unit, name="lm_head")

    def embed(self, ids: jax.Array) -> jax.Array:
        return self.embed_tokens(ids)

    def head(self, h_BxQxD: jax.Array) -> jax.Array:
        if self.config.tie_word_embeddings:
            return self.embed_tokens.attend(h_BxQxD).astype(jnp.float32)
        return self.lm_head(h_BxQxD).astype(jnp.float32)

    def stack(self) -> nn.Module:
        return self.model

    def check_lengths(self, where: TextPositions | None, prefix_len: int, num_keys: int) -> None:
        """A sliding window is not implemented: prefix and tokens must fit in it."""
        window = self.config.sliding_window
        if window is not None and prefix_len + num_keys > window:
            raise ValueError(f"prefix ({prefix_len}) + tokens ({num_keys}) = {prefix_len + num_keys} exceed the "
                             f"model's sliding_window={window}, which is not implemented; shorten the prefix, the "
                             "source or the target (data.max_source_length, data.max_target_length).")


# --- HF checkpoints <-> our params: the one table ---


# llama.cpp's converter interleaves the RoPE halves of each Q/K head for these (Qwen GGUFs keep HF's order).
_GGUF_PERMUTED = ("llama", "mistral")


def hf_table(cfg: Config, tensor_names: Collection[str] | None = None) -> dict:
    """The one HF mapping (`hf_mapping.FromHF` per leaf) of `LlamaForCausalLM` (Mistral/Qwen2/Qwen3; a bare
    `*Model` saves `layers.0...` without `model.`), and of llama.cpp's GGUF files of the family: layers stacked
    on a leading axis, torch Linear weights transposed, q/k/v/o split into heads. A tied head is not read."""
    base = hm.base_prefix(tensor_names, "embed_tokens.weight", "model.")
    H, N, K = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    D, F = cfg.hidden_size, cfg.intermediate_size
    permuted = cfg.model_type in _GGUF_PERMUTED

    def layer(w: str, gguf: str, *split: tuple[int, ...], rope_heads: int | None = None, **kw) -> hm.FromHF:
        return hm.layers(cfg.num_hidden_layers, f"{base}layers.{{i}}.{w}", *split,
                         gguf=hm.GGUF(f"blk.{{i}}.{gguf}", rope_heads=rope_heads if permuted else None), **kw)

    def heads_in(ours: str, gguf: str, heads: int, rope: bool) -> dict:
        rope_heads = heads if rope else None
        out = {"kernel": layer(f"self_attn.{ours}.weight", f"attn_{gguf}.weight", (D,), (heads, K), transpose=True,
                               rope_heads=rope_heads)}
        if cfg.qkv_bias:
            out["bias"] = layer(f"self_attn.{ours}.bias", f"attn_{gguf}.bias", (heads, K), rope_heads=rope_heads)
        return out

    def mlp(ours: str, gguf: str, d_in: int, d_out: int) -> dict:
        out = {"kernel": layer(f"mlp.{ours}.weight", f"ffn_{gguf}.weight", (d_in,), (d_out,), transpose=True)}
        if cfg.mlp_bias:
            out["bias"] = layer(f"mlp.{ours}.bias", f"ffn_{gguf}.bias", (d_out,))
        return out

    attn = {"q_proj": heads_in("q_proj", "q", H, True), "k_proj": heads_in("k_proj", "k", N, True),
            "v_proj": heads_in("v_proj", "v", N, False),
            "o_proj": {"kernel": layer("self_attn.o_proj.weight", "attn_output.weight", (H, K), (D,), transpose=True)}}
    if cfg.o_bias:
        attn["o_proj"]["bias"] = layer("self_attn.o_proj.bias", "attn_output.bias", (D,))
    if cfg.qk_norm:
        attn["q_norm"] = {"scale": layer("self_attn.q_norm.weight", "attn_q_norm.weight", (K,))}
        attn["k_norm"] = {"scale": layer("self_attn.k_norm.weight", "attn_k_norm.weight", (K,))}
    layers = {"input_layernorm": {"scale": layer("input_layernorm.weight", "attn_norm.weight", (D,))},
              "self_attn": attn,
              "mlp": {"gate_proj": mlp("gate_proj", "gate", D, F), "up_proj": mlp("up_proj", "up", D, F),
                      "down_proj": mlp("down_proj", "down", F, D)},
              "post_attention_layernorm": {"scale": layer("post_attention_layernorm.weight", "ffn_norm.weight", (D,))}}
    params = {"embed_tokens": {"embedding": hm.tensor(f"{base}embed_tokens.weight", (cfg.vocab_size,), (D,),
                                                      gguf=hm.GGUF("token_embd.weight"))},
              "model": {"layers": layers,
                        "norm": {"scale": hm.tensor(f"{base}norm.weight", (D,), gguf=hm.GGUF("output_norm.weight"))}}}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = {"kernel": hm.tensor("lm_head.weight", (D,), (cfg.vocab_size,), transpose=True,
                                                 gguf=hm.GGUF("output.weight"))}
    return params
