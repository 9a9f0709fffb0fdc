"""Multi-task training: one frozen LM, a `task` column, one prefix per task trained in shared batches."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import REPO, multitask_config

from prefix_jax import checkpoint, data, losses, trainer, train_steps
from prefix_jax import prefix as prefix_lib
from prefix_jax.models import load_pretrained


def two_task_file(path: Path, n: int = 24) -> Path:
    """E2E sources; task "describe" answers with the reference, task "name" with the restaurant name only."""
    examples = data.read_e2e_csv(REPO / "data/e2e/devset.csv")[: n]
    rows = []
    for e in examples:
        rows.append({"task": "describe", "source": e.source, "target": e.target})
        rows.append({"task": "name", "source": e.source, "target": e.source.split(" | ")[0].split(" : ")[1]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_each_task_trains_and_exports_its_own_prefix(tiny_gpt2_dir, tmp_path):
    config = multitask_config(tiny_gpt2_dir, tmp_path / "run", two_task_file(tmp_path / "tasks.jsonl"))
    summary = trainer.run(config)
    assert summary["final_step"] == 3 and summary["generated"] == 6
    meta = checkpoint.read_meta(checkpoint.manager(tmp_path / "run" / "checkpoints", read_only=True))
    assert meta["prefix_spec"]["tasks"] == ["describe", "name"]
    predictions = [json.loads(line) for line in (tmp_path / "run" / "predictions_validation_3.jsonl").read_text().splitlines()]
    assert {p["task"] for p in predictions} == {"describe", "name"}

    # Each row used its own task's prefix: the bank's eval loss on one task's rows equals that task's export
    # evaluated as a single prefix, and differs from the other task's.
    lm = load_pretrained(str(tiny_gpt2_dir))
    tokenizer = data.load_tokenizer(str(tiny_gpt2_dir))
    examples = data.read_examples(config.data, "validation")
    per_task_loss = {}
    for task in ("describe", "name"):
        exported, export_meta = prefix_lib.load_export(tmp_path / "run" / "export" / task)
        assert export_meta["task"] == task
        rows = [e for e in examples if e.task == task][:8]
        split = data.tokenize(rows, tokenizer, 48, 24, False)
        batcher = data.Batcher(split, 8, 48, 24, 0, left_pad_source=True)
        batch = next(batcher.eval_batches())
        single = lm.model.apply({"params": lm.params}, batch, exported)
        total, count = losses.token_cross_entropy(single, batch["target_ids"], batch["target_mask"])
        per_task_loss[task] = float(total / count)

        state = checkpoint.read_state(checkpoint.manager(tmp_path / "run" / "checkpoints", read_only=True))
        spec = prefix_lib.PrefixSpec.from_json(meta["prefix_spec"])
        split.task_ids = [spec.tasks.index(task)] * len(rows)
        bank_batch = next(data.Batcher(split, 8, 48, 24, 0, left_pad_source=True).eval_batches())
        bank_total, bank_count = train_steps.batch_loss(lm.model, spec, jax.device_get(state["params"]), lm.params,
                                                     bank_batch, None)
        np.testing.assert_allclose(float(bank_total / bank_count), per_task_loss[task], rtol=1e-5)
        other = prefix_lib.load_export(tmp_path / "run" / "export" / ({"describe", "name"} - {task}).pop())[0]
        swapped = lm.model.apply({"params": lm.params}, batch, other)
        swapped_loss = losses.token_cross_entropy(swapped, batch["target_ids"], batch["target_mask"])
        assert abs(float(swapped_loss[0] / swapped_loss[1]) - per_task_loss[task]) > 1e-3


def test_a_task_column_needs_the_fields_format_and_known_tasks(tiny_gpt2_dir, tmp_path):
    train_file = two_task_file(tmp_path / "tasks.jsonl", n=8)
    config = multitask_config(tiny_gpt2_dir, tmp_path / "a", train_file)
    config.data.format = "e2e"
    with pytest.raises(ValueError, match="data.task_field"):
        trainer.run(config)
    extra = tmp_path / "eval.jsonl"
    extra.write_text(json.dumps({"task": "translate", "source": "a", "target": "b"}) + "\n")
    config = multitask_config(tiny_gpt2_dir, tmp_path / "b", train_file)
    config.data.data_files.validation = str(extra)
    with pytest.raises(ValueError, match="translate"):
        trainer.run(config)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
