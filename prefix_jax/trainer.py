"""The training run, top to bottom: config -> frozen LM -> prefix -> data -> jitted steps -> eval -> Orbax.

`run(config)` is what `train.py` calls; tests call it in-process on tiny models.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import time
from typing import Any

import jax
import numpy as np
from etils import epath

from prefix_jax import checkpoint, config_checks, data, evaluation, models, optim, partitioning, preemption, sharding
from prefix_jax import prefetch, tiny, training
from prefix_jax import workdir as workdir_lib
from prefix_jax.config_checks import ConfigError
from prefix_jax import prefix as prefix_lib
from prefix_jax import prefix_init
from prefix_jax.generate import GenerationConfig, make_generate_fn
from prefix_jax.metrics_log import MetricsWriter
from prefix_jax.models import common, sharded_load

log = logging.getLogger("prefix_jax")


@dataclasses.dataclass
class Setup:
    """Everything a run derives from its config before the first step."""

    config: Any
    lm: models.PretrainedLM
    tokenizer: Any
    spec: prefix_lib.PrefixSpec
    mesh: Any
    train: data.Batcher
    eval: data.Batcher | None
    total_steps: int
    workdir: epath.Path
    init_ids: list[int]


def _model_overrides(config: Any) -> dict:
    overrides = {"remat": common.remat_policy(config.model.remat)}
    if config.model.positions_after_prefix is not None:
        overrides["positions_after_prefix"] = bool(config.model.positions_after_prefix)
    return overrides


def load_lm(config: Any, mesh: Any) -> models.PretrainedLM:
    """The frozen LM named by `config.model` (building the tiny offline one first if asked to), its params read
    straight into their shards on `mesh` (`mesh.lm_partitioning`)."""
    if config.model.create_tiny:
        tiny.build_tiny_checkpoint(config.model.name_or_path, config.model.create_tiny)
    if not config.model.name_or_path:
        raise ConfigError("model.name_or_path is empty; set a HF Hub id or a local checkpoint directory.")
    return sharded_load.load_sharded(config.model.name_or_path, mesh, config.mesh.lm_partitioning,
                                     config.model.param_dtype, config.model.compute_dtype or None,
                                     **_model_overrides(config))


def init_text_ids(config: Any, tokenizer: Any) -> list[int]:
    """Token ids of `prefix.init_text` (for `prefix.init="words"`), without special tokens."""
    p = config.prefix
    if p.init != "words":
        return []
    if not p.init_text:
        raise ConfigError('prefix.init="words" needs prefix.init_text, e.g. "table-to-text:" or "summarize".')
    return list(tokenizer(p.init_text, add_special_tokens=False)["input_ids"])


def prefix_spec(config: Any, model_config: Any, init_ids: list[int]) -> prefix_lib.PrefixSpec:
    p = config.prefix
    placements = tuple(p.placements)
    if not model_config.is_encoder_decoder and placements == ("encoder", "decoder", "cross"):
        placements = ("decoder",)  # the default placements, read for a decoder-only model
    length = int(p.length) or len(init_ids)
    return prefix_lib.PrefixSpec(
        length=length, placements=placements, geometry=model_config.prefix_geometry(),
        hidden_size=model_config.hidden_size, method=p.method, mlp_hidden=int(p.mlp_hidden),
        mlp_activation=p.mlp_activation, dropout=float(p.dropout), init=p.init,
        tie=tuple(tuple(group) for group in p.tie))


def check_positions(model_config: Any, spec: prefix_lib.PrefixSpec, source_width: int, target_width: int) -> None:
    """Fails before training when prefix + text (or + generated text) would overrun a learned position table.

    `target_width` is the longer of the padded targets and `generate.max_new_tokens` when evaluating by decoding.
    """
    limit = model_config.max_positions
    if limit is None:
        return
    prompt_len = spec.length if spec.method == "embedding_only" else 0  # virtual tokens in front of the input

    def need(stack: str, text: int) -> int:  # the model's own answer (`Config.text_positions`)
        kv_len = spec.length if (stack in spec.placements and not prompt_len) else 0
        return model_config.text_positions(stack, text, kv_len, infix=spec.method == "infix",
                                           prompt_len=prompt_len).needed

    if model_config.is_encoder_decoder:
        checks = {"encoder (prefix + data.max_source_length)": need("encoder", source_width),
                  "decoder (prefix + data.max_target_length or generate.max_new_tokens)": need("decoder", target_width)}
    else:
        checks = {"prefix + data.max_source_length + data.max_target_length (or generate.max_new_tokens)":
                  need("decoder", source_width + target_width)}
    for what, n in checks.items():
        if n > limit:
            raise ConfigError(f"{what} = {n} positions, but {model_config.architecture} has {limit}. Shorten "
                              f"prefix.length ({spec.length}), data.max_source_length or data.max_target_length.")


def _examples(config: Any, split: str, cap: int) -> list[data.Example]:
    examples = data.read_examples(config.data, split)
    if not examples:
        raise data.DataError(f"split {split!r} is empty.")
    return examples[:cap] if cap else examples


def build(config: Any) -> Setup:
    """Loads the LM, tokenizer and data and checks every size, before anything is written."""
    c = config
    sharding.initialize_distributed(c.mesh.coordinator_address or None, c.mesh.num_processes, c.mesh.process_id)
    mesh = sharding.mesh_from_config(c.mesh)  # before the LM: it is loaded straight into its shards
    lm = load_lm(c, mesh)
    tokenizer = data.load_tokenizer(c.model.tokenizer or str(lm.model_dir),
                                    field="model.tokenizer" if c.model.tokenizer else "model.name_or_path")
    init_ids = init_text_ids(c, tokenizer)
    spec = prefix_spec(c, lm.config, init_ids)
    if init_ids and len(init_ids) != spec.length:
        raise ConfigError(f"prefix.init_text has {len(init_ids)} tokens but prefix.length={spec.length}; set "
                          f"prefix.length={len(init_ids)} or 0 (as many as the text has).")
    GenerationConfig.from_config(c.generate)  # validates
    for name in c.eval.metrics:
        if name not in evaluation.metrics.METRICS:
            raise ConfigError(f"eval.metrics has {name!r}; choose from {evaluation.metrics.METRICS}.")
    encoder_decoder = lm.config.is_encoder_decoder
    tokenize = lambda examples: data.tokenize(examples, tokenizer, c.data.max_source_length, c.data.max_target_length,
                                              encoder_decoder, c.data.source_prefix, c.data.target_prefix)
    eval_split = tokenize(_examples(c, c.data.eval_split, c.data.max_eval_examples)) if c.data.eval_split else None
    if c.train.eval_only and eval_split is None:
        raise ConfigError("train.eval_only needs data.eval_split.")
    # Evaluating only: no need to read (and tokenize) the training data.
    train_split = eval_split if c.train.eval_only else tokenize(
        _examples(c, c.data.train_split, c.data.max_train_examples))
    if c.data.task_field:
        spec = dataclasses.replace(spec, tasks=task_names(c, train_split, eval_split))
        for split in (train_split, eval_split):
            if split is not None:
                split.task_ids = [spec.tasks.index(e.task) for e in split.examples]
    widths = [data.padded_lengths(s, c.data.max_source_length, c.data.max_target_length)
              for s in (train_split, eval_split) if s is not None]
    source_width, target_width = max(w[0] for w in widths), max(w[1] for w in widths)
    generated = c.generate.max_new_tokens if c.eval.generate else 0
    check_positions(lm.config, spec, source_width, max(target_width, generated))

    sharding.check_batch_size(c.train.batch_size, mesh, c.train.grad_accum_steps)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batcher = lambda split, size: data.Batcher(
        split, size, source_width, target_width, pad_id, left_pad_source=not encoder_decoder, seed=c.train.seed,
        process_index=jax.process_index(), process_count=jax.process_count())
    train = batcher(train_split, c.train.batch_size)
    if train.steps_per_epoch == 0:
        raise ConfigError(f"train.batch_size={c.train.batch_size} is larger than the {len(train_split)} training "
                          "examples; lower it.")
    eval_size = c.train.eval_batch_size or c.train.batch_size
    sharding.check_batch_size(eval_size, mesh)
    total = int(c.train.steps) or math.ceil(float(c.train.epochs) * train.steps_per_epoch)
    if total < 1:
        raise ConfigError(f"train.steps={c.train.steps} / train.epochs={c.train.epochs} give no step to run.")
    workdir = config_checks.workdir_path(c.train.workdir)
    return Setup(c, lm, tokenizer, spec, mesh, train, batcher(eval_split, eval_size) if eval_split else None, total,
                 workdir, init_ids)


def task_names(config: Any, train_split: data.TokenizedSplit, eval_split: data.TokenizedSplit | None
               ) -> tuple[str, ...]:
    """Multi-task data: the tasks, one prefix each (sorted; evaluating only: those the checkpoint was trained on)."""
    tasks: tuple[str, ...] = ()
    if config.train.eval_only:
        mngr = checkpoint.manager(config_checks.workdir_path(config.train.workdir) / "checkpoints", read_only=True)
        try:
            saved = checkpoint.read_meta(mngr) if mngr.latest_step() is not None else None
        except Exception:  # noqa: BLE001 - unreadable: the resume checks report it
            saved = None
        finally:
            mngr.close()
        tasks = tuple((saved or {}).get("prefix_spec", {}).get("tasks", ()))
    tasks = tasks or tuple(sorted({e.task for e in train_split.examples}))
    for split, name in ((train_split, config.data.train_split), (eval_split, config.data.eval_split)):
        unknown = sorted({e.task for e in split.examples} - set(tasks)) if split is not None else []
        if unknown:
            raise ConfigError(f"data.task_field: split {name!r} has tasks {unknown[:5]} that the prefixes were not "
                              f"trained for ({list(tasks)[:10]}).")
    return tasks


def lm_fingerprint(lm_params: Any) -> str:
    """Identifies the frozen LM by its weights, not its path: every leaf's path, shape, dtype and a corner of it.

    The same checkpoint read from a Hub id or a local copy gives the same fingerprint; two fine-tunes of one
    architecture do not. Works on host arrays and on an LM sharded over devices and processes (every process
    must call it: the corners are gathered by one small jitted program).
    """
    corner = lambda x: x[tuple(slice(0, 2) for _ in x.shape)]
    leaves = jax.tree.leaves(lm_params)
    meshes = {x.sharding.mesh for x in leaves if isinstance(x, jax.Array) and hasattr(x.sharding, "mesh")}
    if meshes:
        replicated = jax.sharding.NamedSharding(next(iter(meshes)), jax.sharding.PartitionSpec())
        corners = jax.jit(lambda t: jax.tree.map(corner, t), out_shardings=replicated)(lm_params)
        corners = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), corners)
    else:
        corners = jax.tree.map(lambda x: np.asarray(corner(x)), lm_params)
    h = hashlib.sha256()
    for (path, leaf), (_, part) in zip(jax.tree_util.tree_flatten_with_path(lm_params)[0],
                                       jax.tree_util.tree_flatten_with_path(corners)[0]):
        h.update(f"{jax.tree_util.keystr(path)}|{tuple(leaf.shape)}|{leaf.dtype}|".encode())
        h.update(np.asarray(part, np.float32).tobytes())
    return h.hexdigest()[:32]


def data_fingerprint(split: data.TokenizedSplit) -> str:
    """The token ids of a split, hashed: a resume on other data would not replay the run."""
    h = hashlib.sha256()
    for source, target in zip(split.source_ids, split.target_ids):
        h.update(np.asarray(source, np.int64).tobytes() + b"|" + np.asarray(target, np.int64).tobytes() + b"\n")
    return h.hexdigest()[:32]


def run_metadata(setup: Setup) -> dict:
    """What a checkpoint records about where it belongs (see checkpoint.IDENTITY_KEYS) and how it was trained."""
    lm, c = setup.lm, setup.config
    meta = {
        "base_model": lm.name_or_path,
        "lm_fingerprint": lm_fingerprint(lm.params),
        "architecture": lm.config.architecture,
        "model_config": {k: v for k, v in dataclasses.asdict(lm.config).items()
                         if k not in ("dtype", "param_dtype", "remat")},
        "prefix_spec": setup.spec.to_json(),
        "config": c.to_dict(),
    }
    if not c.train.eval_only:  # what must not change for a resume to replay the interrupted run
        meta["resume"] = {
            "data.train": data_fingerprint(setup.train.split), "train.batch_size": c.train.batch_size,
            "train.seed": c.train.seed, "train.steps": setup.total_steps,
            "train.grad_accum_steps": c.train.grad_accum_steps,
            "train.label_smoothing": c.train.label_smoothing, "model.param_dtype": c.model.param_dtype,
            "model.compute_dtype": c.model.compute_dtype or c.model.param_dtype,
            **{f"optim.{k}": c.optim[k] for k in ("learning_rate", "warmup_steps", "weight_decay", "b1", "b2", "eps",
                                                  "max_grad_norm", "frozen")},
        }
    return meta


def evaluate(setup: Setup, step: int, params: Any, lm_params: Any, eval_fn: Any, generate_fn: Any) -> dict:
    """Eval-split loss, and (if configured) decoded outputs scored with the configured metrics."""
    c = setup.config
    result = evaluation.loss(setup.eval, setup.mesh, params, lm_params, eval_fn)
    if generate_fn is not None:
        scores = evaluation.generate_and_score(
            setup.eval, setup.mesh, setup.tokenizer, setup.spec, params, lm_params, generate_fn,
            tuple(c.eval.metrics), c.eval.max_generate, setup.workdir / f"predictions_{step}.jsonl")
        result.update(scores)
    return result


@dataclasses.dataclass
class Resume:
    """The checkpoint a run continues from, found before anything is written."""

    step: int
    state: training.TrainState
    corrupt_steps: list[int]  # newer steps that failed to restore or verify
    latest_seen: int  # the newest step in the workdir when it was read


def find_resume(setup: Setup, tx: Any, meta: dict) -> Resume | None:
    """Reads (never writes) the workdir's checkpoints: the newest good one, checked against this run."""
    c = setup.config
    mngr = checkpoint.manager(setup.workdir / "checkpoints", read_only=True)
    try:
        steps = mngr.all_steps()
        if not steps:
            if c.train.eval_only:
                raise ConfigError(f"train.eval_only: {setup.workdir} holds no checkpoint to evaluate; set "
                                  "train.workdir to a run's directory.")
            return None
        if not c.train.resume:
            raise ConfigError(f"train.workdir={str(setup.workdir)!r} already holds a checkpoint (step {max(steps)}) "
                              "and train.resume=False; it was left untouched. Use a new train.workdir or "
                              "--config.train.resume=True.")
        saved_meta = None
        for step in sorted(steps, reverse=True):  # the metadata of the newest readable step
            try:
                saved_meta = checkpoint.read_meta(mngr, step)
                break
            except Exception:  # noqa: BLE001 - unreadable: restore_latest_good below reports and skips it
                continue
        if saved_meta is not None:
            if c.train.eval_only:
                saved_meta = {k: v for k, v in saved_meta.items() if k != "resume"}
            checkpoint.check_compatible(saved_meta, meta, str(setup.workdir), bool(c.train.resume_anyway))
        init_rng, state_rng = jax.random.split(jax.random.PRNGKey(c.train.seed))
        template = sharding.replicate(training.init_state(prefix_lib.init_params(setup.spec, init_rng), tx,
                                                          state_rng), setup.mesh)
        step, state, _, corrupt = checkpoint.restore_latest_good(mngr, checkpoint.abstract(template))
        return Resume(step, state, corrupt, max(steps))
    finally:
        mngr.close()


