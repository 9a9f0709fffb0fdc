"""T5 (v1.0, v1.1, Flan-T5) as a pure-functional Flax encoder-decoder that takes a prefix.

How a prefix meets T5's relative position bias (the same as HF T5 given a `past_key_values` of
length P): the P prefix slots of a self-attention layer sit at positions `0 .. P-1` and real tokens
at `P + (their position)`. Relative distances between real tokens are unchanged; a prefix slot looks
like a token that came just before the text. Cross-attention has no position bias, so its prefix
has no position. Positions count real tokens only, so left and right padding give the same result.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Collection

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from prefix_jax.models import common, encoder_decoder
from prefix_jax.models import hf_mapping as hm
from prefix_jax.models.attention import MultiHeadAttention
from prefix_jax.models.dropout import Dropout
from prefix_jax.models.prefix_contract import CROSS, DECODER, ENCODER, StackGeometry, TextPositions


@dataclasses.dataclass(frozen=True)
class Config:
    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_heads: int
    num_encoder_layers: int
    num_decoder_layers: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dense_act_fn: str = "relu"
    is_gated_act: bool = False
    layer_norm_epsilon: float = 1e-6
    dropout_rate: float = 0.1
    scale_decoder_outputs: bool = True  # v1.0: logits of the tied head scaled by d_model**-0.5
    tied_lm_head: bool = True  # v1.1/Flan checkpoints carry their own lm_head
    pad_token_id: int = 0
    decoder_start_token_id: int = 0
    eos_token_id: int = 1
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: bool | str = "none"  # common.REMAT_POLICIES (False/True read as none/full)
    attention_kernel: str = "einsum"  # fused_attention.ATTENTION_KERNELS (model.attention_kernel)

    is_encoder_decoder = True
    architecture = "t5"

    def __post_init__(self) -> None:
        common.check_attention_kernel(self, self.dropout_rate)  # T5's dropout_rate is also its attention dropout

    @classmethod
    def from_hf(cls, hf: Any, tensor_names: set[str], **overrides: Any) -> "Config":
        """From a `transformers` Config and the names of the checkpoint's tensors."""
        scale = getattr(hf, "scale_decoder_outputs", None)
        if scale is None:  # configs written before transformers 5
            scale = getattr(hf, "tie_word_embeddings", True) is not False
        fields = dict(
            vocab_size=hf.vocab_size,
            d_model=hf.d_model,
            d_kv=hf.d_kv,
            d_ff=hf.d_ff,
            num_heads=hf.num_heads,
            num_encoder_layers=hf.num_layers,
            num_decoder_layers=hf.num_decoder_layers or hf.num_layers,
            relative_attention_num_buckets=hf.relative_attention_num_buckets,
            relative_attention_max_distance=hf.relative_attention_max_distance,
            dense_act_fn=hf.dense_act_fn,
            is_gated_act=hf.is_gated_act,
            layer_norm_epsilon=hf.layer_norm_epsilon,
            dropout_rate=hf.dropout_rate,
            scale_decoder_outputs=bool(scale),
            tied_lm_head="lm_head.weight" not in tensor_names,
            pad_token_id=hf.pad_token_id if hf.pad_token_id is not None else 0,
            decoder_start_token_id=(hf.decoder_start_token_id if hf.decoder_start_token_id is not None
                                    else hf.pad_token_id or 0),
            eos_token_id=hf.eos_token_id if isinstance(hf.eos_token_id, int) else 1,
        )
        fields.update(overrides)
        return cls(**fields)

    def prefix_geometry(self) -> dict[str, StackGeometry]:
        enc = StackGeometry(self.num_encoder_layers, self.num_heads, self.d_kv)
        dec = StackGeometry(self.num_decoder_layers, self.num_heads, self.d_kv)
        return {ENCODER: enc, DECODER: dec, CROSS: dec}

    def text_positions(self, stack: str, text_len: int, prefix_len: int = 0, *,
                       before_tokens: int | jax.Array | None = None, infix: bool = False,
                       prompt_len: int = 0) -> TextPositions:
        """As `bart.Config.text_positions`; T5's positions are relative, so a K/V prefix moves no token.

        A prompt of `prompt_len` virtual tokens in front of the encoder input takes the first positions.
        """
        prompt = prompt_len if stack == ENCODER else 0
        return TextPositions(prompt, prompt, prompt + text_len)

    @property
    def max_positions(self) -> int | None:
        return None  # relative positions: no table to overflow

    @property
    def hidden_size(self) -> int:
        return self.d_model


