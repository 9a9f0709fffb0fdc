"""Token cross-entropy: per token from logits (`token_losses`), and straight from final hidden states, never
holding the float32 `[B, T, V]` logits (`chunked_token_cross_entropy`).

`chunked_token_cross_entropy(h_BxTxD, head, targets, mask)` equals
`token_cross_entropy(head(h), targets, mask)` (same sum, same count, same gradient w.r.t. `h`),
but flattens the `B*T` tokens, pads them to whole chunks of `chunk_size` tokens, and scans over the chunks:
each step computes one chunk's `[chunk, V]` logits, reduces them to per-token losses, and drops them. The
scan body is rematerialized (`jax.checkpoint`), so the backward pass recomputes each chunk's logits instead
of keeping them: peak extra memory is `O(chunk_size * V)` in both passes instead of `O(B * T * V)`.

Token chunks (not vocabulary chunks) keep the logsumexp exact and work unchanged when the head is sharded
over the vocabulary (the reduction over V becomes a collective). Each chunk reads the whole head weight,
so a chunk should be large enough that the matmul stays efficient (the default aims at 64 MiB of logits).

Gradients flow to whatever is differentiated: the hidden states (the prefix gradient reaches the prefix
only through them) and, only if asked for, the head weight or bias. Prefix tuning never asks for the
latter, so no `[V, D]` gradient is ever formed.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from prefix_jax import quantized_vocab

CHUNK_LOGITS = 2**24  # default logits elements per chunk


class LossConfigError(ValueError):
    """A chunked-loss argument is out of range."""


@dataclasses.dataclass(frozen=True)
class LMHead:
    """How a model turns final hidden states into logits: `((h * scale) @ W).astype(f32) + bias`.

    `weight` is either a tied embedding table `[V, D]` (`vocab_axis=0`) or a dense kernel `[D, V]`
    (`vocab_axis=1`); it is used in place, never transposed or copied. `bias` (`[V]`, e.g. BART's
    `final_logits_bias`) is added in float32; `scale` multiplies the hidden states first (T5 v1.0 with a
    tied head: `d_model**-0.5`). `dtype` is the matmul's compute dtype (the model's `config.dtype`). A quantized
    `weight` (`model.quantize`) is read as the model reads it, block by block (`quantized_vocab.logits`).
    """

    weight: jax.Array
    vocab_axis: int = 0
    bias: jax.Array | None = None
    scale: float = 1.0
    dtype: Any = None

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[self.vocab_axis]

    def logits(self, h_NxD: jax.Array) -> jax.Array:
        """Float32 logits `[..., V]` exactly as the model's own head computes them."""
        if self.scale != 1.0:
            h_NxD = h_NxD * jnp.asarray(self.scale, h_NxD.dtype)
        if quantized_vocab.is_quantized(self.weight):
            out = quantized_vocab.logits(h_NxD, self.weight, self.vocab_axis, self.dtype or h_NxD.dtype)
            out = out.astype(jnp.float32)
        else:
            dtype = self.dtype or jnp.result_type(h_NxD, self.weight)
            h, w = h_NxD.astype(dtype), self.weight.astype(dtype)
            contract = ((h.ndim - 1,), (1 - self.vocab_axis,))
            out = jax.lax.dot_general(h, w, (contract, ((), ()))).astype(jnp.float32)
        if self.bias is None:
            return out
        return out + self.bias.astype(jnp.float32).reshape((1,) * (out.ndim - 1) + (-1,))


