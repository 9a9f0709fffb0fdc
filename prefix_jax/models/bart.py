"""BART as a pure-functional Flax encoder-decoder that takes a prefix.

BART is post-LN with learned absolute positions (HF's table has 2 extra leading rows: position p
reads row p + 2). Where text sits relative to a self-attention prefix is a choice
(`Config.positions_after_prefix`): the paper's code starts real tokens at position 0 whatever the
prefix; HF given a `past_key_values` of length P (hence PEFT) starts decoder tokens at P. The flag
shifts the encoder tokens by the ENCODER prefix length and the decoder tokens by the DECODER prefix
length. Prefix slots themselves have no position (their K/V are given). Positions count real tokens
only, so left and right padding give the same result.

Embedding-only prompts (`Prefix.prompt_embeds`) are free vectors put in front of the encoder input:
they are not multiplied by `embed_scale` (that scales looked-up token embeddings), take the first P
positions (real tokens follow), and go through `layernorm_embedding` like tokens.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from prefix_jax.models import common, encoder_decoder
from prefix_jax.models import sharded_load as sl
from prefix_jax.models.attention import MultiHeadAttention
from prefix_jax.models.dropout import Dropout
from prefix_jax.hub import take
from prefix_jax.models.prefix_contract import CROSS, DECODER, ENCODER, StackGeometry, TextPositions

POSITION_OFFSET = 2  # HF/fairseq BART: position p is row p + 2 of the position table

# HF config fields of BART-like checkpoints this module does not implement: (field, value, meaning).
_UNSUPPORTED = (
    ("normalize_before", True, "pre-LN blocks (mBART style)"),
    ("add_final_layer_norm", True, "a final layer norm per stack (mBART style)"),
    ("normalize_embedding", False, "no layernorm_embedding"),
    ("static_position_embeddings", True, "sinusoidal positions"),
    ("add_bias_logits", True, "a separate logits bias layer"),
    # transformers 5 then gives the encoder, the decoder and the LM head three separate embedding tables.
    ("tie_word_embeddings", False, "untied token embeddings / LM head"),
)


@dataclasses.dataclass(frozen=True)
class Config:
    """BART hyperparameters. Layerdrop is not implemented (training-time only; inference is unaffected)."""

    vocab_size: int
    d_model: int
    encoder_layers: int
    decoder_layers: int
    encoder_attention_heads: int
    decoder_attention_heads: int
    encoder_ffn_dim: int
    decoder_ffn_dim: int
    max_position_embeddings: int
    activation_function: str = "gelu"
    scale_embedding: bool = False  # token embeddings * sqrt(d_model)
    layer_norm_epsilon: float = 1e-5  # torch.nn.LayerNorm's default, which HF BART uses
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    decoder_start_token_id: int = 2
    positions_after_prefix: bool = False  # see module docstring
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: bool | str = "none"  # common.REMAT_POLICIES (False/True read as none/full)
    attention_kernel: str = "einsum"  # fused_attention.ATTENTION_KERNELS (model.attention_kernel)

    is_encoder_decoder = True
    architecture = "bart"

    def __post_init__(self) -> None:
        common.activation(self.activation_function, "activation_function")
        for field in ("encoder_attention_heads", "decoder_attention_heads"):
            if self.d_model % getattr(self, field):
                raise ValueError(f"{field}={getattr(self, field)} does not divide d_model={self.d_model}.")
        common.check_attention_kernel(self, self.attention_dropout)

    @classmethod
    def from_hf(cls, hf: Any, tensor_names: set[str], **overrides: Any) -> "Config":
        """From a `transformers` BartConfig (the tensor names are not needed: BART's layout does not vary)."""
        common.reject_unsupported(hf, _UNSUPPORTED, "BART")
        if getattr(hf, "extra_pos_embeddings", POSITION_OFFSET) != POSITION_OFFSET:
            raise ValueError(f"BART config has extra_pos_embeddings={hf.extra_pos_embeddings}; only "
                             f"{POSITION_OFFSET} (HF's position offset) is supported.")
        fields = dict(
            **common.same_named(hf, "vocab_size", "d_model", "encoder_layers", "decoder_layers",
                                "encoder_attention_heads", "decoder_attention_heads", "encoder_ffn_dim",
                                "decoder_ffn_dim", "max_position_embeddings", "activation_function"),
            scale_embedding=bool(hf.scale_embedding),
            dropout=float(hf.dropout),
            attention_dropout=float(hf.attention_dropout),
            activation_dropout=float(hf.activation_dropout),
            pad_token_id=hf.pad_token_id if hf.pad_token_id is not None else 1,
            bos_token_id=hf.bos_token_id if hf.bos_token_id is not None else 0,
            eos_token_id=hf.eos_token_id if isinstance(hf.eos_token_id, int) else 2,
            decoder_start_token_id=hf.decoder_start_token_id if hf.decoder_start_token_id is not None else 2,
        )
        fields.update(overrides)
        return cls(**fields)

    def prefix_geometry(self) -> dict[str, StackGeometry]:
        enc_heads, dec_heads = self.encoder_attention_heads, self.decoder_attention_heads
        enc = StackGeometry(self.encoder_layers, enc_heads, self.d_model // enc_heads)
        dec = StackGeometry(self.decoder_layers, dec_heads, self.d_model // dec_heads)
        return {ENCODER: enc, DECODER: dec, CROSS: dec}

    def text_positions(self, stack: str, text_len: int, prefix_len: int = 0, *,
                       before_tokens: int | jax.Array | None = None, infix: bool = False,
                       prompt_len: int = 0) -> TextPositions:
        """Where a stack's tokens start after its self-attention prefix, and the positions prefix + text need.

        stack: ENCODER (text: the source) or DECODER (text: the target); both offsets are that stack's.
        prefix_len: the stack's K/V prefix slots (a bank's longest); before_tokens: the slots before each row's
        tokens (default prefix_len); they move the text only with `positions_after_prefix` (module docstring).
        prompt_len: virtual tokens in front of the encoder input that `text_len` does not count.
        `infix` is for decoder-only models and ignored.
        """
        before = prefix_len if before_tokens is None else before_tokens
        prompt = prompt_len if stack == ENCODER else 0
        offset = (before if self.positions_after_prefix else 0) + prompt
        taken = (prefix_len if self.positions_after_prefix else 0) + prompt
        return TextPositions(offset, offset, taken + text_len)

    @property
    def max_positions(self) -> int:
        return self.max_position_embeddings

    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.d_model) if self.scale_embedding else 1.0


def layer_norm(cfg: Config, name: str) -> nn.LayerNorm:
    # Flax computes the statistics in float32 (at least) whatever the compute dtype; two-pass variance as torch.
    return nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                        use_fast_variance=False, name=name)


class BartBlock(encoder_decoder.Block):
    """One post-LN encoder or decoder layer."""

    @nn.compact
    def __call__(self, x_BxQxD, prefix_self, prefix_cross, cache, self_mask, self_bias, memory, cross_mask):
        cfg = self.config
        det = self.deterministic
        heads = cfg.decoder_attention_heads if self.is_decoder else cfg.encoder_attention_heads
        head_dim = cfg.d_model // heads
        attention = lambda name: MultiHeadAttention(
            heads, head_dim, cfg.d_model, use_bias=True, query_scale=head_dim**-0.5,
            dropout_rate=cfg.attention_dropout, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            attention_kernel=cfg.attention_kernel, name=name)
        dense = lambda n, name: nn.Dense(n, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)
        dropout = lambda h: Dropout(cfg.dropout)(h, deterministic=det)

        h, self_cache = attention("self_attention")(
            x_BxQxD, None, self_mask, self_bias, prefix_self, None if cache is None else cache["self"], det)
        x_BxQxD = layer_norm(cfg, "self_attention_norm")(x_BxQxD + dropout(h))
        new_cache = None if cache is None else {"self": self_cache}
        if self.is_decoder:
            h, new_cache = encoder_decoder.attend_to_encoder(attention("cross_attention"), x_BxQxD, memory, cross_mask,
                                                             prefix_cross, cache, new_cache, det)
            x_BxQxD = layer_norm(cfg, "cross_attention_norm")(x_BxQxD + dropout(h))
        act = common.activation(cfg.activation_function, "activation_function")
        mlp_input = checkpoint_name(x_BxQxD, "mlp_input")  # saved by remat policy "minimal"
        h = act(dense(cfg.decoder_ffn_dim if self.is_decoder else cfg.encoder_ffn_dim, "fc1")(mlp_input))
        h = Dropout(cfg.activation_dropout)(h, deterministic=det)
        h = dense(cfg.d_model, "fc2")(h)
        x_BxQxD = layer_norm(cfg, "ffn_norm")(x_BxQxD + dropout(h))
        return x_BxQxD, new_cache


class BartStack(encoder_decoder.Stack):
    """Encoder or decoder: learned positions, `layernorm_embedding`, scanned layers."""

    block = BartBlock

    def embed_positions(self, x_BxQxD, query_positions_BxQ, key_positions_BxC, prefix_len, deterministic):
        """Each token's learned position embedding added to it; no bias (absolute positions need no keys')."""
        cfg = self.config
        table = nn.Embed(cfg.max_position_embeddings + POSITION_OFFSET, cfg.d_model, dtype=cfg.dtype,
                         param_dtype=cfg.param_dtype, embedding_init=nn.initializers.normal(0.02),
                         name="embed_positions")
        x = layer_norm(cfg, "layernorm_embedding")(x_BxQxD + table(query_positions_BxQ + POSITION_OFFSET))
        return Dropout(cfg.dropout)(x, deterministic=deterministic), None


class Model(encoder_decoder.EncoderDecoder):
    """BART in the encoder-decoder shell (`encoder_decoder.EncoderDecoder`: batch, prefix and methods)."""

    config: Config
    stack_type = BartStack
    embedding_std = 0.02  # HF's init_std

    def setup(self) -> None:
        super().setup()
        cfg = self.config
        self.final_logits_bias = self.param("final_logits_bias", nn.initializers.zeros, (cfg.vocab_size,),
                                            cfg.param_dtype)

    def embed(self, ids: jax.Array) -> jax.Array:
        return self.shared(ids) * jnp.asarray(self.config.embed_scale, self.config.dtype)

    def head(self, h_BxQxD: jax.Array) -> jax.Array:
        """Float32 logits of the head tied to the token embedding, plus `final_logits_bias`."""
        return self.shared.attend(h_BxQxD).astype(jnp.float32) + self.final_logits_bias.astype(jnp.float32)[None, None]


# Our sub-layer names -> HF's (attention, its layer norm). The FFN's norm is HF's `final_layer_norm`.
_SUBLAYERS = {"self_attention": ("self_attn", "self_attn_layer_norm"),
              "cross_attention": ("encoder_attn", "encoder_attn_layer_norm")}
_PROJECTIONS = (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"))
# Where a tied checkpoint may keep its one copy of the token embedding.
_EMBEDDING_NAMES = ("model.shared.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight",
                    "lm_head.weight")


def params_from_hf(tensors: Mapping[str, np.ndarray], cfg: Config, where: str = "") -> dict:
    """HF `BartForConditionalGeneration` state dict -> our params (layers stacked on a leading axis)."""
    t = lambda name: take(tensors, name, where)

    def attention(prefix: str, heads: int) -> dict:
        K = cfg.d_model // heads
        out = {ours: {"kernel": common.heads_in_kernel(t(f"{prefix}.{theirs}.weight"), heads, K),
                      "bias": common.heads_in_bias(t(f"{prefix}.{theirs}.bias"), heads, K)}
               for ours, theirs in _PROJECTIONS}
        out["out"] = {"kernel": common.heads_out_kernel(t(f"{prefix}.out_proj.weight"), heads, K),
                      "bias": t(f"{prefix}.out_proj.bias")}
        return out

    def norm(prefix: str) -> dict:
        return {"scale": t(f"{prefix}.weight"), "bias": t(f"{prefix}.bias")}

    def layer(stack: str, heads: int, i: int) -> dict:
        p = f"model.{stack}.layers.{i}"
        out = {"ffn_norm": norm(f"{p}.final_layer_norm")}
        for ours, (attn, ln) in _SUBLAYERS.items():
            if stack == "decoder" or ours == "self_attention":
                out[ours] = attention(f"{p}.{attn}", heads)
                out[f"{ours}_norm"] = norm(f"{p}.{ln}")
        for fc in ("fc1", "fc2"):
            out[fc] = {"kernel": common.dense_kernel(t(f"{p}.{fc}.weight")), "bias": t(f"{p}.{fc}.bias")}
        return out

    def stack(name: str, num_layers: int, heads: int) -> dict:
        return {
            "embed_positions": {"embedding": t(f"model.{name}.embed_positions.weight")},
            "layernorm_embedding": norm(f"model.{name}.layernorm_embedding"),
            "layers": common.stacked(num_layers, lambda i: layer(name, heads, i)),
        }

    embedding = next((n for n in _EMBEDDING_NAMES if n in tensors), _EMBEDDING_NAMES[0])
    bias = tensors.get("final_logits_bias")  # a buffer: absent from some checkpoints, then zeros
    params = {
        "shared": {"embedding": t(embedding)},
        "encoder": stack("encoder", cfg.encoder_layers, cfg.encoder_attention_heads),
        "decoder": stack("decoder", cfg.decoder_layers, cfg.decoder_attention_heads),
        "final_logits_bias": np.zeros(cfg.vocab_size, np.float32) if bias is None else bias.reshape(-1),
    }
    return params


def hf_layout(cfg: Config, tensor_names: set[str]) -> dict:
    """`params_from_hf` as data, block-readable (`sharded_load.FromHF` per leaf): the same tree and values."""
    D = cfg.d_model

    def stack(name: str, num_layers: int, heads: int, ffn: int) -> dict:
        K, p = D // heads, f"model.{name}.layers.{{i}}"
        per_layer = lambda w, *split, **kw: sl.layers(num_layers, f"{p}.{w}", *split, **kw)
        norm = lambda n: {"scale": per_layer(f"{n}.weight", (D,)), "bias": per_layer(f"{n}.bias", (D,))}
        out: dict = {"ffn_norm": norm("final_layer_norm")}
        for ours, (attn, ln) in _SUBLAYERS.items():
            if name == "decoder" or ours == "self_attention":
                out[ours] = {o: {"kernel": per_layer(f"{attn}.{t}.weight", (D,), (heads, K), transpose=True),
                                 "bias": per_layer(f"{attn}.{t}.bias", (heads, K))} for o, t in _PROJECTIONS}
                out[ours]["out"] = {"kernel": per_layer(f"{attn}.out_proj.weight", (heads, K), (D,), transpose=True),
                                    "bias": per_layer(f"{attn}.out_proj.bias", (D,))}
                out[f"{ours}_norm"] = norm(ln)
        out["fc1"] = {"kernel": per_layer("fc1.weight", (D,), (ffn,), transpose=True),
                      "bias": per_layer("fc1.bias", (ffn,))}
        out["fc2"] = {"kernel": per_layer("fc2.weight", (ffn,), (D,), transpose=True),
                      "bias": per_layer("fc2.bias", (D,))}
        base = f"model.{name}"
        return {"embed_positions": {"embedding": sl.tensor(f"{base}.embed_positions.weight",
                                                           (cfg.max_position_embeddings + POSITION_OFFSET,), (D,))},
                "layernorm_embedding": {"scale": sl.tensor(f"{base}.layernorm_embedding.weight", (D,)),
                                        "bias": sl.tensor(f"{base}.layernorm_embedding.bias", (D,))},
                "layers": out}

    embedding = next((n for n in _EMBEDDING_NAMES if n in tensor_names), _EMBEDDING_NAMES[0])
    V = cfg.vocab_size
    return {
        "shared": {"embedding": sl.tensor(embedding, (V,), (D,))},
        "encoder": stack("encoder", cfg.encoder_layers, cfg.encoder_attention_heads, cfg.encoder_ffn_dim),
        "decoder": stack("decoder", cfg.decoder_layers, cfg.decoder_attention_heads, cfg.decoder_ffn_dim),
        # A buffer [1, V]: absent from some checkpoints, then zeros.
        "final_logits_bias": sl.tensor("final_logits_bias", (), (V,)) if "final_logits_bias" in tensor_names
        else sl.Zeros((V,)),
    }


def params_to_hf(params: Mapping[str, Any], cfg: Config) -> dict[str, np.ndarray]:
    """Inverse of `params_from_hf`: our params -> a HF BART state dict (e.g. to write a tiny checkpoint)."""
    p = jax.tree.map(np.asarray, params)
    out: dict[str, np.ndarray] = {"model.shared.weight": p["shared"]["embedding"],
                                  "final_logits_bias": p["final_logits_bias"][None]}

    def put_norm(prefix: str, n: Mapping, i: int | None = None) -> None:
        pick = (lambda x: x) if i is None else (lambda x: x[i])
        out[f"{prefix}.weight"], out[f"{prefix}.bias"] = pick(n["scale"]), pick(n["bias"])

    for stack, num_layers in (("encoder", cfg.encoder_layers), ("decoder", cfg.decoder_layers)):
        s, base = p[stack], f"model.{stack}"
        out[f"{base}.embed_positions.weight"] = s["embed_positions"]["embedding"]
        put_norm(f"{base}.layernorm_embedding", s["layernorm_embedding"])
        layers = s["layers"]
        for i in range(num_layers):
            lp = f"{base}.layers.{i}"
            put_norm(f"{lp}.final_layer_norm", layers["ffn_norm"], i)
            for ours, (attn, ln) in _SUBLAYERS.items():
                if ours not in layers:
                    continue
                a = layers[ours]
                for proj, theirs in _PROJECTIONS:
                    kernel_DxHxK = a[proj]["kernel"][i]
                    out[f"{lp}.{attn}.{theirs}.weight"] = kernel_DxHxK.reshape(cfg.d_model, -1).T
                    out[f"{lp}.{attn}.{theirs}.bias"] = a[proj]["bias"][i].reshape(-1)
                out[f"{lp}.{attn}.out_proj.weight"] = a["out"]["kernel"][i].reshape(-1, cfg.d_model).T
                out[f"{lp}.{attn}.out_proj.bias"] = a["out"]["bias"][i]
                put_norm(f"{lp}.{ln}", layers[f"{ours}_norm"], i)
            for fc in ("fc1", "fc2"):
                out[f"{lp}.{fc}.weight"] = layers[fc]["kernel"][i].T
                out[f"{lp}.{fc}.bias"] = layers[fc]["bias"][i]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


# Partition rules (see prefix_jax/partitioning.py): "/"-joined param path (fullmatch, first wins) -> one
# logical axis name per dimension. Stacked layer params carry a leading "layers" axis; biases of width
# d_model stay replicated (None), biases of sharded outputs follow their kernel's output axis.
_ATTENTION = r"(encoder|decoder)/layers/(self_attention|cross_attention)"
PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"shared/embedding", ("vocab", "embed")),
    (r"final_logits_bias", ("vocab",)),
    (r"(encoder|decoder)/embed_positions/embedding", ("positions", "embed")),
    (r"(encoder|decoder)/layernorm_embedding/(scale|bias)", ("norm",)),
    (_ATTENTION + r"/(query|key|value)/kernel", ("layers", "embed", "heads", "head_dim")),
    (_ATTENTION + r"/(query|key|value)/bias", ("layers", "heads", "head_dim")),
    (_ATTENTION + r"/out/kernel", ("layers", "heads", "head_dim", "embed")),
    (_ATTENTION + r"/out/bias", ("layers", None)),
    (r"(encoder|decoder)/layers/fc1/kernel", ("layers", "embed", "mlp")),
    (r"(encoder|decoder)/layers/fc1/bias", ("layers", "mlp")),
    (r"(encoder|decoder)/layers/fc2/kernel", ("layers", "mlp", "embed")),
    (r"(encoder|decoder)/layers/fc2/bias", ("layers", None)),
    (r"(encoder|decoder)/layers/\w+_norm/(scale|bias)", ("layers", "norm")),
)
