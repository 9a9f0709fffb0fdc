"""Orbax checkpoints of the trainable state only, with metadata that ties them to their base LM.

A checkpoint step holds two items: `state` (prefix + MLP params, optimizer state, step, rng) and
`meta` (JSON: base model, architecture, model config, prefix spec, data position, run config).
No LM weight is ever written. Restoring checks the metadata against the current run first, so a
prefix cannot be silently loaded onto the wrong LM.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

# Metadata that must agree between a checkpoint and the run restoring it.
IDENTITY_KEYS = ("base_model", "architecture", "model_config", "prefix_spec")


class CheckpointMismatchError(ValueError):
    """A checkpoint belongs to another base model or prefix than the current run."""


def manager(directory: str | Path, max_to_keep: int | None = 3) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options, item_names=("state", "meta"))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: Mapping[str, Any]) -> None:
    """Asynchronously writes `state` + `meta` at `step` (call `mngr.wait_until_finished()` before exit)."""
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))))


def read_meta(mngr: ocp.CheckpointManager, step: int | None = None) -> dict | None:
    """The metadata of `step` (default: latest), or None when there is no checkpoint."""
    step = mngr.latest_step() if step is None else step
    if step is None:
        return None
    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def check_compatible(saved: Mapping[str, Any], current: Mapping[str, Any], where: str) -> None:
    """Raises `CheckpointMismatchError` naming every identity field that differs."""
    diffs = [f"{k}: checkpoint has {saved.get(k)!r}, this run has {current.get(k)!r}"
             for k in IDENTITY_KEYS if _normalize(saved.get(k)) != _normalize(current.get(k))]
    if diffs:
        raise CheckpointMismatchError(
            f"the checkpoint in {where} was trained for another model or prefix and was left untouched:\n  "
            + "\n  ".join(diffs) + "\nUse a new train.workdir, or the config the checkpoint was made with.")


def _normalize(value: Any) -> Any:
    """JSON round trip, so tuples vs lists and int-vs-str keys compare equal."""
    import json

    return json.loads(json.dumps(value, sort_keys=True, default=str))


def restore(mngr: ocp.CheckpointManager, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
    """The state (laid out like `abstract_state`, shardings included) and metadata at `step` (default latest)."""
    step = mngr.latest_step() if step is None else step
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                          meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]


def read_state(mngr: ocp.CheckpointManager, step: int | None = None) -> Any:
    """The state tree exactly as stored (no template needed): for inspection and export tools."""
    step = mngr.latest_step() if step is None else step
    return mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]


def abstract(tree: Any) -> Any:
    """Shape/dtype/sharding skeleton of a tree of arrays, for `restore`."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
