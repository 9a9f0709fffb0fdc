"""A bank of J prefixes for one frozen LM, and batches whose rows use different prefixes.

`stack` turns T single prefixes (same placements and layer geometry, any lengths) into one `Prefix`
whose placements hold a `BankKV`: keys/values `[L, J, H, P, K]` with P the longest length. A shorter
prefix is right-aligned and its leading slots are masked, so every row sees exactly its own prefix:
for T5's relative positions the distances from its real slots to the tokens are unchanged, and for
learned position tables the tokens start after the row's own length (`attention.tokens_after_prefix`).
`for_rows` then says which prefix each row of a batch uses; attention gathers it per layer.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from prefix_jax.models.attention import KV, BankKV
from prefix_jax.models.prefix_contract import Prefix


class PrefixBankError(ValueError):
    """Prefixes that cannot share a bank, or a bad row index."""


def stack(prefixes: Sequence[Prefix]) -> Prefix:
    """T K/V prefixes -> one bank `Prefix` (rows all 0 until `for_rows`)."""
    if not prefixes:
        raise PrefixBankError("a prefix bank needs at least one prefix.")
    first = prefixes[0]
    for i, p in enumerate(prefixes):
        if p.prompt_embeds is not None:
            raise PrefixBankError(f"prefix {i} is an embedding-only prompt; a bank holds K/V prefixes only.")
        if set(p.kv) != set(first.kv) or p.infix != first.infix:
            raise PrefixBankError(f"prefix {i} has placements {sorted(p.kv)} (infix={p.infix}), prefix 0 has "
                                  f"{sorted(first.kv)} (infix={first.infix}); a bank needs the same for all.")
    kv = {}
    for placement in first.kv:
        parts = [p.kv[placement] for p in prefixes]
        shapes = {(k.key.shape[0], k.key.shape[1], k.key.shape[3]) for k in parts}
        if len(shapes) != 1:
            raise PrefixBankError(f"{placement} prefixes have different [layers, heads, head_dim]: {sorted(shapes)}; "
                                  "they were made for different LMs.")
        longest = max(k.key.shape[2] for k in parts)
        pad = lambda x: jnp.pad(jnp.asarray(x), ((0, 0), (0, 0), (longest - x.shape[2], 0), (0, 0)))
        key = jnp.stack([pad(k.key) for k in parts], axis=1)  # [L, J, H, P, K]
        value = jnp.stack([pad(k.value) for k in parts], axis=1)
        valid = jnp.stack([jnp.arange(longest) >= longest - k.key.shape[2] for k in parts])  # [J, P]
        layers = key.shape[0]
        kv[placement] = BankKV(key, value, jnp.broadcast_to(valid, (layers, *valid.shape)),
                               jnp.zeros((layers, 1), jnp.int32))
    return Prefix(kv=kv, infix=first.infix)


def from_stacked(prefixes_T: Prefix) -> Prefix:
    """T prefixes of one length, stacked on a leading axis (K/V `[T, L, H, P, K]`, e.g. from `jax.vmap`) -> a bank.

    Equal to `stack` of the T prefixes, without a per-prefix op in the program."""
    kv = {}
    for placement, parts in prefixes_T.kv.items():
        tasks, layers, _, length, _ = parts.key.shape
        kv[placement] = BankKV(jnp.moveaxis(parts.key, 0, 1), jnp.moveaxis(parts.value, 0, 1),
                               jnp.ones((layers, tasks, length), bool), jnp.zeros((layers, 1), jnp.int32))
    return Prefix(kv=kv, infix=prefixes_T.infix)


def size(bank: Prefix) -> int:
    """T, the number of prefixes in a bank."""
    return next(iter(bank.kv.values())).key.shape[1]


def for_rows(bank: Prefix, rows_B: jax.Array) -> Prefix:
    """The bank with row b of the batch using prefix `rows_B[b]`."""
    rows_B = jnp.asarray(rows_B, jnp.int32)
    kv = {p: b._replace(rows=jnp.broadcast_to(rows_B, (b.key.shape[0], rows_B.shape[0])))
          for p, b in bank.kv.items()}
    return bank.replace(kv=kv)


def repeat_rows(prefix: Prefix, times: int) -> Prefix:
    """Each row's prefix index repeated `times` times in a row (beam layout); plain prefixes unchanged."""
    if times == 1:
        return prefix
    kv = {p: (b._replace(rows=jnp.repeat(b.rows, times, axis=-1)) if isinstance(b, BankKV) else b)
          for p, b in prefix.kv.items()}
    return prefix.replace(kv=kv)


def is_bank(prefix: Prefix) -> bool:
    return any(isinstance(b, BankKV) for b in prefix.kv.values())


def single(bank: Prefix, index: int) -> Prefix:
    """Prefix `index` of a bank as a plain prefix (its real slots only)."""
    kv = {}
    for placement, b in jax.device_get(bank.kv).items():
        valid = b.slot_valid[0, index]
        start = int(valid.shape[0] - valid.sum())
        kv[placement] = KV(jnp.asarray(b.key[:, index, :, start:]), jnp.asarray(b.value[:, index, :, start:]))
    return Prefix(kv=kv, infix=bank.infix)
