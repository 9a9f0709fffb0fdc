"""A bank of J prefixes for one frozen LM, and batches whose rows use different prefixes.

`stack` turns T single prefixes (same placements and layer geometry, any lengths) into one `Prefix`
whose placements hold a `BankKV`: keys/values `[L, J, H, P, K]` with P the longest length. A shorter
prefix is right-aligned and its leading slots are masked, so every row sees exactly its own prefix:
for T5's relative positions the distances from its real slots to the tokens are unchanged, and for
learned position tables the tokens start after the row's own length (`attention.tokens_after_prefix`).
`for_rows` then says which prefix each row of a batch uses (by index, or by name for a bank stacked from a
mapping); attention gathers it per layer.

Row indices are checked (in range, or a known name) when `for_rows` gets concrete values. Inside `jax.jit` they
are traced and cannot be: JAX's gather then clamps an index past the end to the last prefix and wraps a negative
one, silently. Build the rows outside the jitted function (as `generate.make_generate_fn` callers and
`evaluation` do) or check them there.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from prefix_jax.models.prefix_contract import KV, BankKV, Prefix


class PrefixBankError(ValueError):
    """Prefixes that cannot share a bank, or a bad row index."""


def stack(prefixes: Sequence[Prefix] | Mapping[str, Prefix]) -> Prefix:
    """T K/V prefixes -> one bank `Prefix` (rows all 0 until `for_rows`).

    Given a mapping `{name: prefix}`, the bank carries the names (`Prefix.names`, in the mapping's order) and
    `for_rows` takes them. Prefixes trained on different LMs (`Prefix.trained_on`) are refused."""
    names = tuple(prefixes) if isinstance(prefixes, Mapping) else ()
    prefixes = list(prefixes.values()) if isinstance(prefixes, Mapping) else list(prefixes)
    if not prefixes:
        raise PrefixBankError("a prefix bank needs at least one prefix.")
    first = prefixes[0]
    label = lambda i: repr(names[i]) if names else str(i)
    trained_on = {p.trained_on for p in prefixes if p.trained_on is not None}
    if len({(t.lm_fingerprint, t.architecture) for t in trained_on}) > 1:
        which = {label(i): p.trained_on.base_model for i, p in enumerate(prefixes) if p.trained_on is not None}
        raise PrefixBankError(f"the prefixes were trained on different LMs ({which}); a bank holds prefixes of one LM.")
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
    common = next((p.trained_on for p in prefixes if p.trained_on is not None), None)  # one LM, checked above
    return Prefix(kv=kv, infix=first.infix, trained_on=common, names=names)


def from_stacked(prefixes_T: Prefix, names: tuple[str, ...] = ()) -> Prefix:
    """T prefixes of one length, stacked on a leading axis (K/V `[T, L, H, P, K]`, e.g. from `jax.vmap`) -> a bank
    (carrying `names`, as `stack` of a mapping does).

    Equal to `stack` of the T prefixes, without a per-prefix op in the program."""
    kv = {}
    for placement, parts in prefixes_T.kv.items():
        tasks, layers, _, length, _ = parts.key.shape
        kv[placement] = BankKV(jnp.moveaxis(parts.key, 0, 1), jnp.moveaxis(parts.value, 0, 1),
                               jnp.ones((layers, tasks, length), bool), jnp.zeros((layers, 1), jnp.int32))
    return Prefix(kv=kv, infix=prefixes_T.infix, names=names)


def size(bank: Prefix) -> int:
    """T, the number of prefixes in a bank."""
    return next(iter(bank.kv.values())).key.shape[1]


def row_indices(bank: Prefix, rows: Sequence[int | str] | np.ndarray) -> np.ndarray:
    """Concrete rows -> checked prefix indices `[B]`: each an index in [0, T) or a name the bank carries."""
    values = list(np.asarray(rows).reshape(-1)) if not isinstance(rows, (list, tuple)) else list(rows)
    count = size(bank)
    out = []
    for b, value in enumerate(values):
        if isinstance(value, (str, np.str_)):
            if value not in bank.names:
                known = (f"the bank's names are {list(bank.names)}" if bank.names else
                         "this bank has no names: stack a mapping {name: prefix} to use them")
                raise PrefixBankError(f"row {b}: no prefix named {str(value)!r}; {known}.")
            out.append(bank.names.index(value))
            continue
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise PrefixBankError(f"row {b}: {value!r} is not a prefix index (an int in [0, {count})) or name.")
        if not 0 <= int(value) < count:
            raise PrefixBankError(f"row {b}: prefix index {int(value)} is out of range; the bank holds {count} "
                                  f"prefixes (0..{count - 1}).")
        out.append(int(value))
    return np.asarray(out, np.int32)


def for_rows(bank: Prefix, rows_B: jax.Array | Sequence[int | str]) -> Prefix:
    """The bank with row b of the batch using prefix `rows_B[b]`: an index in [0, T) or one of `bank.names`.

    Concrete rows are checked (`PrefixBankError` for an index out of range or an unknown name); traced rows
    (inside `jax.jit`) cannot be, and JAX clamps/wraps a bad index (see the module docstring)."""
    if not is_bank(bank):
        raise PrefixBankError("for_rows needs a bank (prefix_bank.stack); this is a single prefix.")
    if not isinstance(rows_B, jax.core.Tracer):
        rows_B = row_indices(bank, rows_B)
    rows_B = jnp.asarray(rows_B, jnp.int32)
    kv = {p: b._replace(rows=jnp.broadcast_to(rows_B, (b.key.shape[0], rows_B.shape[0])))
          for p, b in bank.kv.items()}
    return bank.replace(kv=kv)


def for_batch(prefix: Prefix, task_ids_B: jax.Array | Sequence[int | str] | None) -> Prefix:
    """The K/V each row of a batch uses: a single prefix as it is (every row uses it), a bank gathered per row by
    task id (`for_rows`). The one place a caller asks which prefix a row gets."""
    return for_rows(prefix, task_ids_B) if is_bank(prefix) else prefix


def repeat_rows(prefix: Prefix, times: int) -> Prefix:
    """Each row's prefix index repeated `times` times in a row (beam layout); plain prefixes unchanged."""
    if times == 1:
        return prefix
    kv = {p: (b._replace(rows=jnp.repeat(b.rows, times, axis=-1)) if isinstance(b, BankKV) else b)
          for p, b in prefix.kv.items()}
    return prefix.replace(kv=kv)


def is_bank(prefix: Prefix) -> bool:
    """Whether `prefix` is a bank (`stack`) rather than one prefix."""
    return any(isinstance(b, BankKV) for b in prefix.kv.values())


def single(bank: Prefix, index: int) -> Prefix:
    """Prefix `index` of a bank as a plain prefix (its real slots only)."""
    index = int(row_indices(bank, [index])[0])
    kv = {}
    for placement, b in jax.device_get(bank.kv).items():
        valid = b.slot_valid[0, index]
        start = int(valid.shape[0] - valid.sum())
        kv[placement] = KV(jnp.asarray(b.key[:, index, :, start:]), jnp.asarray(b.value[:, index, :, start:]))
    return Prefix(kv=kv, infix=bank.infix, trained_on=bank.trained_on)