def fresh_state(setup: Setup, tx: Any) -> training.TrainState:
    """A new train state: random (or word-initialised) prefix, zero optimizer state."""
    c = setup.config
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(c.train.seed))
    params = prefix_lib.init_params(setup.spec, init_rng)
    if setup.init_ids:
        one = prefix_lib.single_task(setup.spec)
        init = lambda p: prefix_init.init_from_text(one, p, setup.lm.model, setup.lm.params, setup.init_ids,
                                                    c.prefix.init_fit_steps, c.prefix.init_fit_learning_rate)
        if setup.spec.tasks:
            fitted = {task: init(params[task]) for task in setup.spec.tasks}
            params, report = {t: f[0] for t, f in fitted.items()}, {t: f[1] for t, f in fitted.items()}
        else:
            params, report = init(params)
        log.info("prefix initialised from %r: %s", c.prefix.init_text, report)
    return sharding.replicate(training.init_state(params, tx, state_rng), setup.mesh)


class NonFiniteError(RuntimeError):
    """Training produced non-finite values for more steps in a row than `train.max_nonfinite_steps` allows."""


def run(config: Any) -> dict:
    """Trains a prefix as `config` says (or only evaluates it: `train.eval_only`); returns a summary.

    Raises `ValueError` subclasses for bad input (before anything is written), `NonFiniteError` when training
    diverges (the last good checkpoint is kept), and `preemption.Preempted` after saving on SIGTERM/SIGINT.
    """
    config_checks.check(config)
    setup = build(config)
    c, spec, mesh = setup.config, setup.spec, setup.mesh
    is_main = jax.process_index() == 0

    # The optimizer needs only the tree's paths and shapes.
    shapes = jax.eval_shape(lambda key: prefix_lib.init_params(spec, key), jax.random.PRNGKey(0))
    tx, schedule = optim.make_optimizer(
        shapes, learning_rate=c.optim.learning_rate, total_steps=setup.total_steps,
        warmup_steps=c.optim.warmup_steps, weight_decay=c.optim.weight_decay, b1=c.optim.b1, b2=c.optim.b2,
        eps=c.optim.eps, max_grad_norm=c.optim.max_grad_norm or None, frozen=tuple(c.optim.frozen))
    meta = run_metadata(setup)
    resume = find_resume(setup, tx, meta)  # everything above only read; the lock is the first write

    lock = workdir_lib.WorkdirLock(setup.workdir) if is_main else None
    if lock is not None:
        lock.acquire()
    closers: list[Any] = [lock.release] if lock is not None else []
    try:
        ckpt_dir = setup.workdir / "checkpoints"
        mngr = checkpoint.manager(ckpt_dir, c.train.keep_checkpoints or None, read_only=bool(c.train.eval_only))
        closers.insert(0, mngr.close)
        if mngr.latest_step() != (resume.latest_seen if resume else None):
            raise ConfigError(f"train.workdir={str(setup.workdir)!r} changed while this run started (another run "
                              "wrote to it); rerun the command.")
        if resume is not None and resume.corrupt_steps and not c.train.eval_only and is_main:
            checkpoint.set_aside(ckpt_dir, resume.corrupt_steps)
            mngr.reload()
        if is_main:
            log.info("config:\n%s", c)
            workdir_lib.record_run(setup.workdir, c.to_dict(), "eval_only" if c.train.eval_only else "train",
                                   resume.step if resume else 0)
        state = resume.state if resume is not None else fresh_state(setup, tx)
        if resume is not None:
            log.info("resumed from step %d", resume.step)
        writer = MetricsWriter(setup.workdir, enabled=is_main)
        closers.insert(0, writer.close)
        return _loop(setup, state, tx, schedule, meta, mngr, writer, lock)
    finally:
        for close in closers:
            close()


