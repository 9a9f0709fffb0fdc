"""The encoder-decoder shell T5 and BART share: encode, decode, teacher forcing, stack masks, cross-attention cache.

What differs between the two lives in their own modules: the blocks (pre-LN with RMS norm vs post-LN), the
stacks (T5's relative position bias and final norm; BART's learned positions and `layernorm_embedding`),
`embed` (BART's `scale_embedding`) and `head` (T5's output scale and untied head; BART's `final_logits_bias`).

A model subclasses `EncoderDecoder` (declaring `config`, `stack_type`, `embedding_std`; `embed`, `head`),
its stacks subclass `Stack` (`block`, `embed_positions`, `output`) and its layers `Block`. The shell builds
`shared`, `encoder` and `decoder` (names that are part of the param tree); the model's own `setup` adds its
head's params. Positions come from `Config.text_positions` (the one owner of where text sits after a
prefix): a stack with absolute positions reads the queries' positions, one with relative positions both.
Packed training rows (`data.pack`, several examples per encoder and decoder row) take the same stacks with
per-segment positions and masks (`packed_target_hidden_states`, `packed_stack_masks`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from prefix_jax.batch import Batch
from prefix_jax.models import common, masks
from prefix_jax.models.attention import MultiHeadAttention, tokens_after_prefix
from prefix_jax.models.prefix_contract import CROSS, DECODER, ENCODER, KV, NO_PREFIX, BankKV, Prefix, TextPositions



def stack_masks(key_valid_BxC: jax.Array, num_queries: int, prefix: KV | None, is_decoder: bool,
                query_offset: jax.Array | int = 0, memory_valid_BxS: jax.Array | None = None,
                cross_prefix: KV | None = None) -> tuple[jax.Array, jax.Array | None]:
    """Self-attention mask (causal in the decoder) and, in the decoder, the cross-attention mask `[B, 1, Q, M]`."""
    self_mask = masks.attention_mask(key_valid_BxC, num_queries, _length(prefix), causal=is_decoder,
                                     query_offset=query_offset)
    if not is_decoder:
        return self_mask, None
    return self_mask, masks.attention_mask(memory_valid_BxS, num_queries, _length(cross_prefix))


def packed_stack_masks(segment_ids_BxQ: jax.Array, prefix: KV | None, is_decoder: bool,
                       memory_segment_ids_BxS: jax.Array | None = None,
                       cross_prefix: KV | None = None) -> tuple[jax.Array, jax.Array | None]:
    """`stack_masks` of packed rows (`data.packed_encoder_decoder_batch`): each token sees every prefix and only
    its own example's tokens (in the decoder, the earlier ones of its target and all of its source)."""
    self_mask = masks.packed_attention_mask(segment_ids_BxQ, _length(prefix), causal=is_decoder)
    if not is_decoder:
        return self_mask, None
    return self_mask, masks.packed_attention_mask(segment_ids_BxQ, _length(cross_prefix), causal=False,
                                                  key_segment_ids_BxC=memory_segment_ids_BxS)


def _length(prefix: KV | None) -> int:
    return 0 if prefix is None else prefix.key.shape[-2]


def attend_to_encoder(cross: MultiHeadAttention, x_BxQxD: jax.Array, memory_BxSxD: jax.Array,
                      cross_mask: jax.Array, prefix: KV | None, cache: dict | None, new_cache: dict | None,
                      deterministic: bool) -> tuple[jax.Array, dict | None]:
    """Cross-attention over the encoder output, and `new_cache` with the encoder's K/V when decoding.

    When decoding (`cache` given), the encoder output is projected to K/V on the first call only and
    read from `cache["cross"]` afterwards.
    """
    if cache is None:
        h, _ = cross(x_BxQxD, memory_BxSxD, cross_mask, None, prefix, None, deterministic)
        return h, new_cache
    memory = cache["cross"] if "cross" in cache else cross.project_kv(memory_BxSxD)
    h, _ = cross(x_BxQxD, memory, cross_mask, None, prefix, None, deterministic)
    return h, {**new_cache, "cross": memory}


class Block(nn.Module):
    """One encoder or decoder layer, scanned over layers by `Stack`.

    `__call__(x_BxQxD, prefix_self, prefix_cross, cache, self_mask, self_bias, memory, cross_mask)` returns
    `(x_BxQxD, cache)`; the prefixes and the cache are this layer's slices, the rest is shared by all layers.
    """

    config: Any
    is_decoder: bool
    deterministic: bool


