"""The decoder-only shell GPT-2 and Llama share: teacher forcing over `[source; target]`, decoding with a cache.

What differs lives in their own modules: the stack (learned positions vs RoPE), `embed`, `head` (tied or
not) and which lengths fit (`check_lengths`: GPT-2's position table, a sliding window). Where text sits
after a prefix (a bank's rows after their own prefix) is asked of `Config.text_positions` (see
`models/gpt2.py`'s docstring for the placements).

A model subclasses `DecoderOnly`, declares `config`, builds its embedding and stack in `setup`, and
implements `embed`, `head` and `stack` (the stack module: `(x_BxQxD, positions_BxQ, mask_BxHxQxM, prefix,
cache, deterministic) -> (final hidden states, cache)`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from prefix_jax.batch import Batch
from prefix_jax.models import common, masks
from prefix_jax.models.attention import tokens_after_prefix
from prefix_jax.models.prefix_contract import DECODER, NO_PREFIX, BankKV, Prefix, TextPositions



class DecoderOnly(common.DecoderCache, nn.Module):
    """`logits = Model(config).apply({'params': lm_params}, batch, prefix)` for a decoder-only LM.

    `batch`: `source_ids`, `source_mask` `[B, S]`, `target_ids`, `target_mask` `[B, T]` (targets
    right-padded). `prefix`: a `Prefix` (DECODER K/V, possibly as an infix; or `prompt_embeds`).
    """

    def embed(self, ids: jax.Array) -> jax.Array:
        """Token embeddings `[..., D]`."""
        raise NotImplementedError

    def head(self, h_BxQxD: jax.Array) -> jax.Array:
        """Float32 logits `[B, Q, V]` from final hidden states."""
        raise NotImplementedError

    def stack(self) -> nn.Module:
        """The module that turns input embeddings into final hidden states."""
        raise NotImplementedError

    def check_lengths(self, where: TextPositions | None, prefix_len: int, num_keys: int) -> None:
        """Raises when a prefix and `num_keys` token slots do not fit the model (`where`: teacher forcing only)."""

    def hidden_states(self, batch: Batch, prefix: Prefix = NO_PREFIX, deterministic=True) -> tuple[jax.Array, int]:
        """Final hidden states `[B, S' + T, D]` of the whole sequence and `S'`, where the target side starts.

        `S' = S`, or `P + S` with `prompt_embeds` (their hidden states come first).
        """
        cfg = self.config
        if "segment_ids" in batch:
            return self.packed_hidden_states(batch, prefix, deterministic), 0
        source_ids, source_mask = batch["source_ids"], batch["source_mask"]
        ids = jnp.concatenate([source_ids, masks.shift_right(batch["target_ids"], cfg.separator_token_id)], axis=1)
        valid_BxQ = jnp.concatenate([source_mask, masks.shift_right(batch["target_mask"], 1)], axis=1)
        x_BxQxD, valid_BxQ = common.prepend_prompt(self.embed(ids), valid_BxQ, prefix.prompt_embeds)
        source_len = source_ids.shape[1] + (0 if prefix.prompt_embeds is None else prefix.prompt_embeds.shape[0])

        kv, prefix_len = prefix.kv.get(DECODER), prefix.length(DECODER)
        length = valid_BxQ.shape[1]  # the prompt, if any, is counted here
        where = cfg.text_positions(DECODER, length, prefix_len, before_tokens=tokens_after_prefix(kv),
                                   infix=prefix.infix)
        self.check_lengths(where, prefix_len, length)
        positions = masks.token_positions(valid_BxQ, where.source_offset)
        visible_BxQ = None
        if prefix.infix:
            target_side_Q = jnp.arange(length) >= source_len
            positions = positions + jnp.asarray(where.target_offset).reshape(-1, 1) * target_side_Q[None]
            visible_BxQ = jnp.broadcast_to(target_side_Q[None], valid_BxQ.shape)
        mask = masks.attention_mask(valid_BxQ, length, prefix_len, causal=True, prefix_visible_BxQ=visible_BxQ)
        h, _ = self.stack()(x_BxQxD, positions, mask, kv, None, deterministic)
        return h, source_len

    def packed_hidden_states(self, batch: Batch, prefix: Prefix = NO_PREFIX, deterministic=True) -> jax.Array:
        """Final hidden states `[B, L, D]` of packed rows (`data.packed_batch`): `ids` holds several examples'
        `[x; SEP; y[:-1]]` one after another, `segment_ids` says which example each slot belongs to (0: padding).

        Each example sees the prefix and its own tokens only, at the positions it has when alone. With
        `window_segment_ids` (the segment ids of each query block's key window, `masks.BlockMask`), attention runs
        in query blocks over windows of keys instead of over the whole row.
        """
        if prefix.infix or prefix.prompt_embeds is not None or isinstance(prefix.kv.get(DECODER), BankKV):
            raise ValueError("data.pack takes one K/V prefix (method prefix / prefix_direct, one task); an infix, "
                             "an embedding-only prompt or a multi-task bank needs data.pack=False.")
        segment_ids = batch["segment_ids"]
        kv, prefix_len = prefix.kv.get(DECODER), prefix.length(DECODER)
        where = self.config.text_positions(DECODER, segment_ids.shape[1], prefix_len)
        self.check_lengths(where, prefix_len, segment_ids.shape[1])
        positions = masks.segment_positions(segment_ids, where.source_offset)
        if "window_segment_ids" in batch:  # attention in query blocks, each over a window of keys
            mask = masks.packed_block_mask(segment_ids, batch["window_segment_ids"], prefix_len)
        else:
            mask = masks.packed_attention_mask(segment_ids, prefix_len)
        h, _ = self.stack()(self.embed(batch["ids"]), positions, mask, kv, None, deterministic)
        return h

    def target_hidden_states(self, batch: Batch, prefix: Prefix = NO_PREFIX, deterministic=True) -> jax.Array:
        """Final hidden states `[B, T, D]` of the target side: position t predicts `target_ids[:, t]` (packed
        rows: the `K` slots `target_slots` names, so the LM head and the loss read those only)."""
        h, source_len = self.hidden_states(batch, prefix, deterministic)
        if "target_slots" in batch:
            return jnp.take_along_axis(h, batch["target_slots"][..., None], axis=1)
        return h[:, source_len:]

    def __call__(self, batch: Batch, prefix: Prefix = NO_PREFIX, deterministic=True) -> jax.Array:
        """Teacher-forced logits `[B, T, V]`: position t predicts `target_ids[:, t]`."""
        return self.head(self.target_hidden_states(batch, prefix, deterministic))

    def decode(self, ids_BxQ: jax.Array, positions_BxQ: jax.Array, key_valid_BxC: jax.Array,
               prefix: Prefix, cache: dict, deterministic=True, prefix_visible=True) -> tuple[jax.Array, dict]:
        """Logits `[B, Q, V]` for `Q` new tokens written at the cache index; query i sits in slot index + i.

        The caller gives positions (prefix shift included) and which cache slots hold real tokens.
        `prefix_visible=False` hides the prefix from these queries (the source of an infix model).
        """
        if prefix.prompt_embeds is not None:
            raise ValueError(f"{self.config.architecture} decode does not take prompt_embeds (embedding-only "
                             "prompts); use __call__ / hidden_states, or a K/V prefix.")
        batch_size, num_queries = ids_BxQ.shape
        prefix_len = prefix.length(DECODER)
        self.check_lengths(None, prefix_len, key_valid_BxC.shape[1])
        visible = None if prefix_visible else jnp.zeros((batch_size, num_queries), bool)
        mask = masks.attention_mask(key_valid_BxC, num_queries, prefix_len, causal=True,
                                    query_offset=cache["self"]["index"][0], prefix_visible_BxQ=visible)
        h, self_cache = self.stack()(self.embed(ids_BxQ), positions_BxQ, mask, prefix.kv.get(DECODER), cache["self"],
                                     deterministic)
        return self.head(h), {"self": self_cache}
