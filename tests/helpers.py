"""Helpers several test files share: the small run configs, reading a run's files, and starting processes
(`train.py`, or N cooperating processes on 127.0.0.1 behind one coordinator port)."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

from configs import gpt2_e2e_offline, t5_offline
from prefix_jax.metrics_file import read_metrics

REPO = Path(__file__).resolve().parent.parent


def small_config(model_dir: Path, workdir: Path, **train):
    """The tiny T5 run most trainer tests share. Keep `train.steps` at its default (6) where a test can: the
    step count is a constant of the learning-rate schedule inside the compiled step, so runs with the same count
    reuse one compiled program (the session's XLA cache) and runs with another compile their own."""
    c = t5_offline.get_config()
    c.model.name_or_path = str(model_dir)
    c.model.create_tiny = ""
    c.data.max_source_length, c.data.max_target_length = 32, 16
    c.data.max_train_examples, c.data.max_eval_examples = 64, 8
    c.prefix.length, c.prefix.mlp_hidden = 4, 16
    c.optim.warmup_steps = 1
    c.train.workdir = str(workdir)
    c.train.batch_size, c.train.steps, c.train.log_every, c.train.eval_every, c.train.save_every = 4, 6, 1, 0, 3
    for k, v in train.items():
        c.train[k] = v
    return c


def multitask_config(model_dir: Path, workdir: Path, train_file: Path):
    """A 3-step run of the tiny GPT-2 on a `fields` file with a `task` column (one prefix per task)."""
    c = gpt2_e2e_offline.get_config()
    c.model.name_or_path, c.model.create_tiny = str(model_dir), ""
    c.data.format, c.data.task_field = "fields", "task"
    c.data.data_files.train = c.data.data_files.validation = str(train_file)
    c.data.max_source_length, c.data.max_target_length = 48, 24
    c.prefix.length, c.prefix.mlp_hidden = 4, 16
    c.eval.max_generate, c.generate.max_new_tokens = 6, 6
    c.train.workdir, c.train.steps, c.train.batch_size, c.train.log_every = str(workdir), 3, 8, 1
    c.optim.warmup_steps = 1
    return c


def losses(workdir: Path) -> dict[int, float]:
    """step -> training loss, from the run's metrics file."""
    return {row["step"]: row["loss"] for row in read_metrics(workdir) if "loss" in row}


def tree_digest(directory: Path) -> str:
    """One hash of every file's relative path and bytes under `directory`: equal iff nothing changed."""
    h = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(directory)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def cpu_env(devices: int | None = None, **extra: str) -> dict[str, str]:
    """This process's environment for a child on CPU, offline, with `devices` simulated host devices if given."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", **extra}
    if devices is not None:
        env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    return env


def users_env(**extra: str) -> dict[str, str]:
    """`cpu_env()` with XLA compiling as it does for a user (none of the tests' compile-time settings, see
    conftest.py): for the runs that stand for the user's commands."""
    return cpu_env(XLA_FLAGS=os.environ.get("PREFIX_JAX_TEST_USERS_XLA_FLAGS", ""), **extra)


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`python train.py ARGS` on CPU, offline; its output captured."""
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=cpu_env(),
                          capture_output=True, text=True, timeout=600)


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on now (for a coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(argv: list[str], num_processes: int, devices_each: int, timeout: float = 600,
                  **extra_env: str) -> list[tuple[int, str, str]]:
    """`argv` started as `num_processes` cooperating processes, each with `devices_each` CPU devices, told the
    coordinator (127.0.0.1, a free port), the process count and its id through train.py's `mesh` flags;
    `extra_env` added to each one's environment.

    Returns (exit code, stdout, stderr) per process id, after all have exited.
    """
    port = free_port()
    mesh = [f"--config.mesh.coordinator_address=127.0.0.1:{port}", f"--config.mesh.num_processes={num_processes}"]
    procs = [subprocess.Popen(argv + mesh + [f"--config.mesh.process_id={i}"], env=cpu_env(devices_each, **extra_env),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(num_processes)]
    outputs = [p.communicate(timeout=timeout) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]
