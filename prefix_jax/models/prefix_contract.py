"""What a model and a prefix agree on: placement names, per-placement shapes, and the `Prefix` a model consumes."""

from __future__ import annotations

import dataclasses

import flax.struct
import jax

from prefix_jax.models.attention import KV

# Placement names. A decoder-only model has only DECODER (its self-attention).
ENCODER = "encoder"  # encoder self-attention
DECODER = "decoder"  # decoder self-attention
CROSS = "cross"  # decoder cross-attention over the encoder output
PLACEMENTS = (ENCODER, DECODER, CROSS)


@dataclasses.dataclass(frozen=True)
class StackGeometry:
    """One placement's prefix: keys and values of shape `[num_layers, num_heads, P, head_dim]`."""

    num_layers: int
    num_heads: int
    head_dim: int

    @property
    def kv_size(self) -> int:
        """Numbers per virtual token for all layers, keys and values: `2 * layers * heads * head_dim`."""
        return 2 * self.num_layers * self.num_heads * self.head_dim


@flax.struct.dataclass
class Prefix:
    """What a model consumes besides its params and the batch.

    kv: placement -> `KV` of `[layers, H, P, K]`; a placement not present gets no prefix.
    prompt_embeds: `[P, D]` virtual-token embeddings put in front of the (encoder) input, or None.
    infix: the DECODER K/V sit between source and target (`[x; INFIX; y]`): only target tokens
      attend to them, and target positions continue after them (decoder-only models).
    """

    kv: dict[str, KV] = flax.struct.field(default_factory=dict)
    prompt_embeds: jax.Array | None = None
    infix: bool = flax.struct.field(pytree_node=False, default=False)

    def length(self, placement: str) -> int:
        """P of a placement's K/V (0 when it has none)."""
        kv = self.kv.get(placement)
        return 0 if kv is None else kv.key.shape[-2]


NO_PREFIX = Prefix()


@dataclasses.dataclass(frozen=True)
class TextPositions:
    """Where text sits after a prefix in one attention stack, and how many positions prefix + text span.

    A token's position is the number of real tokens before it in its stack plus its side's offset:
    source_offset for source tokens, target_offset for target tokens (the same text in an
    encoder-decoder stack, so both are that stack's offset). An offset is 0, the prefix length or,
    for a prefix bank, each row's own prefix length `[B]`. needed: the positions prefix + text take
    (a bank's longest prefix), to compare with the model's `max_positions`.
    """

    source_offset: int | jax.Array
    target_offset: int | jax.Array
    needed: int


class DecoderOnlyPositions:
    """`text_positions` of a decoder-only LM (GPT-2, Llama): a mixin for a `Config` with `positions_after_prefix`.

    A K/V prefix moves the text after it with `positions_after_prefix`; an infix (`[x; INFIX; y]`) moves
    only the target; a prompt of virtual tokens always comes first (see `models/gpt2.py`'s docstring).
    """

    positions_after_prefix: bool

    def text_positions(self, stack: str, text_len: int, prefix_len: int = 0, *,
                       before_tokens: int | jax.Array | None = None, infix: bool = False,
                       prompt_len: int = 0) -> TextPositions:
        """Where source and target start after a prefix, and the positions prefix + text need.

        stack: DECODER (the only one). text_len: source + target tokens. prefix_len: the K/V prefix's slots
        (a bank's longest); before_tokens: the slots before each row's tokens (default prefix_len).
        prompt_len: virtual tokens in front that `text_len` does not count.
        """
        before = prefix_len if before_tokens is None else before_tokens
        moves = self.positions_after_prefix or infix
        source_offset = before if (self.positions_after_prefix and not infix) else 0
        target_offset = before if moves else 0
        taken = prefix_len if moves else 0
        return TextPositions(source_offset + prompt_len, target_offset + prompt_len, taken + prompt_len + text_len)