def _loop(setup: Setup, state: training.TrainState, tx: Any, schedule: Any, meta: dict, mngr: Any,
          writer: MetricsWriter, lock: workdir_lib.WorkdirLock | None) -> dict:
    """Steps, logs, evaluations, checkpoints and the export of one run, from `state` on."""
    c, spec, mesh = setup.config, setup.spec, setup.mesh
    is_main = jax.process_index() == 0
    # The LM is already on the mesh (sharded_load); the step takes it with its own shardings.
    lm_params = setup.lm.params
    lm_sharding = sharded_load.shardings_of(lm_params)
    replicated, batch_sharding = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    shard_prefix = lambda prefix: partitioning.constrain_prefix(prefix, mesh)
    step_fn = training.jit_train_step(setup.lm.model, spec, tx, schedule, c.train.label_smoothing,
                                      state_sharding=replicated, lm_sharding=lm_sharding,
                                      batch_sharding=batch_sharding, grad_accum_steps=c.train.grad_accum_steps,
                                      shard_prefix=shard_prefix, loss_chunk_tokens=c.train.loss_chunk_tokens)
    eval_fn = training.jit_eval_step(setup.lm.model, spec, replicated, lm_sharding, batch_sharding, shard_prefix,
                                     loss_chunk_tokens=c.train.loss_chunk_tokens)
    generate_fn = None
    if c.eval.generate:
        generate_fn = make_generate_fn(setup.lm.model, GenerationConfig.from_config(c.generate))
    if is_main:
        log.info("trainable parameters: %d (LM: %d, frozen)", prefix_lib.num_params(state.params),
                 prefix_lib.num_params(setup.lm.params))

    start = int(jax.device_get(state.step))
    end = start if c.train.eval_only else min(setup.total_steps, c.train.stop_at or setup.total_steps)
    summary: dict = {"start_step": start, "steps": setup.total_steps, "workdir": str(setup.workdir)}
    if c.train.eval_only:
        result = evaluate(setup, start, state.params, lm_params, eval_fn, generate_fn)
        writer.write(start, {f"{c.data.eval_split}/{k}": v for k, v in result.items()})
        summary.update({k: float(v) for k, v in result.items()})
        summary["final_step"] = start
        return summary

    def save(done: int) -> None:
        streak = int(jax.device_get(state.nonfinite_streak))
        if streak > c.train.max_nonfinite_steps:
            raise NonFiniteError(_nonfinite_message(done, streak))
        checkpoint.save(mngr, done, state, {**meta, "data_position": setup.train.position(done)})
        if lock is not None:
            lock.heartbeat()

    progress = _progress(start, setup.total_steps, is_main)
    last_time, last_step, window = time.perf_counter(), start, []
    with contextlib.ExitStack() as stack:
        stop = stack.enter_context(preemption.StopSignal())
        # Batches are built and put on the devices by a background thread while earlier steps run.
        batches = prefetch.Prefetcher(lambda s: sharding.shard_batch(setup.train.train_batch(s), mesh), start, end,
                                      c.train.prefetch_depth)
        stack.enter_context(batches)
        for step, batch in batches:
            state, metrics = step_fn(state, lm_params, batch)
            done = step + 1
            window.append(metrics)
            if done % c.train.log_every == 0 or done == end:
                host = _summarize(jax.device_get(window), done - last_step, time.perf_counter() - last_time)
                streak = int(jax.device_get(state.nonfinite_streak))
                last_time, last_step, window = time.perf_counter(), done, []
                writer.write(done, host)
                if host["skipped_steps"]:
                    log.warning("step %d: %d of the last %d steps had a non-finite loss or update and were "
                                "skipped", done, host["skipped_steps"], host["steps"])
                if streak > c.train.max_nonfinite_steps:
                    raise NonFiniteError(_nonfinite_message(done, streak))
                if "train_loss" in host:
                    progress.set_postfix(loss=f"{host['train_loss']:.4f}", refresh=False)
                    summary["train_loss"] = host["train_loss"]
                if lock is not None:
                    lock.heartbeat()
            if setup.eval is not None and ((c.train.eval_every and done % c.train.eval_every == 0)
                                            or done == setup.total_steps):
                result = evaluate(setup, done, state.params, lm_params, eval_fn, generate_fn)
                writer.write(done, result)
                summary.update({k: float(v) for k, v in result.items()})
            progress.update(1)
            if stop.should_stop(done):
                save(done)
                mngr.wait_until_finished()
                progress.close()
                raise preemption.Preempted(done)
            if done % c.train.save_every == 0 or done == end:
                save(done)
    progress.close()
    mngr.wait_until_finished()

    if c.train.export and is_main and end == setup.total_steps:
        if not checkpoint.is_finite(state.params):
            raise NonFiniteError("the trained prefix is not finite; nothing was exported.")
        export_meta = {k: meta[k] for k in ("base_model", "lm_fingerprint", "architecture", "model_config")}
        export_meta["step"] = setup.total_steps
        params = jax.device_get(state.params)
        if spec.tasks:  # one export per task: export/<task>/, each a single prefix predict.py can load
            one = prefix_lib.single_task(spec)
            for task in spec.tasks:
                prefix_lib.export(params[task], one, setup.workdir / "export" / task, {**export_meta, "task": task})
            summary["export"] = str(setup.workdir / "export")
        else:
            summary["export"] = str(prefix_lib.export(params, spec, setup.workdir / "export", export_meta))
    summary["final_step"] = int(jax.device_get(state.step))
    return summary


def _summarize(window: list[dict], steps: int, seconds: float) -> dict:
    """One log row from the metrics of the steps since the last: means over the steps that were not skipped."""
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
