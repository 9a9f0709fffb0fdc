"""The checks across config fields and of the workdir, before anything is loaded or written.

Each field alone is checked against its declaration (`run_options`, `config_fields.option`);
`check(config)` raises `ConfigError` with a one-line message for combinations that cannot run and for a
workdir that cannot hold the run. `run_options.check` calls both. Checks that need the model (placements,
position tables) or the data (batch size vs examples) live where those are known, in `run_setup`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from etils import epath

from prefix_jax import workdir as workdir_lib
from prefix_jax.config_fields import ConfigError


def check(config: Any) -> None:
    """Raises `ConfigError` for the first combination of `config`'s values that cannot run (each value alone was
    checked against its declaration: `run_options.check`), or a workdir that cannot hold the run."""
    if not config.train.steps and not config.train.epochs:
        raise ConfigError("train.steps=0 and train.epochs=0 give no step to run; set one of them.")
    if config.train.stop_at and config.train.steps and config.train.stop_at > config.train.steps:
        raise ConfigError(f"train.stop_at={config.train.stop_at} is after the last step (train.steps="
                          f"{config.train.steps}); lower it or leave it 0.")
    if not 0 <= config.mesh.process_id < config.mesh.num_processes:
        raise ConfigError(f"mesh.process_id={config.mesh.process_id} must be in [0, mesh.num_processes="
                          f"{config.mesh.num_processes}).")
    if config.data.get("task_field") and config.data.format != "fields":
        raise ConfigError(f"data.task_field={config.data.task_field!r} needs data.format='fields' (a task column "
                          f"beside source and target); data.format is {config.data.format!r}.")
    if config.prefix.init == "words" and not config.prefix.init_text:
        raise ConfigError('prefix.init="words" needs prefix.init_text, e.g. "table-to-text:" or "summarize".')
    if config.train.eval_only and not config.data.eval_split:
        raise ConfigError("train.eval_only needs data.eval_split.")
    check_workdir(config.train.workdir)


def is_remote(path: str) -> bool:
    """A path of an object store or other non-local filesystem (`gs://bucket/run`, `s3://...`)."""
    return "://" in str(path)


def check_workdir(workdir: str) -> None:
    """The workdir is a writable directory whose run files are not links out of it, or can be made one (its
    nearest existing ancestor is a writable directory)."""
    if is_remote(workdir):
        return
    path = Path(workdir).expanduser().absolute()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"train.workdir={workdir!r} is a file, not a directory; choose another path.")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"train.workdir={workdir!r} is not writable (a read-only filesystem, or no permission); "
                              "a run writes its lock, metrics and checkpoints there: choose another train.workdir.")
        workdir_lib.check_run_files(path)
        return
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"train.workdir={workdir!r} cannot be created: {str(parent)!r} is a file.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"train.workdir={workdir!r} cannot be created: {str(parent)!r} is not writable.")


def workdir_path(workdir: str) -> epath.Path:
    """The workdir as a path every run file goes through (local disk or an object store, same code)."""
    return epath.Path(workdir if is_remote(workdir) else Path(workdir).expanduser().absolute())
