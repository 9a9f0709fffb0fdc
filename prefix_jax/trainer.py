"""A training run from its config to an exported prefix: resume or start, the jitted step loop, evaluations,
checkpoints and the export.

`run(config)` is what `train.py` calls (tests call it in-process on tiny models). It reads the config once
(`run_options.from_config`), builds everything the loop needs (`run_setup.build`), then owns the workdir:
the lock, config.json, metrics, checkpoints, predictions and export/.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import sys
import time
from typing import Any

import jax
import numpy as np

from prefix_jax import checkpoint, checkpoint_meta, evaluation, optim, preemption, prefetch, run_options
from prefix_jax import log_filters, run_setup, sharding, train_steps
from prefix_jax import workdir as workdir_lib
from prefix_jax.config_checks import ConfigError
from prefix_jax import prefix as prefix_lib
from prefix_jax import prefix_init
from prefix_jax.generate import make_generate_fn
from prefix_jax.metrics_file import MetricsWriter
from prefix_jax.models import sharded_load
from prefix_jax.run_setup import RunPlan

log = logging.getLogger("prefix_jax")


def evaluate(plan: RunPlan, step: int, params: Any, lm_params: Any, eval_fn: Any, generate_fn: Any) -> dict:
    """Eval-split loss, and (if configured) decoded outputs scored with the configured metrics, written to a new
    `predictions_<split>_<step>[_eval_only].jsonl` (`evaluation.predictions_path`: nothing is overwritten)."""
    split, eval_only = plan.options.data.eval_split, plan.options.train.eval_only
    if jax.process_index() == 0:
        log.info("evaluating step %d on the %r split (%d examples)", step, split, len(plan.eval.split))
    result = evaluation.loss(plan.eval, plan.mesh, params, lm_params, eval_fn)
    if generate_fn is not None:
        path = evaluation.predictions_path(plan.workdir, split, step, eval_only)
        scores = evaluation.generate_and_score(
            plan.eval, plan.mesh, plan.tokenizer, plan.spec, params, lm_params, generate_fn,
            plan.options.eval.metrics, plan.options.eval.max_generate, path)
        result.update(scores)
        if jax.process_index() == 0:
            log.info("decoded outputs of step %d: %s", step, path)
    return result


def config_lines(config: dict, defaults: dict | None = None, prefix: str = "") -> str:
    """The config as `group.field = value` lines of plain Python values; with `defaults`, only the fields that
    differ from them (the whole config when nothing differs would be empty: then it says so)."""
    lines = []
    for key, value in config.items():
        default = (defaults or {}).get(key, _MISSING) if defaults is not None else _MISSING
        if isinstance(value, dict):
            below = None if defaults is None else (default if isinstance(default, dict) else {})
            inner = config_lines(value, below, f"{prefix}{key}.")
            lines += [inner] if inner else []
        elif defaults is None or default is _MISSING or _plain(value) != _plain(default):
            lines.append(f"  {prefix}{key} = {_plain(value)!r}")
    text = "\n".join(lines)
    return text if text or prefix else "  (all defaults)"


_MISSING = object()


def _plain(value: Any) -> Any:
    """Tuples and lists alike (a config's sequences are tuples; JSON round trips make lists)."""
    return tuple(_plain(v) for v in value) if isinstance(value, (list, tuple)) else value


@dataclasses.dataclass
class Resume:
    """The checkpoint a run continues from, found before anything is written."""

    step: int
    state: train_steps.TrainState
    corrupt_steps: list[int]  # newer steps that failed to restore or verify
    latest_seen: int  # the newest step in the workdir when it was read


def find_resume(plan: RunPlan, tx: Any, meta: dict) -> Resume | None:
    """Reads (never writes) the workdir's checkpoints: the newest good one, checked against this run."""
    train, saved = plan.options.train, plan.saved
    if not saved.steps:
        if train.eval_only:
            raise ConfigError(f"train.eval_only: {plan.workdir} holds no checkpoint to evaluate; set "
                              "train.workdir to a run's directory.")
        return None
    if not train.resume:
        raise ConfigError(f"train.workdir={str(plan.workdir)!r} already holds a checkpoint (step {max(saved.steps)}) "
                          "and train.resume=False; it was left untouched. Use a new train.workdir or "
                          "--config.train.resume=True.")
    if saved.meta is not None:
        saved_meta = {k: v for k, v in saved.meta.items() if k != "resume"} if train.eval_only else saved.meta
        checkpoint_meta.check_compatible(saved_meta, meta, str(plan.workdir), train.resume_anyway)
    template = fresh_state(plan, tx, fit_to_words=False)  # only its shapes and shardings are used
    mngr = checkpoint.manager(plan.workdir / "checkpoints", read_only=True)
    try:
        step, state, _, corrupt = checkpoint.restore_latest_good(mngr, checkpoint.abstract(template))
    finally:
        mngr.close()
    return Resume(step, state, corrupt, max(saved.steps))


def fresh_state(plan: RunPlan, tx: Any, *, fit_to_words: bool = True) -> train_steps.TrainState:
    """A new train state from `train.seed`: random prefix (with `fit_to_words`, fitted to the LM's activations on
    `prefix.init_text` when `prefix.init="words"`), zero optimizer state, replicated on the mesh."""
    spec, prefix_options = plan.spec, plan.options.prefix
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(plan.options.train.seed))
    params = prefix_lib.init_params(spec, init_rng)
    if fit_to_words and plan.init_ids:
        one = prefix_lib.single_task(spec)
        init = lambda p: prefix_init.init_from_text(one, p, plan.lm.model, plan.lm.params, plan.init_ids,
                                                    prefix_options.init_fit_steps,
                                                    prefix_options.init_fit_learning_rate)
        fitted = {task: init(task_params) for task, task_params in prefix_lib.split_tasks(params, spec).items()}
        params = prefix_lib.join_tasks({task: f[0] for task, f in fitted.items()}, spec)
        report = {task: f[1] for task, f in fitted.items()}
        log.info("prefix initialised from %r: %s", prefix_options.init_text, report.get("", report))
    return sharding.replicate(train_steps.init_state(params, tx, state_rng), plan.mesh)