class Stack(nn.Module):
    """An encoder or decoder: embedded tokens in, final hidden states (and the decoding cache) out.

    A subclass sets `block` (a `Block`, scanned over the stack's layers as `layers`) and implements
    `embed_positions` (positions into the input, or a position bias for every layer) and `output`.
    """

    config: Any
    is_decoder: bool

    block: ClassVar[type[Block]]

    @property
    def num_layers(self) -> int:
        return self.config.prefix_geometry()[DECODER if self.is_decoder else ENCODER].num_layers

    def embed_positions(self, x_BxQxD: jax.Array, query_positions_BxQ: jax.Array, key_positions_BxC: jax.Array,
                        prefix_len: int, deterministic: bool) -> tuple[jax.Array, jax.Array | None]:
        """The layers' input and the self-attention bias `[B, H, Q, P + C]` every layer adds (or None)."""
        raise NotImplementedError

    def output(self, x_BxQxD: jax.Array, deterministic: bool) -> jax.Array:
        """The last layer's output -> the stack's output."""
        return x_BxQxD

    @nn.compact
    def __call__(self, x_BxQxD: jax.Array, query_positions_BxQ: jax.Array, key_positions_BxC: jax.Array,
                 self_mask: jax.Array, prefix: KV | None, deterministic: bool, memory: jax.Array | None = None,
                 cross_mask: jax.Array | None = None, cross_prefix: KV | None = None,
                 cache: dict | None = None) -> tuple[jax.Array, dict | None]:
        """Query positions count real tokens from the stack's text offset; key positions those of the key slots.
        The masks (`stack_masks` or `packed_stack_masks`) cover each attention's prefix slots and its keys."""
        x, bias = self.embed_positions(x_BxQxD, query_positions_BxQ, key_positions_BxC, _length(prefix),
                                       deterministic)
        broadcast = nn.broadcast
        layers = common.stack_layers(self.block, self.num_layers, self.config.remat,
                                     in_axes=(0, 0, 0, broadcast, broadcast, broadcast, broadcast))
        x, cache = layers(self.config, self.is_decoder, deterministic, name="layers")(
            x, prefix, cross_prefix, cache, self_mask, bias, memory, cross_mask)
        return self.output(x, deterministic), cache


