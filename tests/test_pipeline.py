"""The whole run on a tiny local T5: checkpoints hold only the prefix, resume is exact, errors are clean."""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import REPO, losses, run_cli, small_config, tree_digest

from prefix_jax import checkpoint, trainer
from prefix_jax import prefix as prefix_lib
from prefix_jax.metrics_file import read_metrics
from prefix_jax.models import load_pretrained


@pytest.mark.slow
def test_resumed_run_replays_the_uninterrupted_one(tiny_t5_dir, tmp_path):
    straight = trainer.run(small_config(tiny_t5_dir, tmp_path / "straight"))
    first = trainer.run(small_config(tiny_t5_dir, tmp_path / "resumed", stop_at=3))
    assert first["final_step"] == 3 and "export" not in first
    second = trainer.run(small_config(tiny_t5_dir, tmp_path / "resumed"))
    assert second["start_step"] == 3 and second["final_step"] == 6
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert [a[s] for s in a] == [b[s] for s in a]  # bitwise: same batches, same randomness, same schedule
    assert straight["eval_loss"] == second["eval_loss"]


def test_checkpoint_holds_only_the_trainable_state(tiny_t5_dir, trained_t5_run):
    run, _ = trained_t5_run
    lm = load_pretrained(str(tiny_t5_dir))
    lm_bytes = sum(x.nbytes for x in jax.tree.leaves(lm.params))
    mngr = checkpoint.manager(run / "checkpoints", read_only=True)
    meta = checkpoint.read_meta(mngr)
    assert meta["base_model"] == str(tiny_t5_dir) and meta["architecture"] == "t5"
    assert meta["data_position"] == {"epoch": 0, "batch": 6}
    assert meta["prefix_spec"]["length"] == 4
    restored = checkpoint.read_state(mngr, 6)  # raw tree, no template: what is on disk
    assert set(restored) == {"step", "params", "opt_state", "rng", "nonfinite_streak"}
    assert set(restored["params"]) == {"encoder", "decoder", "cross"}
    state_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(restored))
    disk_bytes = sum(p.stat().st_size for p in (run / "checkpoints").rglob("*") if p.is_file())
    assert disk_bytes < 2 * state_bytes + 200_000  # the state plus Orbax's small metadata files
    assert disk_bytes < lm_bytes / 10
    mngr.close()


def test_export_is_the_materialized_prefix_without_mlp(tiny_t5_dir, trained_t5_run):
    run, summary = trained_t5_run
    exported, meta = prefix_lib.load_export(summary["export"])
    assert meta["base_model"] == str(tiny_t5_dir) and meta["step"] == 6
    mngr = checkpoint.manager(run / "checkpoints", read_only=True)
    params = checkpoint.read_state(mngr, 6)["params"]
    mngr.close()
    spec = prefix_lib.PrefixSpec.from_json(meta["spec"])
    expected = prefix_lib.materialize(params, spec)
    for placement in ("encoder", "decoder", "cross"):
        np.testing.assert_allclose(exported.kv[placement].key, expected.kv[placement].key, atol=1e-6)
        np.testing.assert_allclose(exported.kv[placement].value, expected.kv[placement].value, atol=1e-6)
    files = {p.name for p in Path(summary["export"]).iterdir()}
    assert files == {prefix_lib.EXPORT_WEIGHTS, prefix_lib.EXPORT_META}
    size = sum(x.nbytes for x in jax.tree.leaves(expected))
    assert Path(summary["export"], prefix_lib.EXPORT_WEIGHTS).stat().st_size < size + 10_000


def test_mismatched_or_unresumable_checkpoint_is_left_untouched(tiny_t5_dir, trained_workdir):
    before = tree_digest(trained_workdir)
    other = small_config(tiny_t5_dir, trained_workdir)
    other.prefix.length = 6
    with pytest.raises(checkpoint.CheckpointMismatchError, match="prefix_spec"):
        trainer.run(other)
    with pytest.raises(trainer.ConfigError, match="train.resume"):
        trainer.run(small_config(tiny_t5_dir, trained_workdir, resume=False))
    assert tree_digest(trained_workdir) == before


def test_bad_values_are_clear_errors(tiny_t5_dir, tmp_path):
    cases = [("prefix", "method", "bogus", "prefix.method"), ("prefix", "placements", ("encoder", "nope"), "prefix.placements"),
             ("prefix", "length", 0, "prefix.length"), ("train", "batch_size", 1000, "train.batch_size"),
             ("data", "format", "xml", "data.format"), ("optim", "learning_rate", 0.0, "optim.learning_rate")]
    for group, field, value, named in cases:
        c = small_config(tiny_t5_dir, tmp_path / f"bad-{field}")
        c[group][field] = value
        with pytest.raises(ValueError, match=named.replace(".", r"\.")):
            trainer.run(c)
        assert not (tmp_path / f"bad-{field}").exists()  # nothing written before the config is known good


