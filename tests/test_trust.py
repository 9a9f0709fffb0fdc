"""A run never destroys user data, never trains on garbage, survives preemption and corruption, owns its workdir.

Bad inputs: every case must raise one of our ValueErrors with a one-line message naming the field or file
(`train.py` turns exactly those into `error: ...` and exit 2 without a traceback; a few cases go through
the CLI to show that), and leave a pre-existing workdir byte-identical.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import REPO, losses, multitask_config, run_cli, small_config, tree_digest

import train as train_cli
from prefix_jax import checkpoint, data, trainer, train_steps, workdir
from prefix_jax import prefix as prefix_lib
from prefix_jax.metrics_file import read_metrics
from prefix_jax.preemption import EXIT_PREEMPTED, Preempted


def _set(config, dotted: str, value) -> None:
    group, field = dotted.split(".")
    config[group][field] = value


def _broken_model(tmp_path: Path, model_dir: Path, file: str, keep: int) -> str:
    """A copy of `model_dir` with `file` cut to its first `keep` bytes (negative: all but the last -keep)."""
    copy = tmp_path / "broken-model"
    shutil.copytree(model_dir, copy)
    raw = (copy / file).read_bytes()
    (copy / file).write_bytes(raw[:keep])
    return str(copy)


def _file(tmp_path: Path, name: str, content: str | bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


# (id, overrides {field: value or callable(tmp_path, model_dir) -> value}, text the message must contain)
CONFIG_CASES = [
    ("lr-nan", {"optim.learning_rate": float("nan")}, "optim.learning_rate"),
    ("lr-inf", {"optim.learning_rate": float("inf")}, "optim.learning_rate"),
    ("lr-zero", {"optim.learning_rate": 0.0}, "optim.learning_rate"),
    ("b1-one", {"optim.b1": 1.0}, "optim.b1"),
    ("b2-big", {"optim.b2": 1.5}, "optim.b2"),
    ("eps-zero", {"optim.eps": 0.0}, "optim.eps"),
    ("wd-negative", {"optim.weight_decay": -0.1}, "optim.weight_decay"),
    ("clip-negative", {"optim.max_grad_norm": -1.0}, "optim.max_grad_norm"),
    ("frozen-regex", {"optim.frozen": ("[",)}, "optim.frozen"),
    ("frozen-matches-nothing", {"optim.frozen": ("mlp_inn",)}, "optim.frozen has 'mlp_inn', which matches no"),
    ("save-every-0", {"train.save_every": 0}, "train.save_every"),
    ("log-every-0", {"train.log_every": 0}, "train.log_every"),
    ("stop-at-negative", {"train.stop_at": -1}, "train.stop_at"),
    ("stop-at-past-end", {"train.stop_at": 99}, "train.stop_at"),
    ("smoothing-2", {"train.label_smoothing": 2.0}, "train.label_smoothing"),
    ("batch-0", {"train.batch_size": 0}, "train.batch_size"),
    ("batch-too-big", {"train.batch_size": 1000}, "train.batch_size"),
    ("seed-negative", {"train.seed": -1}, "train.seed"),
    ("epochs-nan", {"train.epochs": float("nan"), "train.steps": 0}, "train.epochs"),
    ("target-length-0", {"data.max_target_length": 0}, "data.max_target_length"),
    ("source-length-0", {"data.max_source_length": 0}, "data.max_source_length"),
    ("dropout-1", {"prefix.dropout": 1.0}, "prefix.dropout"),
    ("method", {"prefix.method": "bogus"}, "prefix.method"),
    ("placement", {"prefix.placements": ("encoder", "nope")}, "prefix.placements"),
    ("beams-0", {"generate.num_beams": 0}, "generate.num_beams"),
    ("new-tokens-0", {"generate.max_new_tokens": 0}, "generate.max_new_tokens"),
    ("metric", {"eval.metrics": ("nope",)}, "eval.metrics"),
    ("process-id", {"mesh.process_id": 3}, "mesh.process_id"),
    ("format", {"data.format": "xml"}, "data.format"),
    ("model-missing", {"model.name_or_path": lambda t, m: str(t / "no-model")}, "model.name_or_path"),
    ("model-no-config", {"model.name_or_path": lambda t, m: str(t)}, "config.json"),
    # train.py loads through the sharded loader: the promises of the whole-file loader hold there too
    ("model-truncated-weights", {"model.name_or_path": lambda t, m: _broken_model(t, m, "model.safetensors", -100)},
     "model.safetensors: not a readable safetensors file"),
    ("model-invalid-config", {"model.name_or_path": lambda t, m: _broken_model(t, m, "config.json", 20)},
     "config.json: not valid JSON"),
    ("train-file-missing", {"data.data_files": lambda t, m: {"train": str(t / "x.csv"),
                                                           "validation": str(REPO / "data/e2e/devset.csv")}},
     "data.data_files.train"),
    ("train-split-missing", {"data.data_files": lambda t, m: {"validation": str(REPO / "data/e2e/devset.csv")}},
     "train"),
    ("not-e2e-csv", {"data.data_files": lambda t, m: {"train": _file(t, "a.csv", "x,y\n1,2\n"),
                                                      "validation": _file(t, "a.csv", "x,y\n1,2\n")}}, "a.csv"),
    ("workdir-is-file", {"train.workdir": lambda t, m: _file(t, "f", "user data")}, "train.workdir"),
    ("workdir-under-file", {"train.workdir": lambda t, m: _file(t, "g", "user data") + "/run"}, "train.workdir"),
    ("create-tiny-over-user-dir", {"model.create_tiny": "t5", "model.name_or_path": lambda t, m: _file(
        t, "config.json", "{}") and str(t)},
     "model.create_tiny"),
    ("no-resume", {"train.resume": False}, "train.resume"),
    ("other-prefix", {"prefix.length": 6}, "prefix_spec"),
    ("other-seed", {"train.seed": 7}, "train.seed"),
    ("other-batch", {"train.batch_size": 8}, "train.batch_size"),
    ("other-lr", {"optim.learning_rate": 1e-2}, "optim.learning_rate"),
    ("other-frozen-anyway", {"optim.frozen": ("embedding",), "train.resume_anyway": True}, "optim.frozen"),
    ("other-data", {"data.max_train_examples": 32}, "data.train"),
    ("eval-only-empty", {"train.eval_only": True, "train.workdir": lambda t, m: str(t / "empty")}, "no checkpoint"),
]


@pytest.mark.parametrize("case,overrides,named", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_input_is_one_clear_line_and_touches_nothing(case, overrides, named, tiny_t5_dir, trained_workdir,
                                                         tmp_path):
    user_dir = tmp_path / "user"
    user_dir.mkdir()
    config = small_config(tiny_t5_dir, trained_workdir)
    for field, value in overrides.items():
        _set(config, field, value(user_dir, tiny_t5_dir) if callable(value) else value)
    watched = [trained_workdir, tiny_t5_dir, user_dir]
    before = [tree_digest(p) for p in watched]
    with pytest.raises(ValueError) as info:
        trainer.run(config)
    message = str(info.value)
    assert "\n" not in message, message
    assert named in message, message
    assert train_cli._is_ours(info.value), f"train.py would show a traceback for: {message}"
    assert [tree_digest(p) for p in watched] == before
    assert not (user_dir / "empty").exists()


@pytest.mark.slow  # a train.py subprocess; test_pipeline keeps one CLI run by default
def test_cli_bad_inputs_exit_2_with_one_line(tiny_t5_dir, trained_workdir, tmp_path):
    before = tree_digest(trained_workdir)
    cases = [
        (["--config", str(tmp_path / "missing.py")], "no such config file"),
        (["--config", str(REPO / "configs/t5_offline.py"), "--config.prefix.lenght=3"], "lenght"),
        (["--config", str(REPO / "configs/t5_offline.py"), "--config.train.steps=abc"], "train.steps"),
        (["--config", str(REPO / "configs/t5_offline.py"), f"--config.train.workdir={trained_workdir}",
          f"--config.model.name_or_path={tiny_t5_dir}", "--config.model.create_tiny=",
          "--config.optim.learning_rate=nan"], "optim.learning_rate"),
        (["--config", str(REPO / "configs/t5_offline.py"), f"--config.train.workdir={trained_workdir}",
          f"--config.model.name_or_path={tiny_t5_dir}", "--config.model.create_tiny=",
          "--config.data.max_train_examples=64", "--config.data.max_source_length=32",
          "--config.data.max_target_length=16", "--config.prefix.length=5"], "prefix_spec"),
    ]
    for args, named in cases:
        out = run_cli(*args)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2, out.stderr[-2000:]
        assert "Traceback" not in out.stderr and named in lines[-1] and lines[-1].startswith("error: "), out.stderr
    assert tree_digest(trained_workdir) == before


def test_create_tiny_never_deletes_user_files(tmp_path):
    from prefix_jax.tiny_checkpoints import TinyCheckpointError, build_tiny_checkpoint

    user = tmp_path / "mymodel"
    (user / "sub").mkdir(parents=True)
    (user / "model-00001-of-00002.safetensors").write_bytes(b"user weights")
    (user / "sub" / "notes.txt").write_text("keep me")
    before = tree_digest(user)
    with pytest.raises(TinyCheckpointError, match="left untouched"):
        build_tiny_checkpoint(user, "gpt2")
    assert tree_digest(user) == before
    with pytest.raises(TinyCheckpointError):
        build_tiny_checkpoint(user / "sub" / "notes.txt", "gpt2")  # a file
    assert tree_digest(user) == before
    built = build_tiny_checkpoint(tmp_path / "fresh", "gpt2")  # a new path: built, then reused as is
    digest = tree_digest(built)
    assert build_tiny_checkpoint(built, "gpt2") == built and tree_digest(built) == digest
    assert not [p for p in tmp_path.iterdir() if ".building-" in p.name]  # no staging left behind


@pytest.mark.slow
def test_every_path_option_at_user_files_changes_only_the_workdir(tiny_t5_dir, tmp_path):
    user = tmp_path / "user"
    shutil.copytree(tiny_t5_dir, user / "model")
    shutil.copy(REPO / "data/e2e/devset.csv", user / "train.csv")
    (user / "workdir").mkdir()
    (user / "workdir" / "notes.txt").write_text("the user's own file in the workdir")
    config = small_config(user / "model", user / "workdir", steps=2)
    config.model.tokenizer = str(user / "model")
    config.data.data_files = {"train": str(user / "train.csv"), "validation": str(user / "train.csv")}
    outside = {p: tree_digest(p) if p.is_dir() else p.read_bytes() for p in (user / "model", user / "train.csv")}
    trainer.run(config)
    assert (user / "workdir" / "notes.txt").read_text() == "the user's own file in the workdir"
    assert {p: tree_digest(p) if p.is_dir() else p.read_bytes() for p in outside} == outside
    assert sorted(p.name for p in user.iterdir()) == ["model", "train.csv", "workdir"]


def _poison(monkeypatch, poisoned_steps):
    """Batches of `poisoned_steps` carry a sentinel; the loss of such a batch is NaN (as a bad batch would be)."""
    real_batch, real_loss = data.Batcher.train_batch, train_steps.batch_loss

    def train_batch(self, step):
        batch = real_batch(self, step)
        if step in poisoned_steps:
            batch["target_ids"] = batch["target_ids"].copy()
            batch["target_ids"][0, 0] = -1
        return batch

    def batch_loss(model, spec, params, lm_params, batch, *args, **kwargs):
        total, count = real_loss(model, spec, params, lm_params, {**batch, "target_ids": jnp.maximum(
            batch["target_ids"], 0)}, *args, **kwargs)
        return jnp.where(jnp.any(batch["target_ids"] < 0), jnp.nan, total), count

    monkeypatch.setattr(data.Batcher, "train_batch", train_batch)
    monkeypatch.setattr(train_steps, "batch_loss", batch_loss)


def test_a_nonfinite_step_is_skipped_and_training_goes_on(tiny_t5_dir, tmp_path, monkeypatch):
    _poison(monkeypatch, {2})
    summary = trainer.run(small_config(tiny_t5_dir, tmp_path / "run"))
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 0, 0, 0]
    assert np.isnan(rows[2]["loss"]) and all(np.isfinite(r["train_loss"]) for i, r in enumerate(rows) if i != 2)
    exported, _ = prefix_lib.load_export(summary["export"])
    assert all(np.isfinite(np.asarray(kv.key)).all() for kv in exported.kv.values())


def test_diverging_run_stops_keeps_good_checkpoints_and_exports_nothing(tiny_t5_dir, tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    trainer.run(small_config(tiny_t5_dir, workdir, stop_at=2, save_every=2))
    good = tree_digest(workdir / "checkpoints")
    _poison(monkeypatch, set(range(2, 6)))
    with pytest.raises(trainer.NonFiniteError, match="max_nonfinite_steps"):
        trainer.run(small_config(tiny_t5_dir, workdir, save_every=2, max_nonfinite_steps=1))
    assert tree_digest(workdir / "checkpoints") == good  # no NaN checkpoint rotated the good one out
    assert not (workdir / "export").exists()


def test_sigterm_saves_at_the_step_reached_and_resume_is_exact(tiny_t5_dir, trained_t5_run, tmp_path, monkeypatch):
    straight_dir, straight = trained_t5_run  # the same config run uninterrupted (saves do not change training)
    from prefix_jax import metrics_file

    real_write = metrics_file.MetricsWriter.write

    def write(self, step, metrics):
        real_write(self, step, metrics)
        if step == 3 and "loss" in metrics:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-run, after step 3 is logged

    monkeypatch.setattr(metrics_file.MetricsWriter, "write", write)
    handler_before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted) as info:
        trainer.run(small_config(tiny_t5_dir, tmp_path / "run", steps=6, save_every=100))
    assert info.value.step == 3  # the step it had reached, saved before exiting
    assert checkpoint.manager(tmp_path / "run" / "checkpoints", read_only=True).all_steps() == [3]
    assert signal.getsignal(signal.SIGTERM) == handler_before  # the run's handler is gone with the run
    monkeypatch.setattr(metrics_file.MetricsWriter, "write", real_write)
    resumed = trainer.run(small_config(tiny_t5_dir, tmp_path / "run", steps=6, save_every=100))
    assert resumed["start_step"] == 3
    assert losses(tmp_path / "run") == losses(straight_dir)
    a, b = Path(straight["export"], prefix_lib.EXPORT_WEIGHTS), Path(resumed["export"], prefix_lib.EXPORT_WEIGHTS)
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.slow
def test_train_py_exits_75_on_sigterm_after_saving(tiny_t5_dir, tmp_path):
    args = ["--config", str(REPO / "configs/t5_offline.py"), f"--config.model.name_or_path={tiny_t5_dir}",
            "--config.model.create_tiny=", f"--config.train.workdir={tmp_path / 'run'}", "--config.train.steps=400",
            "--config.train.batch_size=4", "--config.data.max_train_examples=64", "--config.train.log_every=1",
            "--config.data.max_source_length=32", "--config.data.max_target_length=16", "--config.train.save_every=1000"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(read_metrics(tmp_path / "run")) < 2:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, stderr[-3000:]
    steps = checkpoint.manager(tmp_path / "run" / "checkpoints", read_only=True).all_steps()
    assert len(steps) == 1 and steps[0] >= 2 and "Traceback" not in stderr


def test_a_second_run_on_a_busy_workdir_is_refused(tiny_t5_dir, trained_workdir):
    from etils import epath

    with workdir.WorkdirLock(epath.Path(trained_workdir)):  # another live run holds it
        before = tree_digest(trained_workdir)
        with pytest.raises(workdir.WorkdirBusyError, match="in use by another run"):
            trainer.run(small_config(tiny_t5_dir, trained_workdir))
        assert tree_digest(trained_workdir) == before


def test_a_crashed_runs_lock_is_not_stale(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from etils import epath; from prefix_jax.workdir import WorkdirLock; "
        f"WorkdirLock(epath.Path({str(tmp_path)!r})).acquire(); print('held', flush=True); time.sleep(600)")],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    from etils import epath

    with pytest.raises(workdir.WorkdirBusyError, match=f"pid.{{0,3}}{holder.pid}"):
        workdir.WorkdirLock(epath.Path(tmp_path)).acquire()
    holder.kill()
    holder.wait()
    workdir.WorkdirLock(epath.Path(tmp_path)).acquire().release()  # the kernel dropped the dead run's lock


def _largest_file(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["truncate", pytest.param("flip", marks=pytest.mark.slow)])
def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tiny_t5_dir, trained_t5_run, tmp_path, damage):
    straight = trained_t5_run[0]  # the same config run uninterrupted
    run = tmp_path / "run"
    trainer.run(small_config(tiny_t5_dir, run, steps=6, stop_at=4, save_every=2))
    victim = _largest_file(run / "checkpoints" / "4" / "state")
    raw = bytearray(victim.read_bytes())
    if damage == "truncate":
        victim.write_bytes(bytes(raw[: len(raw) // 2]))
    else:
        for i in range(len(raw) // 3, len(raw) // 3 + 16):
            raw[i] ^= 0xFF
        victim.write_bytes(bytes(raw))
    summary = trainer.run(small_config(tiny_t5_dir, run, steps=6, save_every=2))
    assert summary["start_step"] == 2  # the previous good step
    assert losses(run) == losses(straight)
    assert [p.name.split("-")[0] for p in (run / checkpoint.CORRUPT_DIR).iterdir()] == ["4"]  # moved, not deleted


def test_resume_identifies_the_model_by_its_weights_not_its_path(tiny_t5_dir, tmp_path, monkeypatch):
    shutil.copytree(tiny_t5_dir, tmp_path / "copy")
    run = tmp_path / "run"
    trainer.run(small_config(tiny_t5_dir, run, stop_at=2, save_every=2))
    monkeypatch.chdir(tmp_path)
    summary = trainer.run(small_config(Path("./copy"), run, save_every=2))  # same weights, other spelling
    assert summary["start_step"] == 2 and summary["final_step"] == 6


@pytest.mark.slow
def test_resume_anyway_continues_with_a_changed_seed(tiny_t5_dir, tmp_path, caplog):
    run = tmp_path / "run"
    trainer.run(small_config(tiny_t5_dir, run, steps=4, stop_at=2, save_every=2))
    config = small_config(tiny_t5_dir, run, steps=4, save_every=2, resume_anyway=True)
    config.train.seed = 5
    assert trainer.run(config)["start_step"] == 2
    assert "train.seed" in caplog.text


def test_crash_then_resume_writes_no_duplicate_rows_and_keeps_the_first_config(tiny_t5_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_batch = data.Batcher.train_batch

    def crash_at_5(self, step):
        if step == 5:
            raise RuntimeError("simulated crash")
        return real_batch(self, step)

    monkeypatch.setattr(data.Batcher, "train_batch", crash_at_5)
    with pytest.raises(RuntimeError, match="simulated"):
        trainer.run(small_config(tiny_t5_dir, run, steps=6, save_every=4))  # logged 1..5, saved 4
    first_config = (run / "config.json").read_bytes()
    (run / "checkpoints" / "6.orbax-checkpoint-tmp-1").mkdir()  # what a save killed mid-way leaves
    monkeypatch.setattr(data.Batcher, "train_batch", real_batch)
    changed = small_config(tiny_t5_dir, run, steps=6, save_every=4, log_every=1)
    changed.eval.max_generate = 2  # a change that does not affect the replay
    trainer.run(changed)
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert (run / "config.json").read_bytes() == first_config
    assert [json.loads(line)["start_step"] for line in (run / "runs.jsonl").read_text().splitlines()] == [0, 4]
    assert not list((run / "checkpoints").glob("*tmp*"))


@pytest.mark.slow  # a train.py subprocess; test_pipeline keeps one CLI run by default
def test_a_failing_checkpoint_write_ends_the_process(tiny_t5_dir, tmp_path):
    """An exception during a save must not leave Orbax threads that keep the interpreter (and its
    accelerators) alive forever."""
    code = (
        "import sys; import prefix_jax.checkpoint as c; real = c.save\n"
        "def save(mngr, step, *a, **k):\n"
        "    if step >= 2: raise OSError('simulated: no space left on device')\n"
        "    return real(mngr, step, *a, **k)\n"
        "c.save = save\n"
        "import train; sys.exit(train.main(sys.argv))\n")
    args = ["--config", str(REPO / "configs/t5_offline.py"), f"--config.model.name_or_path={tiny_t5_dir}",
            "--config.model.create_tiny=", f"--config.train.workdir={tmp_path / 'run'}", "--config.train.steps=3",
            "--config.train.batch_size=4", "--config.data.max_train_examples=32", "--config.train.save_every=1",
            "--config.optim.warmup_steps=1",
            "--config.data.max_source_length=32", "--config.data.max_target_length=16", "--config.eval.generate=False"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode != 0 and "no space left" in out.stderr
    assert checkpoint.manager(tmp_path / "run" / "checkpoints", read_only=True).all_steps() == [1]


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_gives_the_uninterrupted_export(tiny_t5_dir, tmp_path):
    """SIGKILL anywhere (mid-step, mid-save, mid-export): rerunning until done gives the straight run's prefix."""
    args = lambda workdir: [
        sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs/t5_offline.py"),
        f"--config.model.name_or_path={tiny_t5_dir}", "--config.model.create_tiny=",
        f"--config.train.workdir={workdir}", "--config.train.steps=12", "--config.train.batch_size=4",
        "--config.data.max_train_examples=64", "--config.train.save_every=1", "--config.train.log_every=1",
        "--config.optim.warmup_steps=1",
        "--config.data.max_source_length=32", "--config.data.max_target_length=16", "--config.eval.generate=False"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    began = time.time()
    assert subprocess.run(args(tmp_path / "straight"), env=env, capture_output=True, timeout=600).returncode == 0
    whole_run = time.time() - began  # start-up included, so a kill inside it always lands after some progress
    rng = np.random.default_rng(0)
    for _ in range(5):
        proc = subprocess.Popen(args(tmp_path / "killed"), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=float(rng.uniform(0.5, 0.95)) * whole_run)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert subprocess.run(args(tmp_path / "killed"), env=env, capture_output=True, timeout=600).returncode == 0
    starts = [json.loads(line)["start_step"] for line in (tmp_path / "killed" / "runs.jsonl").read_text().splitlines()]
    assert max(starts) > 0, f"no run resumed: {starts}"
    straight = Path(tmp_path / "straight" / "export" / prefix_lib.EXPORT_WEIGHTS).read_bytes()
    assert Path(tmp_path / "killed" / "export" / prefix_lib.EXPORT_WEIGHTS).read_bytes() == straight
    assert losses(tmp_path / "killed") == losses(tmp_path / "straight")


# --- Trust II ---


@pytest.mark.parametrize("task", ["../../escape", "ABS", ".", "a/b"])
def test_a_task_name_never_escapes_the_workdir(tiny_gpt2_dir, tmp_path, task):
    """Task names become export/<task>/: one that is a path is refused before anything is written."""
    victim = tmp_path / "other_export"
    victim.mkdir()
    (victim / "prefix.json").write_text("another run's export")
    task = str(victim) if task == "ABS" else task
    rows = [{"task": t, "source": f"s{i}", "target": "t"} for i, t in enumerate(["ok", task] * 8)]
    train = tmp_path / "tasks.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = tree_digest(tmp_path)
    config = multitask_config(tiny_gpt2_dir, tmp_path / "deep" / "run", train)
    with pytest.raises(data.DataError, match=r"tasks.jsonl' line 2: task name .* \(data.task_field\)") as info:
        trainer.run(config)
    assert train_cli._is_ours(info.value) and "\n" not in str(info.value)
    assert tree_digest(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == [
        "other_export", "tasks.jsonl"]


@pytest.mark.parametrize("name", [".lock", "config.json", "metrics.jsonl", "runs.jsonl"])
def test_run_files_that_link_out_of_the_workdir_are_refused(tiny_t5_dir, tmp_path, name):
    victim = tmp_path / "victim.txt"
    victim.write_text("another program's file")
    run = tmp_path / "run"
    run.mkdir()
    (run / name).symlink_to(victim)
    with pytest.raises(workdir.WorkdirError, match=f"{name} is a symbolic link to .*victim.txt") as info:
        trainer.run(small_config(tiny_t5_dir, run))
    assert train_cli._is_ours(info.value) and "\n" not in str(info.value)
    assert victim.read_text() == "another program's file" and sorted(p.name for p in run.iterdir()) == [name]


def test_the_lock_never_follows_a_link(tmp_path):
    """Even a link inside the workdir (which the config check lets pass for other files) is not opened."""
    from etils import epath

    (tmp_path / "data.txt").write_text("keep me")
    (tmp_path / ".lock").symlink_to(tmp_path / "data.txt")
    with pytest.raises(workdir.WorkdirError, match="lock file .lock cannot be opened"):
        workdir.WorkdirLock(epath.Path(tmp_path)).acquire()
    assert (tmp_path / "data.txt").read_text() == "keep me"
    (tmp_path / ".lock").unlink()
    os.mkfifo(tmp_path / ".lock")
    with pytest.raises(workdir.WorkdirError, match="not a regular file"):
        workdir.WorkdirLock(epath.Path(tmp_path)).acquire()


def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not shutil.which("unshare") or not _unshare_works(), reason="needs user namespaces (unshare -rm)")
def test_an_existing_workdir_on_a_read_only_filesystem_is_refused_before_loading(trained_workdir, tmp_path):
    """train.py in a mount namespace where the workdir is a read-only bind mount: exit 2, one line, no traceback."""
    run = tmp_path / "run"
    shutil.copytree(trained_workdir, run)
    before = tree_digest(run)
    code = ("import sys, train; from prefix_jax.models import sharded_load\n"
            "def refuse(*a, **k): raise AssertionError('the LM was loaded first')\n"
            "sharded_load.load_sharded = refuse; sys.exit(train.main(sys.argv))\n")
    args = ["--config", str(REPO / "configs/t5_offline.py"), f"--config.train.workdir={run}",
            "--config.model.name_or_path=/nonexistent-model", "--config.model.create_tiny="]
    script = f'mount --bind "{run}" "{run}" && mount -o remount,bind,ro "{run}" && exec "$@"'
    out = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", sys.executable, "-c", code, *args], cwd=REPO,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert last.startswith("error: train.workdir=") and "not writable" in last, last
    assert tree_digest(run) == before


def test_an_eval_batch_that_does_not_split_names_train_eval_batch_size(tiny_t5_dir, tmp_path, monkeypatch):
    from prefix_jax import sharding

    monkeypatch.setattr(sharding, "batch_shards", lambda mesh: 2)  # as on 2 devices (the test process has one)
    config = small_config(tiny_t5_dir, tmp_path / "run")
    config.train.eval_batch_size = 7
    with pytest.raises(ValueError, match=r"^train.eval_batch_size=7 must be a multiple of .* = 2\); use 6") as info:
        trainer.run(config)
    assert train_cli._is_ours(info.value) and not (tmp_path / "run").exists()


def _lowered_step_size(lm, tasks: int) -> int:
    from prefix_jax import optim

    spec = prefix_lib.PrefixSpec(length=4, placements=("decoder",), geometry=lm.config.prefix_geometry(),
                                 hidden_size=lm.config.hidden_size, mlp_hidden=16,
                                 tasks=tuple(f"t{i}" for i in range(tasks)))
    params = jax.eval_shape(lambda: prefix_lib.init_params(spec, jax.random.key(0)))  # shapes only: no work
    tx, schedule = optim.make_optimizer(params, learning_rate=1e-3, total_steps=10, warmup_steps=1,
                                        weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, max_grad_norm=1.0)
    state = jax.eval_shape(lambda p: train_steps.init_state(p, tx, jax.random.key(1)), params)
    ones = np.ones((4, 8), np.int32)
    batch = {"source_ids": ones, "source_mask": ones, "target_ids": ones, "target_mask": ones,
             "task_ids": np.arange(4, dtype=np.int32)}
    return len(train_steps.jit_train_step(lm.model, spec, tx, schedule).lower(state, lm.params, batch).as_text())


def test_the_train_step_does_not_grow_with_the_number_of_tasks(tiny_gpt2_dir):
    """The bank is data: T prefixes are one tree with a task axis, gathered per row, never a per-task op (1000
    tasks used to compile for minutes at 12 GB)."""
    from prefix_jax import prefix_bank
    from prefix_jax.models import load_pretrained

    lm = load_pretrained(str(tiny_gpt2_dir))
    small, large = _lowered_step_size(lm, 2), _lowered_step_size(lm, 16)
    assert large < 1.02 * small, (small, large)
    # ... and the stacked bank is exactly the per-task prefixes stacked.
    spec = prefix_lib.PrefixSpec(length=3, placements=("decoder",), geometry=lm.config.prefix_geometry(),
                                 hidden_size=lm.config.hidden_size, mlp_hidden=16, tasks=("a", "b", "c"))
    params = prefix_lib.init_params(spec, jax.random.key(2))
    bank = prefix_lib.materialize(params, spec)
    one = prefix_lib.single_task(spec)
    per_task = prefix_bank.stack([prefix_lib.materialize(prefix_lib.task_params(params, spec, t), one)
                                  for t in spec.tasks])
    for got, want in zip(jax.tree.leaves(bank), jax.tree.leaves(per_task)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_sigterm_before_the_first_step_stops_at_once_with_nothing_half_written(tiny_t5_dir, tmp_path, monkeypatch):
    """A signal while the data is read (or the first step compiles) stops the run at once: exit 75's exception,
    no checkpoint, the workdir's files whole; the same command then runs to the end."""
    real_read = data.read_examples
    real_jit = train_steps.jit_train_step

    def read_then_signal(*args, **kwargs):
        examples = real_read(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # the handler runs at the next bytecode, here
        return examples

    handler_before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(data, "read_examples", read_then_signal)
    with pytest.raises(Preempted) as info:
        trainer.run(small_config(tiny_t5_dir, tmp_path / "run"))
    assert info.value.step is None and not (tmp_path / "run").exists()
    assert signal.getsignal(signal.SIGTERM) == handler_before
    monkeypatch.setattr(data, "read_examples", real_read)

    def jit_then_signal(*args, **kwargs):
        step = real_jit(*args, **kwargs)

        def first_call(*a, **k):  # the signal comes while the first step is compiled
            os.kill(os.getpid(), signal.SIGTERM)
            return step(*a, **k)

        return first_call

    monkeypatch.setattr(train_steps, "jit_train_step", jit_then_signal)
    with pytest.raises(Preempted, match="before this run finished a step"):
        trainer.run(small_config(tiny_t5_dir, tmp_path / "run"))
    assert {p.name for p in (tmp_path / "run").iterdir()} - {"tensorboard"} == {".lock", "checkpoints", "config.json",
                                                                                 "runs.jsonl"}
    assert not list((tmp_path / "run" / "checkpoints").iterdir())
    json.loads((tmp_path / "run" / "config.json").read_text())
    monkeypatch.setattr(train_steps, "jit_train_step", real_jit)
    assert trainer.run(small_config(tiny_t5_dir, tmp_path / "run"))["final_step"] == 6


def test_a_signal_during_a_long_native_call_ends_the_process_with_75(tmp_path):
    """The main thread in native code (as in an XLA compile) cannot run Python's handler: the watcher exits 75."""
    code = ("import os, signal, threading, time, zlib\n"
            "from prefix_jax.preemption import StopSignal\n"
            "blob = os.urandom(300 << 20)\n"
            "with StopSignal(grace_s=1.0):\n"
            "    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()\n"
            "    began = time.monotonic()\n"
            "    zlib.compress(blob, 9)  # seconds in C, never back in the interpreter\n"
            "    print('native call ended after', time.monotonic() - began)\n")
    began = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == EXIT_PREEMPTED and "native call ended" not in out.stdout, (out.stdout, out.stderr[-2000:])
    assert "native call" in out.stderr and time.monotonic() - began < 60


def test_sigterm_during_the_export_ends_a_complete_run(tiny_t5_dir, tmp_path, monkeypatch, caplog):
    """After the last step a signal no longer stops anything half-way (it used to kill the process: 143)."""
    real_export = trainer.export

    def export_with_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_export(*args, **kwargs)

    monkeypatch.setattr(trainer, "export", export_with_signal)
    summary = trainer.run(small_config(tiny_t5_dir, tmp_path / "run"))
    assert summary["final_step"] == 6 and Path(summary["export"], prefix_lib.EXPORT_WEIGHTS).is_file()
    assert "after the last step: the run is complete" in caplog.text


def test_a_full_disk_during_a_save_is_one_line_keeps_the_last_good_step_and_no_temp(tiny_t5_dir, tmp_path,
                                                                                   monkeypatch):
    """Orbax's failure (an OSError ENOSPC wrapped in its own errors, a temp directory left) as it comes out of a
    full disk."""
    import errno

    import orbax.checkpoint as ocp

    real_save = ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
        if step >= 6:
            (Path(self.directory) / f"{step}.orbax-checkpoint-tmp-1234").mkdir()
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError as disk:
                raise RuntimeError("tensorstore write failed") from disk
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    run = tmp_path / "run"
    with pytest.raises(checkpoint.CheckpointWriteError) as info:
        trainer.run(small_config(tiny_t5_dir, run))
    message = str(info.value)
    assert train_cli._is_ours(info.value) and "\n" not in message, message
    assert "step 6" in message and "No space left on device" in message and "steps [3] were kept" in message
    assert checkpoint.manager(run / "checkpoints", read_only=True).all_steps() == [3]
    assert not list((run / "checkpoints").glob("*tmp*"))  # a rerun resumes from step 3 (as after any crash)


def test_false_library_warnings_are_silenced_and_true_ones_kept(tmp_path, caplog):
    import logging

    from prefix_jax import log_filters

    log_filters.install()
    caplog.set_level("INFO")
    checkpoint.manager(tmp_path / "checkpoints", read_only=True).close()  # Orbax: "Given directory is read only"
    bridge = logging.getLogger("jax._src.xla_bridge")
    bridge.info("Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so: libtpu.so: cannot open "
                "shared object file: No such file or directory")  # a CPU host: no libtpu at all
    bridge.info("Unable to initialize backend 'tpu': INTERNAL: the TPU is already in use by process 7")  # true
    logging.getLogger("absl").error("Save Finalize thread failed: No space left on device")  # said in one line
    logging.getLogger("absl").error("something else broke")
    assert "read only" not in caplog.text and "libtpu.so" not in caplog.text and "No space" not in caplog.text
    assert "already in use by process 7" in caplog.text and "something else broke" in caplog.text


def test_an_override_below_a_missing_field_names_the_flag():
    out = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs/t5_offline.py"),
                          "--config.train.foo.bar=1"], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PREFIX_JAX_HUGE_PAGES": "0"})
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == "error: --config.train.foo.bar: the config has no field 'foo'"


def test_a_demo_run_refused_for_its_data_builds_no_model(tmp_path):
    """The offline demo's tiny model is built only after the data (and the workdir) passed their checks."""
    from configs import t5_offline

    config = t5_offline.get_config()
    config.model.name_or_path = str(tmp_path / "artifacts" / "tiny-t5")
    config.train.workdir = str(tmp_path / "run")
    config.data.data_files = {"train": str(tmp_path / "missing.csv"), "validation": str(tmp_path / "missing.csv")}
    with pytest.raises(data.DataError, match="data.data_files"):
        trainer.run(config)
    assert list(tmp_path.iterdir()) == []
