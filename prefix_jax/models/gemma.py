"""Gemma decoders (HF `model_type` gemma, gemma2, gemma3_text) as one pure-functional Flax LM.

What differs from the Llama family (`models/llama.py`, whose RoPE tables, rotation and attention core this
reuses): token embeddings scaled by sqrt(hidden_size) in the compute dtype; RMSNorm as `(1 + weight) * x /
rms(x)` computed in float32, then cast; a GeGLU MLP (tanh GELU); an explicit `head_dim`; scores scaled by
`query_pre_attn_scalar ** -0.5` (Gemma 1: head_dim). Gemma 2 adds norms after attention and after the MLP
(`post_attention_layernorm`, `pre_feedforward_layernorm`, `post_feedforward_layernorm`), tanh soft-capping of
attention scores and of the final logits, and interleaved sliding-window / global layers (`layer_types`).
Gemma 3 adds RMSNorm on queries and keys (before RoPE) and a RoPE base per layer type (local layers
10k, global layers 1M with linear scaling on the larger models); it drops attention soft-capping (HF's
Gemma 3 attention never applies `attn_logit_softcapping`, so neither do we).

Layout, positions and the prefix as in `models/llama.py`: `[source; separator; target[:-1]]`, positions
counting real tokens, a prefix `[L, N, P, K]` used as HF uses `past_key_values` (keys already rotated, tokens
at P.. with `positions_after_prefix`).

A prefix in a sliding-window layer (`window_mask`): exactly HF's mask when the prefix is given as
`past_key_values`. HF's cache puts the P prefix slots at indices 0..P-1 and the tokens after them, and a query
at index q sees index k iff `q - window < k <= q`. So a query with r real tokens before it sees prefix slot j
iff `r + P - j < window`: once the text is long the prefix slides out of view, oldest slot first, as in HF.
Distances count real tokens, so padding (either side, or between source and target) never changes them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Collection, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from prefix_jax.models import common, decoder_config, decoder_only, masks
from prefix_jax.models import hf_mapping as hm
from prefix_jax.models.attention import attend, write_cache
from prefix_jax.models.dropout import Dropout
from prefix_jax.models.llama import rope_tables, rotate
from prefix_jax.models.prefix_contract import DECODER, KV, BankKV, DecoderOnlyPositions, StackGeometry

MODEL_TYPES = ("gemma", "gemma2", "gemma3_text")
LAYER_TYPES = ("full_attention", "sliding_attention")
# Global layers may scale RoPE linearly (Gemma 3 4B+); local layers never do.
ROPE_TYPES = ("default", "linear")
_ROPE_KEYS = {"default": {"rope_type", "rope_theta"}, "linear": {"rope_type", "rope_theta", "factor"}}

_LAYER_NORMS = "input_layernorm|post_attention_layernorm|pre_feedforward_layernorm|post_feedforward_layernorm"
PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"embed_tokens/embedding", ("vocab", "embed")),
    (r"lm_head/kernel", ("embed", "vocab")),
    (r"model/norm/scale", ("norm",)),
    (rf"model/layers/({_LAYER_NORMS})/scale", ("layers", "norm")),
    (r"model/layers/self_attn/q_proj/kernel", ("layers", "embed", "heads", "head_dim")),
    (r"model/layers/self_attn/q_proj/bias", ("layers", "heads", "head_dim")),
    (r"model/layers/self_attn/(k_proj|v_proj)/kernel", ("layers", "embed", "kv_heads", "head_dim")),
    (r"model/layers/self_attn/(k_proj|v_proj)/bias", ("layers", "kv_heads", "head_dim")),
    (r"model/layers/self_attn/(q_norm|k_norm)/scale", ("layers", "norm")),
    (r"model/layers/self_attn/o_proj/kernel", ("layers", "heads", "head_dim", "embed")),
    (r"model/layers/self_attn/o_proj/bias", ("layers", "embed")),
    (r"model/layers/mlp/(gate_proj|up_proj)/kernel", ("layers", "embed", "mlp")),
    (r"model/layers/mlp/down_proj/kernel", ("layers", "mlp", "embed")),
)


@dataclasses.dataclass(frozen=True)
class RopeSpec:
    """What `llama.rope_tables` reads: one layer type's rotary frequencies."""

    head_dim: int
    rope_theta: float
    rope_type: str
    rope_factor: float
    dtype: str


