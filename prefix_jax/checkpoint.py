"""Orbax checkpoints of the trainable state only, with metadata that ties them to their base LM and run.

A checkpoint step holds two items: `state` (prefix + MLP params, optimizer state, step, rng) and
`meta` (JSON: base model and its fingerprint, architecture, model config, prefix spec, what makes a
resume exact, data position, a digest of the state, the run config). No LM weight is ever written.

What the metadata holds and when a run may resume from it: `checkpoint_meta`.
`restore_latest_good` verifies each step against its digest and falls back to the
previous step when the latest is unreadable or corrupt.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import time
from typing import Any, Iterator, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger("prefix_jax")

CORRUPT_DIR = "corrupt_checkpoints"  # where unreadable steps are moved (never deleted)


class CheckpointMismatchError(ValueError):
    """A checkpoint belongs to another base model, prefix or run than the current one."""


class NoGoodCheckpointError(ValueError):
    """Every checkpoint of a workdir failed to restore or to verify."""


class CheckpointWriteError(ValueError):
    """The disk refused a checkpoint (full, over quota, read-only): the partial step is removed, earlier ones kept."""


_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)
# How tensorstore (under Orbax) words them: a ValueError "RESOURCE_EXHAUSTED: ... No space left on device".
DISK_FULL_WORDS = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
                   "Read-only file system": errno.EROFS}


def disk_error(e: BaseException | None) -> OSError | None:
    """The OSError of a full / read-only disk somewhere in `e`'s chain (Orbax wraps it several times)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_ERRNOS:
            return e
        for words, number in DISK_FULL_WORDS.items():
            if words in str(e):
                return OSError(number, words)
        e = e.__cause__ or e.__context__
    return None


@contextlib.contextmanager
def disk_errors(mngr: ocp.CheckpointManager, step: int | None) -> Iterator[None]:
    """Turns a full or read-only disk during a save (or while waiting for one) into one `CheckpointWriteError`,
    after removing the partial step (`*.orbax-checkpoint-tmp*`); the steps saved before it are kept."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - re-raised unless it is the disk's
        cause = disk_error(e)
        if cause is None:
            raise
        with contextlib.suppress(Exception):  # let Orbax's background writes end before their directory goes
            mngr.wait_until_finished()
        directory = epath.Path(mngr.directory)
        partials = sorted(directory.glob("*.orbax-checkpoint-tmp*"))
        for partial in partials:
            with contextlib.suppress(OSError):
                partial.rmtree()
        failed = sorted({p.name.split(".")[0] for p in partials}) or ([str(step)] if step is not None else [])
        kept = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
        raise CheckpointWriteError(
            f"saving checkpoint step {' / '.join(failed) or '(pending)'} in {directory} failed: "
            f"{os.strerror(cause.errno) if cause.errno else cause}; the partial step was removed and "
            f"{'steps ' + str(kept) + ' were' if kept else 'no earlier step was'} kept. Free space (or make "
            "the disk writable) and rerun the same command to resume.") from None


def wait(mngr: ocp.CheckpointManager) -> None:
    """`mngr.wait_until_finished()`, a full disk reported as one `CheckpointWriteError`."""
    with disk_errors(mngr, None):
        mngr.wait_until_finished()


def manager(directory: str | epath.PathLike, max_to_keep: int | None = 3, read_only: bool = False
            ) -> ocp.CheckpointManager:
    """An Orbax manager of `directory`. `read_only` managers create and clean nothing (for checks before the
    workdir lock is held); writing ones remove their own interrupted saves (`*.orbax-checkpoint-tmp*`)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=None if read_only else max_to_keep, create=not read_only,
                                           read_only=read_only, cleanup_tmp_directories=not read_only,
                                           save_interval_steps=0 if read_only else 1)
    return ocp.CheckpointManager(epath.Path(directory), options=options, item_names=("state", "meta"))


def _host(leaf: Any) -> np.ndarray:
    """A leaf as a host array: this process's copy of a (replicated) jax.Array, or the array itself."""
    return np.asarray(leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf)


def state_digest(state: Any) -> str:
    """sha256 over the state's leaves (paths, dtypes, shapes, bytes): restores are verified against it."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        array = _host(leaf)
        if jax.dtypes.issubdtype(array.dtype, jax.dtypes.prng_key):
            array = np.asarray(jax.random.key_data(array))
        h.update(f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}|".encode())
        h.update(np.ascontiguousarray(array))  # the buffer itself: `tobytes()` would copy it first
    return h.hexdigest()


def is_finite(state: Any) -> bool:
    """Every floating-point leaf of `state` is finite."""
    for leaf in jax.tree.leaves(state):
        array = _host(leaf)
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            return False
    return True


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: Mapping[str, Any]) -> None:
    """Asynchronously writes `state` + `meta` (with the state's digest) at `step`.

    Call `mngr.wait_until_finished()` before exit; a non-finite state is never written.
    """
    if not is_finite(state):
        raise ValueError(f"refusing to save a non-finite train state at step {step}; the last good checkpoint "
                         "was kept.")
    meta = {**meta, "state_digest": state_digest(state)}
    with disk_errors(mngr, step):
        mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))


def read_meta(mngr: ocp.CheckpointManager, step: int | None = None) -> dict | None:
    """The metadata of `step` (default: latest), or None when there is no checkpoint."""
    step = mngr.latest_step() if step is None else step
    if step is None:
        return None
    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore_latest_good(mngr: ocp.CheckpointManager, abstract_state: Any) -> tuple[int, Any, dict, list[int]]:
    """The newest step that restores and matches its digest: (step, state, meta, newer steps that failed).

    Raises `NoGoodCheckpointError` when no step does. Corrupt steps are reported, not touched here.
    """
    failed: list[int] = []
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            restored = mngr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
            state, meta = restored["state"], restored["meta"]
            digest = meta.get("state_digest")
            if digest is not None and digest != state_digest(state):
                raise ValueError("its state does not match the digest saved with it")
            if not is_finite(state):
                raise ValueError("its state is not finite")
        except Exception as e:  # noqa: BLE001 - any failure to read a step means: try the one before
            log.warning("checkpoint step %d of %s cannot be used (%s: %s); trying the one before", step,
                        mngr.directory, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
            failed.append(step)
            continue
        return step, state, meta, failed
    raise NoGoodCheckpointError(f"no checkpoint in {mngr.directory} can be restored (steps {failed} all failed); "
                                "they were left untouched. Use a new train.workdir or set train.resume=False "
                                "with a new workdir.")


def set_aside(checkpoint_dir: epath.Path, steps: list[int]) -> list[epath.Path]:
    """Moves corrupt steps out of the checkpoint directory (to `../corrupt_checkpoints/<step>-<time>`), so a
    resumed run can save those steps again. Nothing is deleted."""
    moved = []
    target_root = checkpoint_dir.parent / CORRUPT_DIR
    target_root.mkdir(parents=True, exist_ok=True)
    for step in steps:
        source = checkpoint_dir / str(step)
        if source.exists():
            target = target_root / f"{step}-{time.strftime('%Y%m%dT%H%M%S')}"
            source.rename(target)
            log.warning("moved unreadable checkpoint step %d to %s", step, target)
            moved.append(target)
    return moved


def read_state(mngr: ocp.CheckpointManager, step: int | None = None) -> Any:
    """The state tree exactly as stored (no template needed): for inspection and export tools."""
    step = mngr.latest_step() if step is None else step
    return mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]


def abstract(tree: Any) -> Any:
    """Shape/dtype/sharding skeleton of a tree of arrays, for `restore`."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
