"""Pieces every architecture shares: layer stacking, activations, RMSNorm, the token embedding and LM head (float
or quantized), the decoding cache."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from prefix_jax import quantized_vocab
from prefix_jax.models import fused_attention, masks
from prefix_jax.models.attention import empty_cache
from prefix_jax.models.prefix_contract import DECODER

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    # Names as transformers' ACT2FN spells them.
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jax.nn.tanh,
}


def activation(name: str, field: str = "activation") -> Callable[[jax.Array], jax.Array]:
    """The activation function named as transformers names it."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"{field}={name!r} is not supported; use one of {sorted(ACTIVATIONS)}.") from None


def reject_unsupported(hf: Any, unsupported: tuple[tuple[str, Any, str], ...], model: str) -> None:
    """Raises for a field of a `transformers` config set to a value we do not implement: `(field, value, meaning)` rows."""
    for field, bad, meaning in unsupported:
        if getattr(hf, field, None) is bad:
            raise ValueError(f"{model} config has {field}={bad} ({meaning}), which is not supported.")


def same_named(hf: Any, *names: str) -> dict[str, Any]:
    """The fields of a `transformers` config that our `Config` takes under the same name, as they are."""
    return {name: getattr(hf, name) for name in names}


class RMSNorm(nn.Module):
    """`scale * x / rms(x)` over the last axis (param `scale`), statistics in float32.

    Where the result meets the compute dtype follows each family's HF code: T5 scales in float32, then casts;
    Llama-family norms (`cast_before_scale`) cast the normalised x to the compute dtype first, then scale in it.
    """

    epsilon: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    cast_before_scale: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        over_leading_axes = (1,) * (x.ndim - 1) + (-1,)
        if self.cast_before_scale:
            return scale.astype(self.dtype).reshape(over_leading_axes) * normed.astype(self.dtype)
        return (scale.astype(jnp.float32).reshape(over_leading_axes) * normed).astype(self.dtype)


class Embed(nn.Embed):
    """The token embedding table (`nn.Embed`, param `embedding` `[V, D]`), also read by a tied LM head (`attend`),
    whose table may be a quantized leaf (`model.quantize`): the lookup then dequantizes only the gathered rows,
    and `attend` the table block by block (`quantized_vocab`). A float table is read as `nn.Embed` reads it."""

    def __call__(self, inputs: jax.Array) -> jax.Array:
        if quantized_vocab.is_quantized(self.embedding):
            return quantized_vocab.lookup(self.embedding, inputs, self.dtype or jnp.float32)
        return super().__call__(inputs)

    def attend(self, query: jax.Array) -> jax.Array:
        if quantized_vocab.is_quantized(self.embedding):
            return quantized_vocab.logits(query, self.embedding, 0, self.dtype or query.dtype)
        return super().attend(query)


class LMHead(nn.Dense):
    """An untied LM head (`nn.Dense` without bias, param `kernel` `[D, V]`) whose kernel may be a quantized leaf
    (`model.quantize`), then read block by block over the vocabulary (`quantized_vocab.logits`)."""

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features), self.param_dtype)
        if quantized_vocab.is_quantized(kernel):
            return quantized_vocab.logits(inputs, kernel, 1, self.dtype or inputs.dtype)
        inputs, kernel = self.promote_dtype(inputs, kernel, dtype=self.dtype)
        return jax.lax.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())), precision=self.precision)


# Rematerialization policies (`model.remat`): what the backward pass keeps of each layer's forward.
#   none: everything (most memory); full: only the layer input (recompute the whole layer);
#   minimal: the named q/k/v projections and MLP inputs (`checkpoint_name` tags below). The LM is frozen,
#   so no weight gradient needs saved inputs; what backward needs is q/k/v (with the prefix), and the
#   MLP's input for its activations' gradient; norms and softmax are cheap to recompute.
REMAT_POLICIES = ("none", "full", "minimal")
SAVED_BY_MINIMAL = ("query", "key", "value", "mlp_input")