@dataclasses.dataclass(frozen=True)
class Config(DecoderOnlyPositions):
    model_type: str  # gemma | gemma2 | gemma3_text (HF's name; `architecture`)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_act: str = "gelu_pytorch_tanh"  # Gemma 1: hidden_act; Gemma 2/3: hidden_activation
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 8192
    query_pre_attn_scalar: float | None = None  # None: head_dim (Gemma 1)
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sandwich_norms: bool = False  # Gemma 2/3: norms after attention and around the MLP
    qk_norm: bool = False  # Gemma 3
    attention_bias: bool = False
    layer_types: tuple[str, ...] = ()  # per layer, LAYER_TYPES; () = all full_attention
    sliding_window: int | None = None  # HF semantics: a query sees itself and the window - 1 keys before it
    rope_theta: float = 10000.0  # global (full_attention) layers
    rope_type: str = "default"  # global layers: default | linear
    rope_factor: float = 1.0  # linear
    rope_local_theta: float = 10000.0  # sliding_attention layers (Gemma 3: rope_local_base_freq)
    tie_word_embeddings: bool = True
    attention_dropout: float = 0.0
    bos_token_id: int | None = 2
    eos_token_id: int = 1
    pad_token_id: int | None = 0
    separator_token_id: int | None = None  # starts the target side; None: bos_token_id, else eos_token_id
    positions_after_prefix: bool = True
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: bool | str = "none"
    attention_kernel: str = "einsum"

    is_encoder_decoder = False

    def __post_init__(self) -> None:
        common.activation(self.hidden_act, "hidden_act")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type={self.model_type!r} is not one of {MODEL_TYPES}.")
        decoder_config.check_heads_and_set_separator(self)
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary positions.")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type={self.rope_type!r} is not supported; use one of {ROPE_TYPES}.")
        object.__setattr__(self, "layer_types", tuple(self.layer_types) or ("full_attention",) *
                           self.num_hidden_layers)
        unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if unknown or len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types={list(self.layer_types)} must name one of {LAYER_TYPES} per layer.")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ValueError("layer_types has sliding_attention layers but sliding_window is not set.")
        if self.attn_logit_softcapping is not None and self.attention_kernel != "einsum":
            raise ValueError(f"model.attention_kernel={self.attention_kernel!r} cannot soft-cap attention scores "
                             f"(attn_logit_softcapping={self.attn_logit_softcapping}); use 'einsum'.")
        common.check_attention_kernel(self, self.attention_dropout)

    @classmethod
    def from_hf(cls, hf: Any, tensor_names: Collection[str], **overrides: Any) -> "Config":
        """From a `transformers` Gemma/Gemma2/Gemma3Text config; refuses any setting we do not compute."""
        decoder_config.check_model_type(hf, MODEL_TYPES, "Gemma")
        model_type = hf.model_type
        if getattr(hf, "use_bidirectional_attention", False):
            raise ValueError("use_bidirectional_attention=True (non-causal attention) is not supported.")
        gemma1 = model_type == "gemma"
        layer_types = () if gemma1 else tuple(hf.layer_types)
        fields = dict(
            **decoder_config.shared_fields(hf, default_eos=1, default_tie=True),
            hidden_act=hf.hidden_act if gemma1 else hf.hidden_activation,
            query_pre_attn_scalar=None if gemma1 else float(hf.query_pre_attn_scalar),
            # HF's Gemma 3 attention does not pass attn_logit_softcapping to its attention function.
            attn_logit_softcapping=_float_or_none(getattr(hf, "attn_logit_softcapping", None))
            if model_type == "gemma2" else None,
            final_logit_softcapping=_float_or_none(getattr(hf, "final_logit_softcapping", None)),
            sandwich_norms=not gemma1,
            qk_norm=model_type == "gemma3_text",
            attention_bias=bool(getattr(hf, "attention_bias", False)),
            layer_types=layer_types,
            sliding_window=int(hf.sliding_window) if "sliding_attention" in layer_types else None,
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
        """Prefix + tokens one sequence may span (sliding layers handle any length, as HF's)."""
        return self.max_position_embeddings

    def rope(self, layer_type: str) -> RopeSpec:
        """The rotary frequencies of `layer_type`'s layers."""
        if layer_type == "sliding_attention":
            return RopeSpec(self.head_dim, self.rope_local_theta, "default", 1.0, self.dtype)
        return RopeSpec(self.head_dim, self.rope_theta, self.rope_type, self.rope_factor, self.dtype)


def _float_or_none(x: Any) -> float | None:
    return None if x is None else float(x)


def _rope_params(params: Mapping[str, Any], where: str) -> tuple[float, str, float]:
    """(theta, rope type, linear factor) of one `rope_parameters` entry, refusing what we do not compute."""
    params = dict(params)
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    rope_type = params.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"{where}.rope_type={rope_type!r} (rope_scaling) is not supported; use one of {ROPE_TYPES}.")
    for key in sorted(set(params) - _ROPE_KEYS[rope_type]):
        if key in ("partial_rotary_factor", "attention_factor") and params[key] in (None, 1, 1.0):
            continue
        raise ValueError(f"{where}.{key}={params[key]!r} (rope_scaling) is not supported for rope_type={rope_type!r}; "
                         f"only {sorted(_ROPE_KEYS[rope_type])} are.")
    return float(params.get("rope_theta", 10000.0)), rope_type, float(params.get("factor", 1.0))