class NonFiniteError(RuntimeError):
    """Training produced non-finite values for more steps in a row than `train.max_nonfinite_steps` allows."""


def run(config: Any) -> dict:
    """Trains a prefix as `config` says (or only evaluates it: `train.eval_only`); returns a summary.

    Raises `ValueError` subclasses for bad input (before anything is written), `NonFiniteError` when training
    diverges (the last good checkpoint is kept), and `preemption.Preempted` on SIGTERM/SIGINT (after saving the
    step reached; or at once, before any step finished: see `preemption`).
    """
    options = run_options.from_config(config)  # the only read of `config`
    log_filters.install()
    run_setup.start_processes(options.mesh)  # before anything touches a device (StopSignal asks the process count)
    with preemption.StopSignal() as stop:
        summary = _run(options, stop)
    if stop.received is not None:
        log.warning("received %s after the last step: the run is complete", signal.Signals(stop.received).name)
    return summary


def optimizer_for(plan: RunPlan) -> tuple[Any, Any]:
    """(optimizer, learning-rate schedule) of the run (`optim.*`, `plan.total_steps`); it needs only the prefix
    tree's paths and shapes."""
    o = plan.options.optim
    shapes = jax.eval_shape(lambda key: prefix_lib.init_params(plan.spec, key), jax.random.PRNGKey(0))
    return optim.make_optimizer(shapes, learning_rate=o.learning_rate, total_steps=plan.total_steps,
                                warmup_steps=o.warmup_steps, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps,
                                max_grad_norm=o.max_grad_norm or None, frozen=o.frozen)


def train_step_for(plan: RunPlan, tx: Any, schedule: Any) -> Any:
    """The run's jitted train step on its mesh: `step(state, lm_params, batch) -> (state, metrics)`, the state
    replicated and donated, the LM in its own shardings, the batch split over the data axes."""
    c, mesh = plan.options, plan.mesh
    return train_steps.jit_train_step(
        plan.lm.model, plan.spec, tx, schedule, c.train.label_smoothing, state_sharding=sharding.replicated(mesh),
        lm_sharding=sharded_load.shardings_of(plan.lm.params), batch_sharding=sharding.batch_sharding(mesh),
        grad_accum_steps=c.train.grad_accum_steps, shard_prefix=lambda prefix: prefix_lib.constrain_kv(prefix, mesh),
        loss_chunk_tokens=c.train.loss_chunk_tokens)