def relative_position_bucket(relative_position: jax.Array, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> jax.Array:
    """T5's bucketing of `key_position - query_position` (Mesh TensorFlow / HF semantics)."""
    buckets = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).astype(jnp.int32) * num_buckets
        distance = jnp.abs(relative_position)
    else:
        distance = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_small, distance, large)


class FeedForward(nn.Module):
    config: Config
    deterministic: bool

    @nn.compact
    def __call__(self, x_BxQxD: jax.Array) -> jax.Array:
        cfg = self.config
        dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)
        act = common.activation(cfg.dense_act_fn, "dense_act_fn")
        if cfg.is_gated_act:
            h = act(dense(cfg.d_ff, "wi_0")(x_BxQxD)) * dense(cfg.d_ff, "wi_1")(x_BxQxD)
        else:
            h = act(dense(cfg.d_ff, "wi")(x_BxQxD))
        h = Dropout(cfg.dropout_rate)(h, deterministic=self.deterministic)
        return dense(cfg.d_model, "wo")(h)


class T5Block(encoder_decoder.Block):
    """One pre-norm encoder or decoder layer."""

    @nn.compact
    def __call__(self, x_BxQxD, prefix_self, prefix_cross, cache, self_mask, self_bias, memory, cross_mask):
        cfg = self.config
        det = self.deterministic
        norm = lambda name: common.RMSNorm(cfg.layer_norm_epsilon, cfg.dtype, cfg.param_dtype, name=name)
        attention = lambda name: MultiHeadAttention(
            cfg.num_heads, cfg.d_kv, cfg.d_model, use_bias=False, query_scale=1.0,
            dropout_rate=cfg.dropout_rate, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            attention_kernel=cfg.attention_kernel, name=name)
        dropout = Dropout(cfg.dropout_rate)

        h, self_cache = attention("self_attention")(
            norm("self_attention_norm")(x_BxQxD), None, self_mask, self_bias, prefix_self,
            None if cache is None else cache["self"], det)
        x_BxQxD = x_BxQxD + dropout(h, deterministic=det)
        new_cache = None if cache is None else {"self": self_cache}
        if self.is_decoder:
            h, new_cache = encoder_decoder.attend_to_encoder(
                attention("cross_attention"), norm("cross_attention_norm")(x_BxQxD), memory, cross_mask, prefix_cross,
                cache, new_cache, det)
            x_BxQxD = x_BxQxD + dropout(h, deterministic=det)
        h = FeedForward(cfg, det, name="ffn")(checkpoint_name(norm("ffn_norm")(x_BxQxD), "mlp_input"))
        x_BxQxD = x_BxQxD + dropout(h, deterministic=det)
        return x_BxQxD, new_cache


class T5Stack(encoder_decoder.Stack):
    """Encoder or decoder: relative-position bias, scanned layers, final norm."""

    block = T5Block

    def embed_positions(self, x_BxQxD, query_positions_BxQ, key_positions_BxC, prefix_len, deterministic):
        """T5 adds no positions to the input: every layer adds the same relative-position bias."""
        cfg = self.config
        batch = x_BxQxD.shape[0]
        # Prefix slots at positions 0..P-1, real tokens from P (see module docstring).
        prefix_positions = jnp.broadcast_to(jnp.arange(prefix_len, dtype=jnp.int32), (batch, prefix_len))
        key_positions = jnp.concatenate([prefix_positions, prefix_len + key_positions_BxC], axis=1)
        relative = key_positions[:, None, :] - (prefix_len + query_positions_BxQ)[:, :, None]
        buckets = relative_position_bucket(relative, not self.is_decoder, cfg.relative_attention_num_buckets,
                                           cfg.relative_attention_max_distance)
        table = nn.Embed(cfg.relative_attention_num_buckets, cfg.num_heads, param_dtype=cfg.param_dtype,
                         name="relative_attention_bias")
        bias_BxHxQxM = jnp.transpose(table(buckets), (0, 3, 1, 2))
        return Dropout(cfg.dropout_rate)(x_BxQxD, deterministic=deterministic), bias_BxHxQxM

    def output(self, x_BxQxD, deterministic):
        cfg = self.config
        x = common.RMSNorm(cfg.layer_norm_epsilon, cfg.dtype, cfg.param_dtype, name="final_norm")(x_BxQxD)
        return Dropout(cfg.dropout_rate)(x, deterministic=deterministic)


