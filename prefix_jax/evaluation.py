"""Evaluation of a prefix: teacher-forced loss over the eval split, and decoding + corpus metrics.

Each pass shows its own progress bar ("eval loss", "decoding"; process 0, on stderr), and decoded outputs go to
a file that never replaces an existing one (`predictions_path`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from prefix_jax import data, text_metrics, sharding
from prefix_jax import prefix as prefix_lib
from prefix_jax import prefix_bank

log = logging.getLogger("prefix_jax")


def _progress(total: int, desc: str, unit: str) -> Any:
    """A progress bar of its own for one evaluation pass (process 0 only)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True,
                disable=jax.process_index() != 0)


def predictions_path(workdir: Path, split: str, step: int, eval_only: bool) -> Path:
    """Where decoded outputs go: `predictions_<split>_<step>.jsonl` (evaluations during training) or
    `predictions_<split>_<step>_eval_only.jsonl` (`train.eval_only`); never an existing file (`.2`, `.3`, ... then)."""
    stem = f"predictions_{split}_{step}" + ("_eval_only" if eval_only else "")
    path, n = workdir / f"{stem}.jsonl", 1
    while path.exists():
        n += 1
        path = workdir / f"{stem}.{n}.jsonl"
    return path


def loss(batcher: data.Batcher, mesh: Any, params: Any, lm_params: Any, eval_fn: Callable) -> dict:
    """Token-level loss and perplexity over every example of the split."""
    totals = np.zeros(2)
    bar = _progress(-(-len(batcher.split) // batcher.global_batch_size), "eval loss", "batch")
    for local in batcher.eval_batches():
        out = jax.device_get(eval_fn(params, lm_params, sharding.shard_batch(local, mesh)))
        totals += (float(out["loss_sum"]), float(out["tokens"]))
        bar.update(1)
    bar.close()
    mean = totals[0] / max(totals[1], 1.0)
    return {"eval_loss": float(mean), "eval_perplexity": float(np.exp(min(mean, 50.0))),
            "eval_tokens": float(totals[1])}


def unique_sources(split: data.TokenizedSplit, limit: int = 0) -> list[int]:
    """Index of the first example of each distinct (task, source) (multi-reference sets are decoded once)."""
    seen, first = set(), []
    for i, example in enumerate(split.examples):
        if (example.task, example.source) not in seen:
            seen.add((example.task, example.source))
            first.append(i)
    return first[:limit] if limit else first


def _gather(tokens: jax.Array) -> np.ndarray:
    if jax.process_count() == 1:
        return np.asarray(tokens)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(tokens, tiled=True))


def generate_and_score(batcher: data.Batcher, mesh: Any, tokenizer: Any, spec: prefix_lib.PrefixSpec, params: Any,
                       lm_params: Any, generate_fn: Callable, metric_names: tuple[str, ...], limit: int = 0,
                       predictions_path: Path | None = None) -> dict:
    """Decodes each distinct eval source with the prefix and scores it against all its references."""
    split = batcher.split
    chosen = unique_sources(split, limit)
    prefix = prefix_lib.materialize(params, spec)
    size = batcher.global_batch_size
    hypotheses: list[str] = []
    bar = _progress(len(chosen), "decoding", "source")
    for start in range(0, len(chosen), size):
        indices = chosen[start:start + size]
        rows = indices + [indices[-1]] * (size - len(indices))  # full batches: one compiled shape
        local = np.array_split(np.asarray(rows), batcher.process_count)[batcher.process_index]
        ids, mask = data.pad([split.source_ids[i] for i in local], batcher.source_width, batcher.pad_id,
                             batcher.left_pad_source)
        batch = sharding.shard_batch({"source_ids": ids, "source_mask": mask}, mesh)
        task_ids = None if split.task_ids is None else np.asarray([split.task_ids[i] for i in rows], np.int32)
        rows_prefix = prefix_bank.for_batch(prefix, task_ids)  # the global batch's rows, in order
        tokens = _gather(generate_fn(lm_params, rows_prefix, batch["source_ids"], batch["source_mask"]))[:len(indices)]
        hypotheses.extend(t.strip() for t in tokenizer.batch_decode(tokens.tolist(), skip_special_tokens=True))
        bar.update(len(indices))
    bar.close()
    references = [list(split.examples[i].references or (split.examples[i].target,)) for i in chosen]
    scores = text_metrics.compute(metric_names, hypotheses, references) if metric_names else {}
    for i, hypothesis in list(zip(chosen, hypotheses))[:3]:  # what the numbers mean, in the log
        log.info("decoded: %s\n    -> %s", split.examples[i].source, hypothesis)
    if predictions_path is not None and jax.process_index() == 0:
        with predictions_path.open("w") as f:  # a new file: see predictions_path
            for i, hypothesis, refs in zip(chosen, hypotheses, references):
                task = {"task": split.examples[i].task} if split.examples[i].task else {}
                f.write(json.dumps({**task, "source": split.examples[i].source, "prediction": hypothesis,
                                    "references": refs}) + "\n")
    return {**scores, "generated": len(hypotheses)}