def _rope_fields(hf: Any) -> dict:
    """`rope_parameters`: one dict (Gemma 1/2: every layer) or one per layer type (Gemma 3) -> our rope fields."""
    params = dict(getattr(hf, "rope_parameters", None) or {})
    if not params:
        params = {"rope_type": "default", "rope_theta": getattr(hf, "rope_theta", 10000.0)}
    per_type = set(params) <= set(LAYER_TYPES)
    full = params["full_attention"] if per_type else params
    local = params.get("sliding_attention", full) if per_type else params
    theta, rope_type, factor = _rope_params(full, "rope_parameters" + (".full_attention" if per_type else ""))
    local_theta, local_type, _ = _rope_params(local, "rope_parameters" + (".sliding_attention" if per_type else ""))
    if local_type != "default" and "sliding_attention" in getattr(hf, "layer_types", ()):
        raise ValueError(f"rope_parameters.sliding_attention.rope_type={local_type!r} is not supported; sliding "
                         "layers take default RoPE.")
    return dict(rope_theta=theta, rope_type=rope_type, rope_factor=factor, rope_local_theta=local_theta)


# --- Sliding windows ---


def window_mask(mask_BxHxQxM: jax.Array, prefix_len: int, window: int) -> jax.Array:
    """A causal mask `[B, H, Q, P + C]` narrowed to a sliding window, as HF's cache with the prefix first does.

    The distance from a query to a visible key is the number of visible real tokens after that key up to the
    query (the query included): so it counts real tokens only, in teacher forcing, packed rows and decoding
    alike. A prefix slot j (of P, right-aligned for a bank) sits `P - j` slots before the first token.
    """
    tokens = mask_BxHxQxM[..., prefix_len:]
    seen = jnp.cumsum(tokens.astype(jnp.int32), axis=-1)
    total = seen[..., -1:]  # real tokens up to the query, itself included
    token_distance = total - seen
    prefix_distance = (total - 1) + (prefix_len - jnp.arange(prefix_len)).reshape(1, 1, 1, -1)
    near = jnp.concatenate([prefix_distance < window, token_distance < window], axis=-1)
    return mask_BxHxQxM & near