class EncoderDecoder(common.DecoderCache, nn.Module):
    """`logits = Model(config).apply({'params': lm_params}, batch, prefix)` for an encoder-decoder LM.

    `batch`: `source_ids`, `source_mask` `[B, S]`, `target_ids`, `target_mask` `[B, T]`; or packed rows
    (`source_segment_ids` for `source_mask`, and `target_segment_ids`: `packed_target_hidden_states`).
    `prefix`: a `Prefix` (K/V for any of ENCODER, DECODER, CROSS; or `prompt_embeds`).
    A subclass sets `stack_type` and `embedding_std` and may add params (a head) in its own `setup`.
    """

    stack_type: ClassVar[type[Stack]]
    embedding_std: ClassVar[float]  # HF's init of the token embedding: only for random tiny checkpoints

    def setup(self) -> None:
        cfg = self.config
        self.shared = common.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                               embedding_init=nn.initializers.normal(self.embedding_std), name="shared")
        self.encoder = self.stack_type(cfg, is_decoder=False, name="encoder")
        self.decoder = self.stack_type(cfg, is_decoder=True, name="decoder")

    def embed(self, ids: jax.Array) -> jax.Array:
        """Token embeddings `[..., D]` as the stacks take them."""
        raise NotImplementedError

    def head(self, h_BxQxD: jax.Array) -> jax.Array:
        """Float32 logits `[B, Q, V]` from the decoder's final hidden states."""
        raise NotImplementedError

    def _text_positions(self, prefix: Prefix, stack: str, text_len: int) -> TextPositions:
        """`Config.text_positions` for a stack's self-attention prefix; fails past the position table."""
        cfg = self.config
        kv = prefix.kv.get(stack)  # the prompt, if any, is already counted in text_len
        where = cfg.text_positions(stack, text_len, prefix.length(stack), before_tokens=tokens_after_prefix(kv))
        limit = cfg.max_positions
        if limit is not None and where.needed > limit:
            raise ValueError(f"the {cfg.architecture.upper()} {stack} needs {where.needed} positions (prefix + text) "
                             f"but has {limit}: shorten the prefix or the text.")
        return where

    def encode(self, source_ids: jax.Array, source_mask: jax.Array, prefix: Prefix = NO_PREFIX,
               deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
        """Encoder output `[B, S', D]` and its validity mask (`S' = S`, or `P + S` with `prompt_embeds`)."""
        x, source_mask = common.prepend_prompt(self.embed(source_ids), source_mask, prefix.prompt_embeds)
        positions = masks.token_positions(source_mask, self._text_positions(prefix, ENCODER, x.shape[1]).source_offset)
        kv = prefix.kv.get(ENCODER)
        self_mask, _ = stack_masks(source_mask, x.shape[1], kv, is_decoder=False)
        encoded, _ = self.encoder(x, positions, positions, self_mask, kv, deterministic)
        return encoded, source_mask

    def decoder_hidden_states(self, encoded: jax.Array, encoded_mask: jax.Array, decoder_ids: jax.Array,
                              decoder_mask: jax.Array, prefix: Prefix = NO_PREFIX, deterministic: bool = True,
                              cache: dict | None = None) -> tuple[jax.Array, dict | None]:
        """The decoder's final hidden states `[B, Q, D]` (before the head) and the updated cache.

        With `cache` (decoding), `decoder_ids` has no padding and `decoder_mask` covers the cache slots.
        """
        x = self.embed(decoder_ids)
        shift = jnp.asarray(self._text_positions(prefix, DECODER, decoder_mask.shape[1]).target_offset)
        if cache is None:
            query_positions = key_positions = masks.token_positions(decoder_mask, shift)
            offset = 0
        else:  # decoding: slot == position (plus the shift)
            offset = cache["self"]["index"][0]
            batch, num_queries = decoder_ids.shape
            shift_Bx1 = shift.reshape(-1, 1)  # one shift, or one per row (a bank)
            query_positions = jnp.broadcast_to(shift_Bx1 + offset + jnp.arange(num_queries, dtype=jnp.int32)[None],
                                               (batch, num_queries))
            key_positions = jnp.broadcast_to(shift_Bx1 + jnp.arange(decoder_mask.shape[1], dtype=jnp.int32)[None],
                                             decoder_mask.shape)
        kv, cross_kv = prefix.kv.get(DECODER), prefix.kv.get(CROSS)
        self_mask, cross_mask = stack_masks(decoder_mask, decoder_ids.shape[1], kv, True, offset, encoded_mask,
                                            cross_kv)
        return self.decoder(x, query_positions, key_positions, self_mask, kv, deterministic, encoded, cross_mask,
                            cross_kv, cache)

    def decode(self, encoded: jax.Array, encoded_mask: jax.Array, decoder_ids: jax.Array, decoder_mask: jax.Array,
               prefix: Prefix = NO_PREFIX, deterministic: bool = True,
               cache: dict | None = None) -> tuple[jax.Array, dict | None]:
        """Logits `[B, Q, V]` for decoder inputs, and the updated cache (see `decoder_hidden_states`)."""
        h, cache = self.decoder_hidden_states(encoded, encoded_mask, decoder_ids, decoder_mask, prefix, deterministic,
                                              cache)
        return self.head(h), cache

    def target_hidden_states(self, batch: Batch, prefix: Prefix = NO_PREFIX, deterministic: bool = True) -> jax.Array:
        """Teacher-forced final decoder hidden states `[B, T, D]`: position t predicts `target_ids[:, t]`."""
        if "source_segment_ids" in batch:
            return self.packed_target_hidden_states(batch, prefix, deterministic)
        encoded, encoded_mask = self.encode(batch["source_ids"], batch["source_mask"], prefix, deterministic)
        decoder_ids = masks.shift_right(batch["target_ids"], self.config.decoder_start_token_id)
        decoder_mask = masks.shift_right(batch["target_mask"], 1)
        h, _ = self.decoder_hidden_states(encoded, encoded_mask, decoder_ids, decoder_mask, prefix, deterministic)
        return h

    def packed_target_hidden_states(self, batch: Batch, prefix: Prefix = NO_PREFIX,
                                    deterministic: bool = True) -> jax.Array:
        """`target_hidden_states` of packed rows (`data.packed_encoder_decoder_batch`): several examples' sources
        one after another in `source_ids` and their targets in `target_ids`, told apart by `source_segment_ids`
        and `target_segment_ids` (1, 2, ...; 0: padding). Each example sees the prefixes and its own tokens only
        (its target attends to its own source), at the positions it has when alone."""
        if prefix.prompt_embeds is not None or any(isinstance(kv, BankKV) for kv in prefix.kv.values()):
            raise ValueError("data.pack takes one K/V prefix (method prefix / prefix_direct, one task); an "
                             "embedding-only prompt or a multi-task bank needs data.pack=False.")
        source_segments, target_segments = batch["source_segment_ids"], batch["target_segment_ids"]
        kv = prefix.kv.get(ENCODER)
        start = self._text_positions(prefix, ENCODER, source_segments.shape[1]).source_offset
        positions = masks.segment_positions(source_segments, start)
        self_mask, _ = packed_stack_masks(source_segments, kv, is_decoder=False)
        encoded, _ = self.encoder(self.embed(batch["source_ids"]), positions, positions, self_mask, kv, deterministic)

        kv, cross_kv = prefix.kv.get(DECODER), prefix.kv.get(CROSS)
        start = self._text_positions(prefix, DECODER, target_segments.shape[1]).target_offset
        positions = masks.segment_positions(target_segments, start)
        self_mask, cross_mask = packed_stack_masks(target_segments, kv, True, source_segments, cross_kv)
        decoder_ids = masks.segment_shift_right(batch["target_ids"], target_segments,
                                                self.config.decoder_start_token_id)
        h, _ = self.decoder(self.embed(decoder_ids), positions, positions, self_mask, kv, deterministic, encoded,
                            cross_mask, cross_kv)
        return h

    def __call__(self, batch: Batch, prefix: Prefix = NO_PREFIX, deterministic: bool = True) -> jax.Array:
        """Teacher-forced logits `[B, T, V]`: position t predicts `target_ids[:, t]`."""
        return self.head(self.target_hidden_states(batch, prefix, deterministic))
