"""What a checkpoint records about its run, and when a run may resume from it.

`run_metadata(plan)` is written with every checkpoint (and the export's part of it with the export):
the base model and its weights' fingerprint, architecture, model config and prefix spec (which must match:
`IDENTITY_KEYS`), and under "resume" the values of every config field declared to block a resume
(`run_options.RESUME_FIELDS`) plus the data's fingerprint. `check_compatible` compares a checkpoint's
metadata with the current run's and names every field that differs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from typing import Any, Mapping

import numpy as np

from prefix_jax import checkpoint, data
from prefix_jax.run_options import LAYOUT_FIELDS
from prefix_jax.run_setup import RunPlan

log = logging.getLogger("prefix_jax")

# Metadata that must agree between a checkpoint and the run restoring it: what the prefix belongs to.
IDENTITY_KEYS = ("architecture", "lm_fingerprint", "model_config", "prefix_spec")


def data_fingerprint(split: data.TokenizedSplit) -> str:
    """The token ids of a split, hashed: a resume on other data would not replay the run."""
    h = hashlib.sha256()
    for source, target in zip(split.source_ids, split.target_ids):
        h.update(np.asarray(source, np.int64).tobytes() + b"|" + np.asarray(target, np.int64).tobytes() + b"\n")
    return h.hexdigest()[:32]


def run_metadata(plan: RunPlan) -> dict:
    """What a checkpoint records about where it belongs (`IDENTITY_KEYS`) and how it was trained."""
    lm, c = plan.lm, plan.options
    meta = {
        "base_model": lm.name_or_path,
        "lm_fingerprint": plan.lm_fingerprint,  # the float checkpoint's, with model.quantize too
        "architecture": lm.config.architecture,
        "model_config": {k: v for k, v in dataclasses.asdict(lm.config).items()
                         if k not in ("dtype", "param_dtype", "remat", "attention_kernel")},
        "prefix_spec": plan.spec.to_json(),
        "config": c.config,
    }
    if not c.train.eval_only:  # what must not change for a resume to replay the interrupted run
        resolved = {"train.steps": plan.total_steps, "data.pack_width": plan.train.pack_width,
                    "model.compute_dtype": c.model.compute_dtype or c.model.param_dtype,  # as the run uses them
                    "model.quantize_group_size": c.model.quantize_group_size if c.model.quantize == "int4" else None,
                    "model.quantize_embeddings": c.model.quantize_embeddings if c.model.quantize != "none" else None}
        meta["resume"] = {"data.train": data_fingerprint(plan.train.split),
                          **{key: resolved.get(key, value) for key, value in c.resume_values().items()}}
    return meta


def _normalize(value: Any) -> Any:
    """JSON round trip, so tuples vs lists and int-vs-str keys compare equal."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _differences(saved: Mapping[str, Any], current: Mapping[str, Any], keys: Any) -> list[str]:
    return [f"{k} (checkpoint: {_short(saved.get(k))}, this run: {_short(current.get(k))})"
            for k in keys if _normalize(saved.get(k)) != _normalize(current.get(k))]


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(_normalize(value), sort_keys=True)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_compatible(saved: Mapping[str, Any], current: Mapping[str, Any], where: str,
                     resume_anyway: bool = False) -> None:
    """Refuses a checkpoint of another model or prefix, and (unless `resume_anyway`) a resume that would not
    replay the uninterrupted run: each differing field is named. Raises `CheckpointMismatchError`."""
    identity = _differences(saved, current, IDENTITY_KEYS)
    if identity:
        raise checkpoint.CheckpointMismatchError(
            f"the checkpoint in {where} belongs to another model or prefix and was left untouched; differs: "
            + "; ".join(identity) + ". Use a new train.workdir, or the model and prefix it was made with.")
    saved_resume, current_resume = saved.get("resume", {}), current.get("resume", {})
    layout = _differences(saved_resume, current_resume, LAYOUT_FIELDS)
    if layout:
        raise checkpoint.CheckpointMismatchError(
            f"the checkpoint in {where} has another optimizer-state layout and was left untouched; differs: "
            + "; ".join(layout) + ". Resume with the values it was made with, or use a new train.workdir.")
    changed = _differences(saved_resume, current_resume, sorted(set(saved_resume) | set(current_resume)))
    if not changed:
        return
    if not resume_anyway:
        raise checkpoint.CheckpointMismatchError(
            f"resuming the checkpoint in {where} would not replay the interrupted run; differs: "
            + "; ".join(changed) + ". Restore those values, use a new train.workdir, or set "
            "--config.train.resume_anyway=True to continue with the new ones.")
    log.warning("train.resume_anyway: resuming %s although %s", where, "; ".join(changed))
