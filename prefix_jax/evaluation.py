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
    bar = _progress(batcher.num_eval_batches, "eval loss", "batch")
    shapes = set()
    for local in batcher.eval_batches():
        shapes.add((local["source_ids"].shape[1], local["target_ids"].shape[1]))
        out = jax.device_get(eval_fn(params, lm_params, sharding.shard_batch(local, mesh)))
        totals += (float(out["loss_sum"]), float(out["tokens"]))
        bar.update(1)
    bar.close()
    log.info("eval loss: %d batches in %d shapes (source, target widths; one compiled program each): %s",
             batcher.num_eval_batches, len(shapes), sorted(shapes))
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
    decoded: dict[int, str] = {}
    widths = set()
    bar = _progress(len(chosen), "decoding", "source")
    for indices, local in batcher.source_batches(chosen):  # grouped by source width with eval.length_buckets
        widths.add(local["source_ids"].shape[1])
        rows = indices + [indices[-1]] * (size - len(indices))  # what source_batches filled the batch with
        batch = sharding.shard_batch(local, mesh)
        task_ids = None if split.task_ids is None else np.asarray([split.task_ids[i] for i in rows], np.int32)
        rows_prefix = prefix_bank.for_batch(prefix, task_ids)  # the global batch's rows, in order
        tokens = _gather(generate_fn(lm_params, rows_prefix, batch["source_ids"], batch["source_mask"]))[:len(indices)]
        texts = tokenizer.batch_decode(tokens.tolist(), skip_special_tokens=True)
        decoded.update((i, t.strip()) for i, t in zip(indices, texts))
        bar.update(len(indices))
    bar.close()
    log.info("decoding: %d sources in %d source widths (one compiled program each): %s", len(chosen), len(widths),
             sorted(widths))
    hypotheses = [decoded[i] for i in chosen]
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
