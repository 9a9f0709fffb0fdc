"""Every config value checked in one place, before anything is loaded or written.

`check(config)` raises `ConfigError` with a one-line message that names the field, the value and what
would be valid; `run_options.from_config` calls it before turning the config into typed options. Checks
that need the model (placements, position tables) or the data (batch size vs examples) live where those
are known, in `run_setup`; everything that the config alone decides is here.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Callable

from etils import epath

from prefix_jax import workdir as workdir_lib
from prefix_jax.models.fused_attention import ATTENTION_KERNELS
from prefix_jax.text_metrics import METRICS


class ConfigError(ValueError):
    """A config value is invalid; the message names the field and the fix."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


# (field, test, what a valid value is). Fields are "group.name"; the test gets the value.
Rule = tuple[str, Callable[[Any], bool], str]

_RULES: tuple[Rule, ...] = (
    ("model.name_or_path", lambda v: isinstance(v, str) and v.strip() != "",
     "a Hugging Face Hub id or a local checkpoint directory"),
    ("model.param_dtype", lambda v: v in ("float32", "bfloat16"), "one of 'float32', 'bfloat16'"),
    ("model.compute_dtype", lambda v: v in ("", "float32", "bfloat16"), "'' (= param_dtype), 'float32' or 'bfloat16'"),
    ("model.attention_kernel", lambda v: v in ATTENTION_KERNELS, f"one of {ATTENTION_KERNELS}"),
    ("prefix.length", lambda v: _is_int(v) and v >= 0, "an integer >= 1 (0 with prefix.init='words')"),
    ("prefix.mlp_hidden", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    ("prefix.dropout", lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("prefix.init_fit_steps", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    ("prefix.init_fit_learning_rate", lambda v: _is_number(v) and v > 0, "a finite number > 0"),
    ("data.max_source_length", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    ("data.max_target_length", lambda v: _is_int(v) and v >= 2, "an integer >= 2 (a token and EOS)"),
    ("data.max_train_examples", lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0: all)"),
    ("data.max_eval_examples", lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0: all)"),
    ("data.pack", lambda v: isinstance(v, bool), "True or False"),
    ("data.pack_width", lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0: the longest example)"),
    ("data.train_split", lambda v: isinstance(v, str) and v != "", "a split name, e.g. 'train'"),
    ("train.workdir", lambda v: isinstance(v, str) and v.strip() != "", "a directory for this run's outputs"),
    ("train.batch_size", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    ("train.eval_batch_size", lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0: train.batch_size)"),
    ("train.epochs", lambda v: _is_number(v) and v >= 0, "a finite number >= 0"),
    ("train.steps", lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0: from train.epochs)"),
    ("train.stop_at", lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0: run every step)"),
    ("train.seed", lambda v: _is_int(v) and 0 <= v < 2**32, "an integer in [0, 2**32)"),
    ("train.label_smoothing", lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("train.loss_chunk_tokens", lambda v: _is_int(v) and v >= 0,
     "an integer >= 0 (target tokens per chunk of the loss; 0: off)"),
    ("train.log_every", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    ("train.eval_every", lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0: only at the end)"),
    ("train.save_every", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    ("train.keep_checkpoints", lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0: keep all)"),
    ("train.grad_accum_steps", lambda v: _is_int(v) and v >= 1, "an integer >= 1 (micro-batches per step)"),
    ("train.prefetch_depth", lambda v: _is_int(v) and v >= 1, "an integer >= 1 (batches prepared ahead)"),
    ("train.max_nonfinite_steps", lambda v: _is_int(v) and v >= 0,
     "an integer >= 0 (non-finite steps skipped in a row before the run stops)"),
    ("eval.max_generate", lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0: all)"),
    ("generate.num_beams", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    ("generate.max_new_tokens", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    ("generate.length_penalty", _is_number, "a finite number"),
    ("optim.learning_rate", lambda v: _is_number(v) and v > 0, "a finite number > 0"),
    ("optim.warmup_steps", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    ("optim.weight_decay", lambda v: _is_number(v) and v >= 0, "a finite number >= 0"),
    ("optim.max_grad_norm", lambda v: _is_number(v) and v >= 0, "a finite number >= 0 (0: no clipping)"),
    ("optim.b1", lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("optim.b2", lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("optim.eps", lambda v: _is_number(v) and v > 0, "a finite number > 0"),
    ("mesh.num_devices", lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0: all devices)"),
    ("mesh.num_processes", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
)


def _get(config: Any, field: str) -> Any:
    value = config
    for part in field.split("."):
        value = value[part]
    return value


def check(config: Any) -> None:
    """Raises `ConfigError` for the first invalid value of `config` (a resolved ml_collections config)."""
    for field, test, valid in _RULES:
        try:
            value = _get(config, field)
        except (KeyError, AttributeError):
            continue  # a config without this field (a trimmed one in a test) uses the default behaviour
        if not test(value):
            raise ConfigError(f"{field}={value!r} is invalid: it must be {valid}.")
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
    for name in config.eval.metrics:
        if name not in METRICS:
            raise ConfigError(f"eval.metrics has {name!r}; choose from {METRICS}.")
    for pattern in config.optim.frozen:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"optim.frozen has an invalid regex {pattern!r} ({e}).") from None
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