def test_train_py_runs_end_to_end(tiny_t5_dir, tmp_path):
    workdir = tmp_path / "cli"
    # small_config's shapes and step count, so the subprocess reuses the programs in-process runs compiled
    out = run_cli("--config", str(REPO / "configs/t5_offline.py"), f"--config.model.name_or_path={tiny_t5_dir}",
                  "--config.model.create_tiny=", f"--config.train.workdir={workdir}", "--config.train.steps=6",
                  "--config.train.batch_size=4", "--config.data.max_train_examples=32", "--config.optim.warmup_steps=1",
                  "--config.data.max_eval_examples=8", "--config.train.log_every=2",
                  "--config.data.max_source_length=32", "--config.data.max_target_length=16",
                  "--config.prefix.length=4", "--config.prefix.mlp_hidden=16")
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stderr + out.stdout
    assert "prefix.length = 4" in log and "!!python" not in log  # the fields that differ, as plain values
    assert "evaluating step 6" in log and "exporting the prefix" in log  # no bar frozen at N-1/N without a word
    assert (workdir / "checkpoints" / "6").is_dir()
    assert (workdir / "export" / prefix_lib.EXPORT_WEIGHTS).is_file()
    assert [row["step"] for row in read_metrics(workdir) if "loss" in row] == [2, 4, 6]


def test_train_py_bad_input_exits_nonzero_with_the_field_named(tiny_t5_dir, tmp_path):
    out = run_cli("--config", str(REPO / "configs/t5_offline.py"), f"--config.model.name_or_path={tmp_path / 'none'}",
                  "--config.model.create_tiny=", f"--config.train.workdir={tmp_path / 'w'}")
    assert out.returncode == 2
    assert "model.name_or_path" in out.stderr and "no such directory" in out.stderr
    assert "Traceback" not in out.stderr
    out = run_cli("--config", str(REPO / "configs/t5_offline.py"), "--config.prefix.lenght=3")
    assert out.returncode != 0 and "lenght" in out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("method,init", [("infix", "normal"), ("embedding_only", "normal"), ("prefix", "words")])
def test_decoder_only_variants_run_end_to_end(tiny_gpt2_dir, tmp_path, method, init):
    from configs import gpt2_e2e_offline

    c = gpt2_e2e_offline.get_config()
    c.model.name_or_path, c.model.create_tiny = str(tiny_gpt2_dir), ""
    c.data.max_train_examples, c.data.max_eval_examples = 32, 8
    c.data.max_source_length, c.data.max_target_length = 32, 16
    c.prefix.method, c.prefix.init = method, init
    if init == "words":
        c.prefix.length, c.prefix.init_text, c.prefix.init_fit_steps = 0, "table-to-text:", 20
    c.eval.max_generate, c.generate.max_new_tokens = 4, 6
    c.train.workdir, c.train.steps, c.train.batch_size, c.train.log_every = str(tmp_path), 2, 4, 1
    c.optim.warmup_steps = 1
    summary = trainer.run(c)
    assert summary["final_step"] == 2 and summary["generated"] == 4 and "bleu" in summary
    meta = checkpoint.read_meta(checkpoint.manager(tmp_path / "checkpoints"))
    assert meta["prefix_spec"]["method"] == method
    if init == "words":
        assert meta["prefix_spec"]["length"] == 6  # "table-to-text:" is 6 GPT-2 BPE tokens
    exported, _ = prefix_lib.load_export(summary["export"])
    assert exported.infix == (method == "infix")


def test_prefix_plus_text_longer_than_the_position_table_fails_before_training(tiny_gpt2_dir, tmp_path):
    from configs import gpt2_e2e_offline

    c = gpt2_e2e_offline.get_config()
    c.model.name_or_path, c.model.create_tiny = str(tiny_gpt2_dir), ""
    c.prefix.length = 200  # tiny GPT-2 has 256 positions; E2E sources + targets need > 56
    c.train.workdir = str(tmp_path / "w")
    with pytest.raises(trainer.ConfigError, match="256"):
        trainer.run(c)
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_eval_only_scores_the_latest_checkpoint_on_another_split(tiny_t5_dir, trained_t5_run, tmp_path):
    shutil.copytree(trained_t5_run[0], tmp_path / "run")  # eval-only appends metrics rows
    trained = trained_t5_run[1]
    c = small_config(tiny_t5_dir, tmp_path / "run", eval_only=True)
    c.data.eval_split = "test"
    c.data.data_files = {"test": str(REPO / "data/e2e/devset.csv")}  # no train file needed
    c.eval.max_generate = 1
    before = tree_digest(tmp_path / "run" / "checkpoints")
    summary = trainer.run(c)
    assert summary["start_step"] == summary["final_step"] == 6 and summary["generated"] == 1
    assert summary["eval_loss"] != trained["eval_loss"]  # another split
    assert [r for r in read_metrics(tmp_path / "run") if "test/eval_loss" in r]
    assert tree_digest(tmp_path / "run" / "checkpoints") == before
    with pytest.raises(trainer.ConfigError, match="no checkpoint"):
        trainer.run(small_config(tiny_t5_dir, tmp_path / "empty", eval_only=True))