# --- Layers ---


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: `x / rms(x) * (1 + scale)` in float32, then cast to the compute dtype (param `scale`)."""

    eps: float
    dtype: str
    param_dtype: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.zeros, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        scale = (1.0 + scale.astype(jnp.float32)).reshape((1,) * (x.ndim - 1) + (-1,))  # over the leading axes
        return (normed * scale).astype(self.dtype)


def _norm(cfg: Config, name: str) -> RMSNorm:
    return RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name=name)


class GemmaAttention(nn.Module):
    config: Config
    deterministic: bool

    @nn.compact
    def __call__(self, x_BxQxD, rope, mask_BxHxQxM, prefix: KV | BankKV | None, cache: dict | None):
        cfg = self.config
        heads = lambda n, name: nn.DenseGeneral((n, cfg.head_dim), use_bias=cfg.attention_bias, dtype=cfg.dtype,
                                                param_dtype=cfg.param_dtype, name=name)
        q = heads(cfg.num_attention_heads, "q_proj")(x_BxQxD)
        k = heads(cfg.num_key_value_heads, "k_proj")(x_BxQxD)
        v = heads(cfg.num_key_value_heads, "v_proj")(x_BxQxD)
        if cfg.qk_norm:
            q, k = _norm(cfg, "q_norm")(q), _norm(cfg, "k_norm")(k)
        cos, sin = rope
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        self.sow("intermediates", "key_value", KV(k, v))  # post-rotation K/V (prefix init from text)
        if cache is not None:
            k, v, cache = write_cache(cache, k, v)
        dropout = Dropout(cfg.attention_dropout) if cfg.attention_dropout > 0 else None
        scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
        y = attend(q, k, v, mask_BxHxQxM, None, scale, dropout, self.deterministic, prefix, cfg.attention_kernel,
                   cfg.attn_logit_softcapping)
        out = nn.DenseGeneral(cfg.hidden_size, axis=(-2, -1), use_bias=cfg.attention_bias, dtype=cfg.dtype,
                              param_dtype=cfg.param_dtype, name="o_proj")
        return out(y), cache


class GemmaMLP(nn.Module):
    """GeGLU: `down(gelu_tanh(gate(x)) * up(x))`."""

    config: Config

    @nn.compact
    def __call__(self, x_BxQxD: jax.Array) -> jax.Array:
        cfg = self.config
        dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)
        act = common.activation(cfg.hidden_act, "hidden_act")
        h_BxQxF = act(dense(cfg.intermediate_size, "gate_proj")(x_BxQxD)) * dense(cfg.intermediate_size, "up_proj")(
            x_BxQxD)
        return dense(cfg.hidden_size, "down_proj")(h_BxQxF)


class GemmaBlock(nn.Module):
    """One layer; scanned over layers by `GemmaStack`. `sliding` (scanned) picks its mask and RoPE."""

    config: Config
    deterministic: bool

    @nn.compact
    def __call__(self, x_BxQxD, prefix, cache, sliding, masks, ropes):
        cfg = self.config
        pick = lambda pair: jax.tree.map(lambda full, local: jnp.where(sliding, local, full), *pair)
        h, cache = GemmaAttention(cfg, self.deterministic, name="self_attn")(
            _norm(cfg, "input_layernorm")(x_BxQxD), pick(ropes), pick(masks), prefix, cache)
        if cfg.sandwich_norms:
            x_BxQxD = x_BxQxD + _norm(cfg, "post_attention_layernorm")(h)
            mlp_input = _norm(cfg, "pre_feedforward_layernorm")(x_BxQxD)
        else:
            x_BxQxD = x_BxQxD + h
            mlp_input = _norm(cfg, "post_attention_layernorm")(x_BxQxD)
        h = GemmaMLP(cfg, name="mlp")(checkpoint_name(mlp_input, "mlp_input"))  # saved by remat "minimal"
        if cfg.sandwich_norms:
            h = _norm(cfg, "post_feedforward_layernorm")(h)
        return x_BxQxD + h, cache


class GemmaStack(nn.Module):
    """Input embeddings in, final-norm hidden states out (HF's `model.layers`, `model.norm`)."""

    config: Config

    @nn.compact
    def __call__(self, x_BxQxD: jax.Array, positions_BxQ: jax.Array, mask_BxHxQxM: jax.Array,
                 prefix: KV | BankKV | None, cache: dict | None, deterministic: bool) -> tuple[jax.Array, dict | None]:
        cfg = self.config
        prefix_len = 0 if prefix is None else prefix.key.shape[-2]
        sliding_L = jnp.asarray([t == "sliding_attention" for t in cfg.layer_types])
        local_mask = mask_BxHxQxM if cfg.sliding_window is None else masks.map_visible(
            mask_BxHxQxM, lambda m: window_mask(m, prefix_len, cfg.sliding_window))
        ropes = (rope_tables(cfg.rope("full_attention"), positions_BxQ),
                 rope_tables(cfg.rope("sliding_attention"), positions_BxQ))
        layers = common.stack_layers(GemmaBlock, cfg.num_hidden_layers, cfg.remat,
                                     in_axes=(0, 0, 0, nn.broadcast, nn.broadcast))(cfg, deterministic, name="layers")
        x, cache = layers(x_BxQxD, prefix, cache, sliding_L, (mask_BxHxQxM, local_mask), ropes)
        return _norm(cfg, "norm")(x), cache


class Model(decoder_only.DecoderOnly):
    """A Gemma LM in the decoder-only shell (`decoder_only.DecoderOnly`: batch, prefix and methods)."""

    config: Config

    def setup(self) -> None:
        cfg = self.config
        unit = nn.initializers.normal(cfg.hidden_size**-0.5)  # random tiny checkpoints only; real weights load
        self.embed_tokens = common.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                     embedding_init=unit, name="embed_tokens")
        self.model = GemmaStack(cfg, name="model")
        if not cfg.tie_word_embeddings:
            self.lm_head = common.LMHead(cfg.vocab_size, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                    kernel_init=unit, name="lm_head")

    def embed(self, ids: jax.Array) -> jax.Array:
        """Token embeddings times sqrt(hidden_size), the factor rounded to the compute dtype first (as HF)."""
        scale = jnp.asarray(self.config.hidden_size**0.5, jnp.float32).astype(self.config.dtype)
        return self.embed_tokens(ids) * scale

    def head(self, h_BxQxD: jax.Array) -> jax.Array:
        cfg = self.config
        if cfg.tie_word_embeddings:
            logits = self.embed_tokens.attend(h_BxQxD).astype(jnp.float32)
        else:
            logits = self.lm_head(h_BxQxD).astype(jnp.float32)
        if cfg.final_logit_softcapping is not None:
            logits = cfg.final_logit_softcapping * jnp.tanh(logits / cfg.final_logit_softcapping)
        return logits

    def stack(self) -> nn.Module:
        return self.model