def _run(options: run_options.RunOptions, stop: preemption.StopSignal) -> dict:
    """`run`, with `stop` catching signals throughout."""
    def offline_demo() -> None:  # after the data is read: a run refused for its data builds nothing
        with stop.deferred():  # a signal does not leave a half-built tiny model
            run_setup.prepare_offline_demo(options.model)

    plan = run_setup.build(options, before_lm=offline_demo)
    c = plan.options  # the config's groups, typed (run_options)
    is_main = jax.process_index() == 0

    tx, schedule = optimizer_for(plan)
    meta = checkpoint_meta.run_metadata(plan)
    resume = find_resume(plan, tx, meta)  # everything above only read; the lock is the first write

    lock = workdir_lib.WorkdirLock(plan.workdir) if is_main else None
    closers: list[Any] = []
    try:
        with stop.deferred():  # the workdir's first writes finish before a signal stops the run
            if lock is not None:
                lock.acquire()
                closers.append(lock.release)
            ckpt_dir = plan.workdir / "checkpoints"
            mngr = checkpoint.manager(ckpt_dir, c.train.keep_checkpoints or None, read_only=c.train.eval_only)
            closers.insert(0, mngr.close)
            if mngr.latest_step() != (resume.latest_seen if resume else None):
                raise ConfigError(f"train.workdir={str(plan.workdir)!r} changed while this run started (another "
                                  "run wrote to it); rerun the command.")
            if resume is not None and resume.corrupt_steps and not c.train.eval_only and is_main:
                checkpoint.set_aside(ckpt_dir, resume.corrupt_steps)
                mngr.reload()
            if is_main:
                log.info("config (the fields that differ from configs/default.py; every field is in %s/config.json, "
                         "each run's in runs.jsonl):\n%s", plan.workdir,
                         config_lines(c.config, run_options.default_config().to_dict()))
                workdir_lib.record_run(plan.workdir, c.config, "eval_only" if c.train.eval_only else "train",
                                       resume.step if resume else 0)
        state = resume.state if resume is not None else fresh_state(plan, tx)
        if resume is not None:
            log.info("resumed from step %d", resume.step)
        writer = MetricsWriter(plan.workdir, enabled=is_main)
        closers.insert(0, writer.close)
        summary = _loop(plan, state, tx, schedule, meta, mngr, writer, lock, stop)
    finally:
        failed = sys.exc_info()[1] is not None
        for close in closers:
            try:
                close()
            except Exception as e:  # noqa: BLE001 - after a failure (a full disk) the first error is the one to report
                if not failed:
                    raise
                log.warning("while stopping after an error: %s: %s", type(e).__name__, e)
    return summary


def _loop(plan: RunPlan, state: train_steps.TrainState, tx: Any, schedule: Any, meta: dict, mngr: Any,
          writer: MetricsWriter, lock: workdir_lib.WorkdirLock | None, stop: preemption.StopSignal) -> dict:
    """Steps, logs, evaluations, checkpoints and the export of one run, from `state` on."""
    c, spec, mesh = plan.options, plan.spec, plan.mesh  # c: the config's groups, typed (run_options)
    is_main = jax.process_index() == 0
    # The LM is already on the mesh (sharded_load); the step takes it with its own shardings.
    lm_params = plan.lm.params
    lm_sharding = sharded_load.shardings_of(lm_params)
    replicated, batch_sharding = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    shard_prefix = lambda prefix: prefix_lib.constrain_kv(prefix, mesh)
    step_fn = train_step_for(plan, tx, schedule)
    eval_fn = train_steps.jit_eval_step(plan.lm.model, spec, replicated, lm_sharding, batch_sharding, shard_prefix,
                                     loss_chunk_tokens=c.train.loss_chunk_tokens)
    generate_fn = make_generate_fn(plan.lm.model, c.generate) if c.eval.generate else None
    if is_main:
        log.info("trainable parameters: %d (LM: %d, frozen)", prefix_lib.num_params(state.params),
                 prefix_lib.num_params(plan.lm.params))

    start = int(jax.device_get(state.step))
    end = start if c.train.eval_only else min(plan.total_steps, c.train.stop_at or plan.total_steps)
    summary: dict = {"start_step": start, "steps": plan.total_steps, "workdir": str(plan.workdir)}
    if c.train.eval_only:
        result = evaluate(plan, start, state.params, lm_params, eval_fn, generate_fn)
        writer.write(start, {f"{c.data.eval_split}/{k}": v for k, v in result.items()})
        summary.update({k: float(v) for k, v in result.items()})
        summary["final_step"] = start
        return summary

    def check_streak(done: int) -> None:
        streak = int(jax.device_get(state.nonfinite_streak))
        if streak > c.train.max_nonfinite_steps:
            raise NonFiniteError(_nonfinite_message(done, streak))

    def save(done: int) -> None:
        check_streak(done)
        checkpoint.save(mngr, done, state, {**meta, "data_position": plan.train.position(done)})
        if lock is not None:
            lock.heartbeat()

    progress = _progress(start, plan.total_steps, is_main)
    last_time, last_step, window = time.perf_counter(), start, []
    try:
        with contextlib.ExitStack() as stack:
            # Batches are built and put on the devices by a background thread while earlier steps run.
            batches = prefetch.Prefetcher(lambda s: sharding.shard_batch(plan.train.train_batch(s), mesh), start,
                                          end, c.train.prefetch_depth)
            stack.enter_context(batches)
            for step, batch in batches:
                state, metrics = step_fn(state, lm_params, batch)
                done = step + 1
                stop.immediate = False  # a step of this run finished: from now on a signal saves it first
                window.append(metrics)
                if done % c.train.log_every == 0 or done == end:
                    host = _summarize(jax.device_get(window), done - last_step, time.perf_counter() - last_time)
                    last_time, last_step, window = time.perf_counter(), done, []
                    writer.write(done, host)
                    if host["skipped_steps"]:
                        log.warning("step %d: %d of the last %d steps had a non-finite loss or update and were "
                                    "skipped", done, host["skipped_steps"], host["steps"])
                    check_streak(done)
                    if "train_loss" in host:
                        progress.set_postfix(loss=f"{host['train_loss']:.4f}", refresh=False)
                        summary["train_loss"] = host["train_loss"]
                    if lock is not None:
                        lock.heartbeat()
                progress.update(1)
                if plan.eval is not None and ((c.train.eval_every and done % c.train.eval_every == 0)
                                               or done == plan.total_steps):
                    began = time.perf_counter()
                    result = evaluate(plan, done, state.params, lm_params, eval_fn, generate_fn)
                    writer.write(done, result)
                    summary.update({k: float(v) for k, v in result.items()})
                    last_time += time.perf_counter() - began  # steps_per_sec counts training steps only
                    progress.unpause()  # and so does the bar's rate
                if stop.should_stop(done):
                    save(done)
                    checkpoint.wait(mngr)
                    raise preemption.Preempted(done)
                if done % c.train.save_every == 0 or done == end:
                    save(done)
    finally:
        progress.close()  # ends the bar's line: an error prints on a line of its own
    stop.immediate = False  # the last saves and the export finish; a signal now only ends a complete run
    if is_main:
        log.info("writing the last checkpoint (step %d)", end)
    checkpoint.wait(mngr)

    if c.train.export and is_main and end == plan.total_steps:
        log.info("exporting the prefix (without its MLP) to %s", plan.workdir / "export")
        summary["export"] = export(plan, state.params, meta)
        log.info("exported: %s", summary["export"])
    summary["final_step"] = int(jax.device_get(state.step))
    return summary