class Model(encoder_decoder.EncoderDecoder):
    """T5 in the encoder-decoder shell (`encoder_decoder.EncoderDecoder`: batch, prefix and methods)."""

    config: Config
    stack_type = T5Stack
    embedding_std = 1.0

    def setup(self) -> None:
        super().setup()
        cfg = self.config
        if not cfg.tied_lm_head:
            self.lm_head = common.LMHead(cfg.vocab_size, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                    name="lm_head")

    def embed(self, ids: jax.Array) -> jax.Array:
        return self.shared(ids)

    def head(self, h_BxQxD: jax.Array) -> jax.Array:
        """Float32 logits; v1.0's tied head first scales the hidden states by `d_model**-0.5`."""
        cfg = self.config
        if cfg.scale_decoder_outputs:
            h_BxQxD = h_BxQxD * (cfg.d_model**-0.5)
        logits = self.shared.attend(h_BxQxD) if cfg.tied_lm_head else self.lm_head(h_BxQxD)
        return logits.astype(jnp.float32)


# Per stack, its blocks' sub-layers in HF's order (`{stack}.block.{i}.layer.{j}`): (our name, HF's module).
_SUBLAYERS = {"encoder": (("self_attention", "SelfAttention"), ("ffn", "DenseReluDense")),
              "decoder": (("self_attention", "SelfAttention"), ("cross_attention", "EncDecAttention"),
                          ("ffn", "DenseReluDense"))}


def hf_table(cfg: Config, tensor_names: Collection[str] | None = None) -> dict:
    """The one HF mapping (`hf_mapping.FromHF` per leaf) of `T5ForConditionalGeneration`: layers stacked on a
    leading axis, torch Linear weights transposed, q/k/v/o split into heads."""
    H, K, D = cfg.num_heads, cfg.d_kv, cfg.d_model

    def stack(name: str, num_layers: int) -> dict:
        layer = lambda j, w, *split, **kw: hm.layers(num_layers, f"{name}.block.{{i}}.layer.{j}.{w}", *split, **kw)
        out: dict = {}
        for j, (ours, module) in enumerate(_SUBLAYERS[name]):
            if ours == "ffn":
                wis = ("wi_0", "wi_1") if cfg.is_gated_act else ("wi",)
                out["ffn"] = {w: {"kernel": layer(j, f"DenseReluDense.{w}.weight", (D,), (cfg.d_ff,), transpose=True)}
                              for w in wis}
                out["ffn"]["wo"] = {"kernel": layer(j, "DenseReluDense.wo.weight", (cfg.d_ff,), (D,), transpose=True)}
            else:
                out[ours] = {o: {"kernel": layer(j, f"{module}.{t}.weight", (D,), (H, K), transpose=True)}
                             for o, t in (("query", "q"), ("key", "k"), ("value", "v"))}
                out[ours]["out"] = {"kernel": layer(j, f"{module}.o.weight", (H, K), (D,), transpose=True)}
            out[f"{ours}_norm"] = {"scale": layer(j, "layer_norm.weight", (D,))}
        bias = f"{name}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        return {"relative_attention_bias": {"embedding": hm.tensor(bias, (cfg.relative_attention_num_buckets,), (H,))},
                "layers": out, "final_norm": {"scale": hm.tensor(f"{name}.final_layer_norm.weight", (D,))}}

    params = {
        "shared": {"embedding": hm.tensor("shared.weight", (cfg.vocab_size,), (D,))},
        "encoder": stack("encoder", cfg.num_encoder_layers),
        "decoder": stack("decoder", cfg.num_decoder_layers),
    }
    if not cfg.tied_lm_head:
        params["lm_head"] = {"kernel": hm.tensor("lm_head.weight", (D,), (cfg.vocab_size,), transpose=True)}
    return params


# Partition rules (see prefix_jax/partitioning.py): "/"-joined param path (fullmatch, first wins) -> one
# logical axis name per dimension. Stacked layer params carry a leading "layers" axis.
_ATTENTION = r"(encoder|decoder)/layers/(self_attention|cross_attention)"
PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"shared/embedding", ("vocab", "embed")),
    (r"lm_head/kernel", ("embed", "vocab")),
    (r"(encoder|decoder)/relative_attention_bias/embedding", ("buckets", "heads")),
    (_ATTENTION + r"/(query|key|value)/kernel", ("layers", "embed", "heads", "head_dim")),
    (_ATTENTION + r"/out/kernel", ("layers", "heads", "head_dim", "embed")),
    (r"(encoder|decoder)/layers/ffn/(wi|wi_0|wi_1)/kernel", ("layers", "embed", "mlp")),
    (r"(encoder|decoder)/layers/ffn/wo/kernel", ("layers", "mlp", "embed")),
    (r"(encoder|decoder)/layers/\w+_norm/scale", ("layers", "norm")),
    (r"(encoder|decoder)/final_norm/scale", ("norm",)),
)