# --- HF checkpoints <-> our params: the one table (`hf_mapping`) ---


def hf_table(cfg: Config, tensor_names: Collection[str] | None = None) -> dict:
    """The HF mapping (`hf_mapping.FromHF` per leaf) of `Gemma*ForCausalLM` (a bare `*Model` saves `layers.0...`
    without `model.`) and llama.cpp's names for its GGUF files: layers stacked, torch Linear weights
    transposed, q/k/v/o split into heads. A tied head is not read.

    GGUF: llama.cpp's Gemma converters store every norm weight plus one (`GGUF.plus_one`; transformers' GGUF
    loader subtracts it again, and so do we).
    """
    base = hm.base_prefix(tensor_names, "embed_tokens.weight", "model.")
    H, N, K, D, F = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size,
                     cfg.intermediate_size)

    def layer(w: str, gguf: str, *split: tuple[int, ...], **kw) -> hm.FromHF:
        return hm.layers(cfg.num_hidden_layers, f"{base}layers.{{i}}.{w}", *split, gguf=hm.GGUF(f"blk.{{i}}.{gguf}"),
                         **kw)

    def heads_in(ours: str, gguf: str, heads: int) -> dict:
        out = {"kernel": layer(f"self_attn.{ours}.weight", f"attn_{gguf}.weight", (D,), (heads, K), transpose=True)}
        if cfg.attention_bias:
            out["bias"] = layer(f"self_attn.{ours}.bias", f"attn_{gguf}.bias", (heads, K))
        return out

    def norm(ours: str, gguf: str, dim: int = D) -> dict:
        return {"scale": hm.layers(cfg.num_hidden_layers, f"{base}layers.{{i}}.{ours}.weight", (dim,),
                                   gguf=hm.GGUF(f"blk.{{i}}.{gguf}.weight", plus_one=True))}

    attn = {"q_proj": heads_in("q_proj", "q", H), "k_proj": heads_in("k_proj", "k", N),
            "v_proj": heads_in("v_proj", "v", N),
            "o_proj": {"kernel": layer("self_attn.o_proj.weight", "attn_output.weight", (H, K), (D,), transpose=True)}}
    if cfg.attention_bias:
        attn["o_proj"]["bias"] = layer("self_attn.o_proj.bias", "attn_output.bias", (D,))
    if cfg.qk_norm:
        attn["q_norm"] = norm("self_attn.q_norm", "attn_q_norm", K)
        attn["k_norm"] = norm("self_attn.k_norm", "attn_k_norm", K)
    mlp = {name: {"kernel": layer(f"mlp.{name}.weight", f"ffn_{gguf}.weight", (d_in,), (d_out,), transpose=True)}
           for name, gguf, d_in, d_out in (("gate_proj", "gate", D, F), ("up_proj", "up", D, F),
                                           ("down_proj", "down", F, D))}
    layers = {"input_layernorm": norm("input_layernorm", "attn_norm"), "self_attn": attn, "mlp": mlp}
    if cfg.sandwich_norms:  # llama.cpp: post_attention_norm, ffn_norm (pre-MLP), post_ffw_norm
        layers.update(post_attention_layernorm=norm("post_attention_layernorm", "post_attention_norm"),
                      pre_feedforward_layernorm=norm("pre_feedforward_layernorm", "ffn_norm"),
                      post_feedforward_layernorm=norm("post_feedforward_layernorm", "post_ffw_norm"))
    else:
        layers["post_attention_layernorm"] = norm("post_attention_layernorm", "ffn_norm")
    params = {"embed_tokens": {"embedding": hm.tensor(f"{base}embed_tokens.weight", (cfg.vocab_size,), (D,),
                                                      gguf=hm.GGUF("token_embd.weight"))},
              "model": {"layers": layers,
                        "norm": {"scale": hm.tensor(f"{base}norm.weight", (D,), gguf=hm.GGUF("output_norm.weight", plus_one=True))}}}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = {"kernel": hm.tensor("lm_head.weight", (D,), (cfg.vocab_size,), transpose=True,
                                                 gguf=hm.GGUF("output.weight"))}
    return params