def remat_policy(value: bool | str, field: str = "model.remat") -> str:
    """`model.remat` as a policy name (`False`/`True` are read as none/full)."""
    if isinstance(value, bool) or str(value).lower() in ("true", "false"):
        return "full" if str(value).lower() == "true" else "none"
    if value not in REMAT_POLICIES:
        raise ValueError(f"{field}={value!r} is not a remat policy; use one of {REMAT_POLICIES}.")
    return value


def check_attention_kernel(config: Any, attention_dropout: float) -> None:
    """`config.attention_kernel` (`model.attention_kernel`) for the config's compute dtype and head dims: a one-line
    error at setup when it cannot run here (see `fused_attention.check_attention_kernel`)."""
    head_dims = {geometry.head_dim for geometry in config.prefix_geometry().values()}
    fused_attention.check_attention_kernel(config.attention_kernel, config.dtype, head_dims, attention_dropout)


def stack_layers(block: type[nn.Module], num_layers: int, remat: bool | str, in_axes: tuple) -> type[nn.Module]:
    """`block` repeated `num_layers` times with `nn.scan`: params get a leading layer axis.

    The block's `__call__(carry, *xs)` returns `(carry, y)`; `in_axes` says per `xs` entry whether it
    is scanned (0: one slice per layer, e.g. the prefix K/V) or broadcast (`nn.broadcast`).
    `remat` is a policy of `REMAT_POLICIES` (or a bool).
    """
    policy = remat_policy(remat)
    if policy == "full":
        block = nn.remat(block, prevent_cse=False)
    elif policy == "minimal":
        block = nn.remat(block, prevent_cse=False,
                         policy=jax.checkpoint_policies.save_only_these_names(*SAVED_BY_MINIMAL))
    return nn.scan(
        block,
        variable_axes={"params": 0, "intermediates": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=in_axes,
        length=num_layers,
    )


class DecoderCache:
    """Mixin giving a `Model` (whose config has `prefix_geometry` and `dtype`) its decoding cache."""

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        """Empty decoder self-attention cache for `max_len` tokens (an encoder-decoder adds cross K/V on first use).

        Sized by the decoder's self-attention: layers, key/value heads, head dim (its `prefix_geometry`).
        """
        geometry = self.config.prefix_geometry()[DECODER]
        return {"self": empty_cache(geometry.num_layers, geometry.num_heads, geometry.head_dim, batch_size, max_len,
                                    self.config.dtype)}


def prepend_prompt(x_BxQxD: jax.Array, valid_BxQ: jax.Array,
                   prompt_PxD: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Embedding-only prompt tuning: `P` free vectors in front of the input embeddings, always valid."""
    if prompt_PxD is None:
        return x_BxQxD, valid_BxQ
    batch = x_BxQxD.shape[0]
    prompt = jnp.broadcast_to(prompt_PxD.astype(x_BxQxD.dtype)[None], (batch, *prompt_PxD.shape))
    valid = jnp.concatenate([jnp.ones((batch, prompt_PxD.shape[0]), valid_BxQ.dtype), valid_BxQ], axis=1)
    return jnp.concatenate([prompt, x_BxQxD], axis=1), valid


def teacher_forced_logits(model: nn.Module, batch: dict, prefix, deterministic: bool) -> jax.Array:
    """An encoder-decoder's logits `[B, T, V]` for `batch`: position t predicts `target_ids[:, t]`."""
    encoded, encoded_mask = model.encode(batch["source_ids"], batch["source_mask"], prefix, deterministic)
    decoder_ids = masks.shift_right(batch["target_ids"], model.config.decoder_start_token_id)
    decoder_mask = masks.shift_right(batch["target_mask"], 1)
    logits, _ = model.decode(encoded, encoded_mask, decoder_ids, decoder_mask, prefix, deterministic)
    return logits
