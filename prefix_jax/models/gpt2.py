"""GPT-2 as a pure-functional Flax decoder-only LM that takes a prefix.

The model reads one sequence `z = [source; separator; target[:-1]]` and predicts the target from
the target side only. Positions are learned (`wpe`) and count real tokens only, so left and right
padding give the same result. Where text sits relative to a prefix (`Prefix.kv[DECODER]`, the same
K/V prepended to every layer's self-attention):

* prefix `[PREFIX; x; y]`: with `Config.positions_after_prefix` (HF given a `past_key_values` of
  length P, hence PEFT, and the paper's code) real tokens start at position P, else at 0.
* infix `[x; INFIX; y]` (`Prefix.infix`): source tokens cannot see the K/V and sit at 0..|x|-1; target
  tokens see them and continue at |x| + P, as if the P infix slots had been tokens in between.
* embedding-only (`Prefix.prompt_embeds`): P free vectors in front of the source, at positions
  0..P-1 like tokens (HF `inputs_embeds`); real tokens follow.

Prefix slots themselves have no position: their K/V are given.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Collection

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from prefix_jax.models import common, decoder_only
from prefix_jax.models import hf_mapping as hm
from prefix_jax.models.attention import MultiHeadAttention
from prefix_jax.models.dropout import Dropout
from prefix_jax.models.prefix_contract import DECODER, KV, DecoderOnlyPositions, StackGeometry, TextPositions


# HF GPT2Config fields this module does not implement: (field, unsupported value, meaning).
_UNSUPPORTED = (
    ("scale_attn_by_inverse_layer_idx", True, "scores divided by layer index + 1"),
    ("add_cross_attention", True, "cross-attention layers (GPT-2 as an encoder-decoder's decoder)"),
    ("tie_word_embeddings", False, "an LM head untied from the token embedding"),
)


@dataclasses.dataclass(frozen=True)
class Config(DecoderOnlyPositions):
    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    n_inner: int | None = None  # MLP width; None: 4 * n_embd
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    embd_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    scale_attn_weights: bool = True  # scores * head_dim**-0.5
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    pad_token_id: int | None = None  # GPT-2 has none
    separator_token_id: int | None = None  # starts the target side; None: bos_token_id
    positions_after_prefix: bool = True  # see module docstring
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: bool | str = "none"  # common.REMAT_POLICIES (False/True read as none/full)
    attention_kernel: str = "einsum"  # fused_attention.ATTENTION_KERNELS (model.attention_kernel)

    is_encoder_decoder = False
    architecture = "gpt2"

    def __post_init__(self) -> None:
        common.activation(self.activation_function, "activation_function")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_head={self.n_head} does not divide n_embd={self.n_embd}.")
        if self.separator_token_id is None:
            object.__setattr__(self, "separator_token_id", self.bos_token_id)
        common.check_attention_kernel(self, self.attn_pdrop)

    @classmethod
    def from_hf(cls, hf: Any, tensor_names: set[str], **overrides: Any) -> "Config":
        """From a `transformers` GPT2Config (the tensor names are not needed: GPT-2's layout does not vary).

        `reorder_and_upcast_attn` is accepted: it only computes scores in float32, which we always do.
        """
        common.reject_unsupported(hf, _UNSUPPORTED, "GPT-2")
        fields = dict(
            **common.same_named(hf, "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner",
                                "activation_function", "layer_norm_epsilon", "pad_token_id"),
            embd_pdrop=float(hf.embd_pdrop),
            resid_pdrop=float(hf.resid_pdrop),
            attn_pdrop=float(hf.attn_pdrop),
            scale_attn_weights=bool(hf.scale_attn_weights),
            bos_token_id=hf.bos_token_id if hf.bos_token_id is not None else 50256,
            eos_token_id=hf.eos_token_id if isinstance(hf.eos_token_id, int) else 50256,
        )
        fields.update(overrides)
        return cls(**fields)

    def prefix_geometry(self) -> dict[str, StackGeometry]:
        return {DECODER: StackGeometry(self.n_layer, self.n_head, self.head_dim)}

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def max_positions(self) -> int:
        return self.n_positions

    @property
    def hidden_size(self) -> int:
        return self.n_embd


def layer_norm(cfg: Config, name: str) -> nn.LayerNorm:
    # Flax computes the statistics in float32 (at least) whatever the compute dtype; two-pass variance as torch.
    return nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                        use_fast_variance=False, name=name)


class GPT2Block(nn.Module):
    """One pre-LN layer; scanned over layers by `GPT2Stack`."""

    config: Config
    deterministic: bool

    @nn.compact
    def __call__(self, x_BxQxD, prefix, cache, mask_BxHxQxM):
        cfg = self.config
        det = self.deterministic
        dense = lambda n, name: nn.Dense(n, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)
        dropout = lambda h: Dropout(cfg.resid_pdrop)(h, deterministic=det)

        attention = MultiHeadAttention(
            cfg.n_head, cfg.head_dim, cfg.n_embd, use_bias=True,
            query_scale=cfg.head_dim**-0.5 if cfg.scale_attn_weights else 1.0, dropout_rate=cfg.attn_pdrop,
            dtype=cfg.dtype, param_dtype=cfg.param_dtype, attention_kernel=cfg.attention_kernel, name="attn")
        h, cache = attention(layer_norm(cfg, "ln_1")(x_BxQxD), None, mask_BxHxQxM, None, prefix, cache, det)
        x_BxQxD = x_BxQxD + dropout(h)
        act = common.activation(cfg.activation_function, "activation_function")
        mlp_input = checkpoint_name(layer_norm(cfg, "ln_2")(x_BxQxD), "mlp_input")  # saved by remat "minimal"
        h_BxQxF = act(dense(cfg.inner_dim, "c_fc")(mlp_input))
        h = dense(cfg.n_embd, "c_proj")(h_BxQxF)
        return x_BxQxD + dropout(h), cache


class GPT2Stack(nn.Module):
    """Token + position embeddings in, final-norm hidden states out."""

    config: Config

    @nn.compact
    def __call__(self, x_BxQxD: jax.Array, positions_BxQ: jax.Array, mask_BxHxQxM: jax.Array, prefix: KV | None,
                 cache: dict | None, deterministic: bool) -> tuple[jax.Array, dict | None]:
        cfg = self.config
        wpe = nn.Embed(cfg.n_positions, cfg.n_embd, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                       embedding_init=nn.initializers.normal(0.02), name="wpe")
        x = Dropout(cfg.embd_pdrop)(x_BxQxD + wpe(positions_BxQ), deterministic=deterministic)
        layers = common.stack_layers(GPT2Block, cfg.n_layer, cfg.remat, in_axes=(0, 0, nn.broadcast))(
            cfg, deterministic, name="h")
        x, cache = layers(x, prefix, cache, mask_BxHxQxM)
        return layer_norm(cfg, "ln_f")(x), cache


class Model(decoder_only.DecoderOnly):
    """GPT-2 in the decoder-only shell (`decoder_only.DecoderOnly`: batch, prefix and methods)."""

    config: Config

    def setup(self) -> None:
        cfg = self.config
        # HF's init (std 0.02): only used to build random tiny checkpoints; real weights are loaded.
        self.wte = common.Embed(cfg.vocab_size, cfg.n_embd, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                            embedding_init=nn.initializers.normal(0.02), name="wte")
        self.transformer = GPT2Stack(cfg, name="transformer")

    def embed(self, ids: jax.Array) -> jax.Array:
        return self.wte(ids)

    def head(self, h_BxQxD: jax.Array) -> jax.Array:
        return self.wte.attend(h_BxQxD).astype(jnp.float32)  # the LM head is tied to `wte`

    def stack(self) -> nn.Module:
        return self.transformer

    def check_lengths(self, where: TextPositions | None, prefix_len: int, num_keys: int) -> None:
        """Teacher forcing: prefix + source + target within the position table (`generate` checks decoding)."""
        limit = self.config.n_positions
        if where is not None and where.needed > limit:
            raise ValueError(f"GPT-2 needs {where.needed} positions (prefix + source + target) but has "
                             f"{limit}: shorten the prefix, the source or the target.")


_PROJECTIONS = ("query", "key", "value")  # the thirds of HF's fused `c_attn`, in order


def hf_table(cfg: Config, tensor_names: Collection[str] | None = None) -> dict:
    """The one HF mapping (`hf_mapping.FromHF` per leaf) of `GPT2LMHeadModel` (`transformer.h.0...`; a bare
    `GPT2Model`, as the original OpenAI upload, has `h.0...`), and of llama.cpp's GPT-2 GGUF files.

    GPT-2 uses `Conv1D`, whose weight is `[in, out]`: no transpose (llama.cpp stores it transposed); q/k/v are
    the thirds of the fused `c_attn`'s output axis. The tied head is not read (nor written).
    """
    base = hm.base_prefix(tensor_names, "wte.weight", "transformer.")
    H, K, D, inner = cfg.n_head, cfg.head_dim, cfg.n_embd, cfg.inner_dim

    def layer(w: str, gguf: str, *split: tuple[int, ...], conv1d: bool = False, **kw) -> hm.FromHF:
        return hm.layers(cfg.n_layer, f"{base}h.{{i}}.{w}", *split,
                         gguf=hm.GGUF(f"blk.{{i}}.{gguf}", transposed=conv1d), **kw)

    def norm(ours: str, gguf: str) -> dict:
        return {"scale": layer(f"{ours}.weight", f"{gguf}.weight", (D,)),
                "bias": layer(f"{ours}.bias", f"{gguf}.bias", (D,))}

    attn = {name: {"kernel": layer("attn.c_attn.weight", "attn_qkv.weight", (D,), (H, K), conv1d=True,
                                   offset=(0, j * D)),
                   "bias": layer("attn.c_attn.bias", "attn_qkv.bias", (H, K), offset=(j * D,))}
            for j, name in enumerate(_PROJECTIONS)}
    attn["out"] = {"kernel": layer("attn.c_proj.weight", "attn_output.weight", (H, K), (D,), conv1d=True),
                   "bias": layer("attn.c_proj.bias", "attn_output.bias", (D,))}
    layers = {"ln_1": norm("ln_1", "attn_norm"), "attn": attn, "ln_2": norm("ln_2", "ffn_norm"),
              "c_fc": {"kernel": layer("mlp.c_fc.weight", "ffn_up.weight", (D,), (inner,), conv1d=True),
                       "bias": layer("mlp.c_fc.bias", "ffn_up.bias", (inner,))},
              "c_proj": {"kernel": layer("mlp.c_proj.weight", "ffn_down.weight", (inner,), (D,), conv1d=True),
                         "bias": layer("mlp.c_proj.bias", "ffn_down.bias", (D,))}}
    whole = lambda w, gguf, *split: hm.tensor(f"{base}{w}", *split, gguf=hm.GGUF(gguf))
    return {
        "wte": {"embedding": whole("wte.weight", "token_embd.weight", (cfg.vocab_size,), (D,))},
        "transformer": {"wpe": {"embedding": whole("wpe.weight", "position_embd.weight", (cfg.n_positions,), (D,))},
                        "h": layers,
                        "ln_f": {"scale": whole("ln_f.weight", "output_norm.weight", (D,)),
                                 "bias": whole("ln_f.bias", "output_norm.bias", (D,))}},
    }


# Partition rules (see prefix_jax/partitioning.py): "/"-joined param path (fullmatch, first wins) -> one
# logical axis name per dimension. Stacked layer params carry a leading "layers" axis; biases of width
# n_embd stay replicated (None), biases of sharded outputs follow their kernel's output axis.
PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"wte/embedding", ("vocab", "embed")),
    (r"transformer/wpe/embedding", ("positions", "embed")),
    (r"transformer/h/attn/(query|key|value)/kernel", ("layers", "embed", "heads", "head_dim")),
    (r"transformer/h/attn/(query|key|value)/bias", ("layers", "heads", "head_dim")),
    (r"transformer/h/attn/out/kernel", ("layers", "heads", "head_dim", "embed")),
    (r"transformer/h/attn/out/bias", ("layers", None)),
    (r"transformer/h/c_fc/kernel", ("layers", "embed", "mlp")),
    (r"transformer/h/c_fc/bias", ("layers", "mlp")),
    (r"transformer/h/c_proj/kernel", ("layers", "mlp", "embed")),
    (r"transformer/h/c_proj/bias", ("layers", None)),
    (r"transformer/h/ln_(1|2)/(scale|bias)", ("layers", "norm")),
    (r"transformer/ln_f/(scale|bias)", ("norm",)),
)