def export(plan: RunPlan, params: Any, meta: dict) -> str:
    """Writes the trained prefix without its MLP to `workdir`/export (multi-task: export/<task>/, one each, every
    one a single prefix predict.py loads); returns that directory. Refuses a prefix that is not finite."""
    if not checkpoint.is_finite(params):
        raise NonFiniteError("the trained prefix is not finite; nothing was exported.")
    spec, directory = plan.spec, plan.workdir / "export"
    export_meta = {k: meta[k] for k in ("base_model", "lm_fingerprint", "architecture", "model_config")}
    export_meta["step"] = plan.total_steps
    one = prefix_lib.single_task(spec)
    for task, task_params in prefix_lib.split_tasks(jax.device_get(params), spec).items():
        prefix_lib.export(task_params, one, directory / task if task else directory,
                          {**export_meta, "task": task} if task else export_meta)
    return str(directory)


def _summarize(window: list[dict], steps: int, seconds: float) -> dict:
    """One metrics.jsonl row for the `steps` steps since the last row.

    `loss`, `grad_norm`, `learning_rate`, `tokens`: the last step's values (`loss` is NaN when that step was
    skipped); `train_loss`: the mean loss over the steps of the window that were not skipped (the smoother
    curve); `steps_per_sec`: training steps only (evaluation time is left out); `skipped_steps`: non-finite
    steps in the window."""
    skipped = np.asarray([m["skipped"] for m in window], bool)
    row: dict = {"steps": steps, "skipped_steps": int(skipped.sum()), "steps_per_sec": steps / max(seconds, 1e-9)}
    last = window[-1]
    row.update({k: float(v) for k, v in last.items() if k != "skipped"})
    kept = [float(m["loss"]) for m, bad in zip(window, skipped) if not bad]
    if kept:
        row["train_loss"] = float(np.mean(kept))
    return row


def _nonfinite_message(step: int, streak: int) -> str:
    return (f"training diverged: the last {streak} steps up to step {step} had a non-finite loss, gradient or "
            "update (each was skipped) — more than train.max_nonfinite_steps allows. The last good checkpoint is "
            "kept and nothing was exported; lower optim.learning_rate, check the data, or raise "
            "train.max_nonfinite_steps.")


def _progress(start: int, total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, unit="step", dynamic_ncols=True,
                desc="train", smoothing=0.1)