jax.tree_util.register_dataclass(LMHead, data_fields=["weight", "bias"], meta_fields=["vocab_axis", "scale", "dtype"])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def token_losses(logits_NxV: jax.Array, targets_N: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-token cross-entropy `[...]` of float32 logits `[..., V]` (no masking), with label smoothing as
    transformers' trainer: `(1 - e) * nll + e * mean_v(-log p_v)`.

    The values are those of `log_softmax`, `take_along_axis` and `mean` (the same operations; inside a larger
    program XLA may order the sums differently, a last-bit difference). The gradient is written out,
    `g * (softmax - (1 - e) * onehot - e / V)`: one pass over the logits, where autodiff of the same expression
    scatters the target's gradient into a zero `[..., V]` array and adds up the terms in more passes (a T5-small
    training step on CPU: 1.04x faster). Reverse mode only (a `custom_vjp`).
    """
    return _token_losses_and_residuals(logits_NxV, targets_N, label_smoothing)[0]


def _token_losses_and_residuals(logits_NxV, targets_N, label_smoothing):
    max_N = jnp.max(logits_NxV, axis=-1)
    shifted_NxV = logits_NxV - max_N[..., None]
    log_sum_N = jnp.log(jnp.sum(jnp.exp(shifted_NxV), axis=-1))
    nll_N = log_sum_N - jnp.take_along_axis(shifted_NxV, targets_N[..., None], axis=-1)[..., 0]
    if label_smoothing:
        mean_log_prob_N = jnp.mean(shifted_NxV - log_sum_N[..., None], axis=-1)
        nll_N = (1.0 - label_smoothing) * nll_N - label_smoothing * mean_log_prob_N
    return nll_N, (logits_NxV, targets_N, max_N + log_sum_N)


def _token_losses_backward(label_smoothing, residuals, g_N):
    logits_NxV, targets_N, log_z_N = residuals
    vocab = logits_NxV.shape[-1]
    target_NxV = jax.lax.broadcasted_iota(jnp.int32, logits_NxV.shape, logits_NxV.ndim - 1) == targets_N[..., None]
    probs_NxV = jnp.exp(logits_NxV - log_z_N[..., None])
    pulled_NxV = jnp.where(target_NxV, 1.0 - label_smoothing, 0.0) + label_smoothing / vocab
    return (g_N[..., None] * (probs_NxV - pulled_NxV)).astype(logits_NxV.dtype), None


token_losses.defvjp(_token_losses_and_residuals, _token_losses_backward)


def token_cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array, mask_BxT: jax.Array,
                        label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """Summed cross-entropy over real target tokens, and their count (pads contribute nothing).

    Label smoothing as transformers' trainer does it: `(1 - e) * nll + e * mean_v(-log p_v)`.
    """
    nll = token_losses(logits_BxTxV.astype(jnp.float32), targets_BxT, label_smoothing)
    mask = mask_BxT.astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask)


def chunked_token_cross_entropy(h_BxTxD: jax.Array, head: LMHead, targets_BxT: jax.Array, mask_BxT: jax.Array,
                                label_smoothing: float = 0.0, chunk_size: int | None = None
                                ) -> tuple[jax.Array, jax.Array]:
    """Summed cross-entropy over real target tokens and their count, from hidden states (see module doc).

    `h_BxTxD`: the final hidden states at the target positions (position t predicts `targets_BxT[:, t]`).
    `chunk_size`: tokens per chunk; by default as many as keep one chunk's logits near `CHUNK_LOGITS`
    elements (64 MiB in float32: 512 tokens at V=32k, 64 at V=256k).
    """
    if chunk_size is None:
        chunk_size = max(1, CHUNK_LOGITS // head.vocab_size)
    if chunk_size < 1:
        raise LossConfigError(f"chunk_size={chunk_size} must be a positive number of tokens; use e.g. 512, or None "
                              "for the default.")
    if not 0.0 <= label_smoothing < 1.0:
        raise LossConfigError(f"label_smoothing={label_smoothing} must be in [0, 1); use e.g. 0.0 or 0.1.")
    batch, length, width = h_BxTxD.shape
    tokens = batch * length
    chunk = min(chunk_size, tokens)
    num_chunks = -(-tokens // chunk)
    pad = num_chunks * chunk - tokens
    mask_N = mask_BxT.reshape(tokens).astype(jnp.float32)
    h_CxNxD = jnp.pad(h_BxTxD.reshape(tokens, width), ((0, pad), (0, 0))).reshape(num_chunks, chunk, width)
    targets_CxN = jnp.pad(targets_BxT.reshape(tokens), (0, pad)).reshape(num_chunks, chunk)
    mask_CxN = jnp.pad(mask_N, (0, pad)).reshape(num_chunks, chunk)

    @jax.checkpoint
    def chunk_loss(head: LMHead, h_NxD, targets_N, m_N):
        return jnp.sum(token_losses(head.logits(h_NxD), targets_N, label_smoothing) * m_N)

    def body(total, xs):
        return total + chunk_loss(head, *xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (h_CxNxD, targets_CxN, mask_CxN))
    return total, jnp.sum(mask_N)


def lm_head_for(config: Any, lm_params: Any) -> LMHead:
    """The LM head of one of our models (T5, BART, GPT-2, Llama family), from its config and params.

    Feed `chunked_token_cross_entropy` the model's `target_hidden_states` (the output of its final decoder
    stack at the target positions, after the final norm): `train_steps.batch_loss` does with `loss_chunk_tokens`.
    """
    kind = type(config).__module__.rsplit(".", 1)[-1]
    dtype = jnp.dtype(config.dtype)
    if kind == "t5":
        scale = config.d_model**-0.5 if config.scale_decoder_outputs else 1.0
        if config.tied_lm_head:
            return LMHead(lm_params["shared"]["embedding"], 0, None, scale, dtype)
        return LMHead(lm_params["lm_head"]["kernel"], 1, None, scale, dtype)
    if kind == "bart":
        return LMHead(lm_params["shared"]["embedding"], 0, lm_params["final_logits_bias"], 1.0, dtype)
    if kind == "gpt2":
        return LMHead(lm_params["wte"]["embedding"], 0, None, 1.0, dtype)
    if kind in ("llama", "phi3"):  # Phi-3: Llama's head
        if config.tie_word_embeddings:
            return LMHead(lm_params["embed_tokens"]["embedding"], 0, None, 1.0, dtype)
        return LMHead(lm_params["lm_head"]["kernel"], 1, None, 1.0, dtype)
    raise LossConfigError(f"no LM head known for a {type(config).__module__}.Config; add it to losses.lm_head_for.")
