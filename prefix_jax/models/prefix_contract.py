"""What a model and a prefix agree on: placement names, the K/V a prefix hands attention (`KV`, `BankKV`),
per-placement shapes, and the `Prefix` a model consumes."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax.struct
import jax

# Placement names. A decoder-only model has only DECODER (its self-attention).
ENCODER = "encoder"  # encoder self-attention
DECODER = "decoder"  # decoder self-attention
CROSS = "cross"  # decoder cross-attention over the encoder output
PLACEMENTS = (ENCODER, DECODER, CROSS)


class KV(NamedTuple):
    """Keys and values of a prefix: `[..., H, P, K]` each (a leading layer axis when stacked)."""

    key: jax.Array
    value: jax.Array


class BankKV(NamedTuple):
    """J prefixes in one array and which one each row uses (see `prefix_jax.prefix_bank`;
    `attention.attend` gathers each row's prefix).

    key/value `[..., J, H, P, K]`: prefixes shorter than the longest are right-aligned, their leading
    slots empty; slot_valid `[..., J, P]` marks the real slots; rows `[..., B]` is each row's prefix index.
    (A leading layer axis on all four when stacked, so scanning over layers slices them together.)
    """

    key: jax.Array
    value: jax.Array
    slot_valid: jax.Array
    rows: jax.Array


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


@dataclasses.dataclass(frozen=True)
class TrainedOn:
    """The LM a prefix was trained on, as its export records it (None: not recorded, not checked).

    base_model: the name or path it was loaded from (for messages: a local copy of a Hub model has another name
    and the same weights); lm_fingerprint: `fingerprint.lm_fingerprint` of its weights; architecture: its
    `model_type`. `fingerprint.check_fits` compares them with the LM a prefix is given to.
    """

    base_model: str | None = None
    lm_fingerprint: str | None = None
    architecture: str | None = None


@flax.struct.dataclass
class Prefix:
    """What a model consumes besides its params and the batch.

    kv: placement -> `KV` of `[layers, H, P, K]`; a placement not present gets no prefix.
    prompt_embeds: `[P, D]` virtual-token embeddings put in front of the (encoder) input, or None.
    infix: the DECODER K/V sit between source and target (`[x; INFIX; y]`): only target tokens
      attend to them, and target positions continue after them (decoder-only models).
    trained_on: the LM it was trained on (`prefix.load_export` sets it; `make_generate_fn` then refuses another LM);
      None for a prefix built in memory (only its shapes are checked).
    names: a prefix bank's task names, in bank order (`prefix_bank.stack` given a mapping), so that
      `prefix_bank.for_rows` takes names; () otherwise.
    """

    kv: dict[str, KV] = flax.struct.field(default_factory=dict)
    prompt_embeds: jax.Array | None = None
    infix: bool = flax.struct.field(pytree_node=False, default=False)
    trained_on: TrainedOn | None = flax.struct.field(pytree_node=False, default=None)
    names: tuple[str, ...] = flax.struct.field(pytree_node=False, default=())

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
