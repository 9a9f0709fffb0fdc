"""Which LM a prefix belongs to: a fingerprint of the frozen LM's weights, and the check where a prefix meets an LM.

A prefix is a set of keys and values for one LM's layers: another LM of the same shapes (T5-base and GPT-2 small
both have 12 layers x 12 heads x 64) would run it and decode nonsense. An export records the LM it was trained on
(`base_model`, `architecture`, `lm_fingerprint`); `prefix.load_export` puts them on the `Prefix` (`TrainedOn`),
and `check_fits` (called by `prefix.load_export(..., lm=)` and by every `generate.make_generate_fn` call) refuses
a prefix whose shapes, architecture or fingerprint do not match the LM it is given, naming both.
"""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import numpy as np

from prefix_jax.models.prefix_contract import BankKV, Prefix, TrainedOn


class PrefixMismatchError(ValueError):
    """A prefix given to an LM it was not made for (other weights, architecture or shapes)."""


def lm_fingerprint(lm_params: Any) -> str:
    """Identifies the frozen LM by its weights, not its path: every leaf's path, shape, dtype and a corner of it.

    The same checkpoint read from a Hub id or a local copy gives the same fingerprint; two fine-tunes of one
    architecture do not. Works on host arrays and on an LM sharded over devices and processes (every process
    must call it: the corners are gathered by one small jitted program).
    """
    corner = lambda x: x[tuple(slice(0, 2) for _ in x.shape)]
    leaves = jax.tree.leaves(lm_params)
    meshes = {x.sharding.mesh for x in leaves if isinstance(x, jax.Array) and hasattr(x.sharding, "mesh")}
    if meshes:
        replicated = jax.sharding.NamedSharding(next(iter(meshes)), jax.sharding.PartitionSpec())
        corners = jax.jit(lambda t: jax.tree.map(corner, t), out_shardings=replicated)(lm_params)
        corners = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), corners)
    elif any(isinstance(x, jax.Array) for x in leaves):
        corners = jax.device_get(jax.jit(lambda t: jax.tree.map(corner, t))(lm_params))  # one dispatch, not one a leaf
    else:
        corners = jax.tree.map(lambda x: np.asarray(corner(x)), lm_params)
    h = hashlib.sha256()
    for (path, leaf), (_, part) in zip(jax.tree_util.tree_flatten_with_path(lm_params)[0],
                                       jax.tree_util.tree_flatten_with_path(corners)[0]):
        h.update(f"{jax.tree_util.keystr(path)}|{tuple(leaf.shape)}|{leaf.dtype}|".encode())
        h.update(np.asarray(part, np.float32).tobytes())
    return h.hexdigest()[:32]


def trained_on(meta: dict) -> TrainedOn:
    """The `TrainedOn` an export's (or checkpoint's) metadata records; fields it lacks are None (not checked)."""
    return TrainedOn(base_model=meta.get("base_model"), lm_fingerprint=meta.get("lm_fingerprint"),
                     architecture=meta.get("architecture"))


def _describe(who: TrainedOn) -> str:
    parts = [p for p in (who.architecture, who.lm_fingerprint and f"LM fingerprint {who.lm_fingerprint[:12]}") if p]
    return f"{who.base_model!r}" + (f" ({', '.join(parts)})" if parts else "")


def check_shapes(prefix: Prefix, config: Any, lm_name: str = "the LM") -> None:
    """Each placement of `prefix` exists in the model and has its `[layers, heads, P, head_dim]` (a bank: `[layers,
    J, heads, P, head_dim]`), and a prompt has its width; otherwise a `PrefixMismatchError` naming both shapes."""
    geometry = config.prefix_geometry()
    for placement, kv in prefix.kv.items():
        if placement not in geometry:
            raise PrefixMismatchError(f"the prefix has a {placement!r} placement, which {lm_name} "
                                      f"({config.architecture}) does not have (it has {sorted(geometry)}); it was "
                                      "made for another LM.")
        g = geometry[placement]
        shape = tuple(kv.key.shape)
        layers, heads, head_dim = (shape[0], shape[2], shape[4]) if isinstance(kv, BankKV) else (
            shape[0], shape[-3], shape[-1])
        if len(shape) != (5 if isinstance(kv, BankKV) else 4) or (layers, heads, head_dim) != (
                g.num_layers, g.num_heads, g.head_dim):
            raise PrefixMismatchError(
                f"the {placement!r} prefix has shape {list(shape)} ([layers, heads, P, head_dim]), but {lm_name} "
                f"({config.architecture}) needs [{g.num_layers}, {g.num_heads}, P, {g.head_dim}]; it was made for "
                "another LM: load the LM it was trained on.")
    if prefix.prompt_embeds is not None and prefix.prompt_embeds.shape[-1] != config.hidden_size:
        raise PrefixMismatchError(f"the prompt has width {prefix.prompt_embeds.shape[-1]}, but {lm_name} "
                                  f"({config.architecture}) has hidden size {config.hidden_size}; it was made for "
                                  "another LM.")


def check_fits(prefix: Prefix, config: Any, lm_params: Any = None, lm_name: str | None = None,
               fingerprint: str | None = None) -> None:
    """Refuses (`PrefixMismatchError`, naming both) a prefix made for another LM than (`config`, `lm_params`).

    Checks the shapes always; the architecture and the fingerprint when the prefix records them
    (`Prefix.trained_on`, set by `prefix.load_export`) and the LM's weights (or `fingerprint`) are given.
    A prefix built in memory (`prefix.materialize`) records nothing: only its shapes are checked.
    """
    who = prefix.trained_on
    name = lm_name or "the LM"
    if who is not None and who.architecture and who.architecture != config.architecture:
        raise PrefixMismatchError(f"the prefix was trained on {_describe(who)}, but it is given to {name} "
                                  f"({config.architecture}); a prefix only fits the LM it was trained on: load that "
                                  "LM.")
    check_shapes(prefix, config, name)
    if who is None or not who.lm_fingerprint or (lm_params is None and fingerprint is None):
        return
    if fingerprint is None:
        if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(lm_params)):
            return  # inside a trace the weights are unknown: check before jit (make_generate_fn does)
        fingerprint = lm_fingerprint(lm_params)
    if fingerprint != who.lm_fingerprint:
        raise PrefixMismatchError(
            f"the prefix was trained on {_describe(who)}, but it is given to {name} ({config.architecture}, LM "
            f"fingerprint {fingerprint[:12]}): other weights. A prefix only fits the LM it was trained on: load that "
            "LM (the same weights from a Hub id or a local copy match).")
