"""Data parallelism: 8 simulated devices, and 2 processes x 4 devices, train like one device does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, cpu_env, run_processes
from tolerances import F32_REORDERED_RTOL

from prefix_jax.metrics_file import read_metrics


def args(model_dir: Path, workdir: Path) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs/t5_offline.py"),
            f"--config.model.name_or_path={model_dir}", "--config.model.create_tiny=",
            f"--config.train.workdir={workdir}", "--config.train.steps=4", "--config.train.batch_size=8",
            "--config.train.log_every=1", "--config.optim.warmup_steps=1", "--config.data.max_train_examples=64",
            "--config.data.max_eval_examples=16", "--config.data.max_source_length=32",
            "--config.data.max_target_length=16", "--config.eval.max_generate=8", "--config.generate.max_new_tokens=8"]


def losses(workdir: Path) -> list[float]:
    return [row["loss"] for row in read_metrics(workdir) if "loss" in row]


def final_eval(workdir: Path) -> dict:
    return [row for row in read_metrics(workdir) if "eval_loss" in row][-1]


@pytest.fixture(scope="module")
def one_device(tiny_t5_dir, tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("one")
    out = subprocess.run(args(tiny_t5_dir, workdir), env=cpu_env(1), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir


@pytest.mark.slow
def test_eight_devices_match_one(tiny_t5_dir, one_device, tmp_path):
    out = subprocess.run(args(tiny_t5_dir, tmp_path) + ["--config.mesh.num_devices=8"], env=cpu_env(8),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    np.testing.assert_allclose(losses(tmp_path), losses(one_device), rtol=F32_REORDERED_RTOL)
    assert len(losses(tmp_path)) == 4
    np.testing.assert_allclose(final_eval(tmp_path)["eval_loss"], final_eval(one_device)["eval_loss"],
                               rtol=F32_REORDERED_RTOL)


@pytest.mark.slow
def test_two_processes_match_one(tiny_t5_dir, one_device, tmp_path):
    for returncode, _, err in run_processes(args(tiny_t5_dir, tmp_path), num_processes=2, devices_each=4):
        assert returncode == 0, err[-3000:]
    np.testing.assert_allclose(losses(tmp_path), losses(one_device), rtol=F32_REORDERED_RTOL)
    np.testing.assert_allclose(final_eval(tmp_path)["eval_loss"], final_eval(one_device)["eval_loss"],
                               rtol=F32_REORDERED_RTOL)
    assert (tmp_path / "checkpoints" / "4").is_dir()


@pytest.mark.slow
def test_a_checkpoint_resumes_on_another_topology(tiny_t5_dir, one_device, tmp_path):
    """Saved by 8 devices with the LM sharded (fsdp x model), resumed by 1 device, and the other way round:
    the trainable state is restored onto the new mesh and the run ends where the one-device run does."""
    eight = ["--config.mesh.num_devices=8", "--config.mesh.shape=(2,2,2)"]
    for first, second, name in ((eight, [], "8-then-1"), ([], eight, "1-then-8")):
        workdir = tmp_path / name
        out = subprocess.run(args(tiny_t5_dir, workdir) + first + ["--config.train.stop_at=2"],
                             env=cpu_env(8 if first else 1), capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        out = subprocess.run(args(tiny_t5_dir, workdir) + second, env=cpu_env(8 if second else 1), capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "resumed from step 2" in out.stderr
        np.testing.assert_allclose(losses(workdir), losses(one_device), rtol=F32_REORDERED_RTOL)
        np.testing.assert_allclose(final_eval(workdir)["eval_loss"], final_eval(one_device)["eval_loss"],
                                   rtol=F32_REORDERED_RTOL)
