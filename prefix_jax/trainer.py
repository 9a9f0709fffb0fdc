"""The training run, top to bottom: config -> frozen LM -> prefix -> data -> jitted steps -> eval -> Orbax.

`run(config)` is what `train.py` calls; tests call it in-process on tiny models.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from prefix_jax import checkpoint, data, evaluation, models, optim, partitioning, sharding, tiny, training
from prefix_jax import prefix as prefix_lib
from prefix_jax import prefix_init
from prefix_jax.generate import GenerationConfig, make_generate_fn
from prefix_jax.metrics_log import MetricsWriter
from prefix_jax.models import common, sharded_load

log = logging.getLogger("prefix_jax")


class ConfigError(ValueError):
    """A config value is invalid; the message names the field and the fix."""


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
    workdir: Path
    init_ids: list[int]


def _model_overrides(config: Any) -> dict:
    overrides = {"remat": common.remat_policy(config.model.remat)}  # [scale] a policy name, not a bool
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
    return sharded_load.load_sharded(config.model.name_or_path, mesh, config.mesh.lm_partitioning,  # [scale]
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
    shifted = getattr(model_config, "positions_after_prefix", False)
    embedding_only = spec.method == "embedding_only"

    def need(placement: str, text: int) -> int:
        # Prompt embeddings go in front of the (encoder) input; a prefix shifts the text after it when asked to.
        prompt = embedding_only and (placement == "encoder" or not model_config.is_encoder_decoder)
        moves_text = (shifted or spec.method == "infix") and not embedding_only and placement in spec.placements
        extra = spec.length if prompt or moves_text else 0
        return extra + text

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
    mesh = sharding.mesh_from_config(c.mesh)  # [scale] before the LM: it is loaded into its shards
    lm = load_lm(c, mesh)
    tokenizer = data.load_tokenizer(c.model.tokenizer or str(lm.model_dir))
    init_ids = init_text_ids(c, tokenizer)
    spec = prefix_spec(c, lm.config, init_ids)
    if init_ids and len(init_ids) != spec.length:
        raise ConfigError(f"prefix.init_text has {len(init_ids)} tokens but prefix.length={spec.length}; set "
                          f"prefix.length={len(init_ids)} or 0 (as many as the text has).")
    GenerationConfig(c.generate.max_new_tokens, c.generate.num_beams, c.generate.length_penalty)  # validates
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
    widths = [data.padded_lengths(s, c.data.max_source_length, c.data.max_target_length)
              for s in (train_split, eval_split) if s is not None]
    source_width, target_width = max(w[0] for w in widths), max(w[1] for w in widths)
    generated = c.generate.max_new_tokens if c.eval.generate else 0
    check_positions(lm.config, spec, source_width, max(target_width, generated))

    sharding.check_batch_size(c.train.batch_size, mesh, c.train.grad_accum_steps)  # [scale]
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
    workdir = Path(c.train.workdir or "runs/default")
    return Setup(c, lm, tokenizer, spec, mesh, train, batcher(eval_split, eval_size) if eval_split else None, total,
                 workdir, init_ids)


def run_metadata(setup: Setup) -> dict:
    """What a checkpoint records about where it belongs (see checkpoint.IDENTITY_KEYS)."""
    lm = setup.lm
    return {
        "base_model": lm.name_or_path,
        "architecture": lm.config.architecture,
        "model_config": {k: v for k, v in dataclasses.asdict(lm.config).items()
                         if k not in ("dtype", "param_dtype", "remat")},
        "prefix_spec": setup.spec.to_json(),
        "config": setup.config.to_dict(),
    }


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


def initial_state(setup: Setup, mngr: Any, tx: Any, meta: dict) -> training.TrainState:
    """The latest checkpoint of the workdir (checked against this run), or a fresh state."""
    c = setup.config
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(c.train.seed))
    params = prefix_lib.init_params(setup.spec, init_rng)
    latest = mngr.latest_step()
    if latest is not None:
        if not c.train.resume:
            raise ConfigError(f"{setup.workdir} already holds a checkpoint (step {latest}) and train.resume=False; "
                              "it was left untouched. Use a new train.workdir or --config.train.resume=True.")
        checkpoint.check_compatible(checkpoint.read_meta(mngr, latest), meta, str(setup.workdir))
        template = sharding.replicate(training.init_state(params, tx, state_rng), setup.mesh)
        state, _ = checkpoint.restore(mngr, checkpoint.abstract(template), latest)
        log.info("resumed from step %d", latest)
        return state
    if c.train.eval_only:
        raise ConfigError(f"train.eval_only: {setup.workdir} holds no checkpoint to evaluate; set train.workdir to "
                          "a run's directory.")
    if setup.init_ids:
        params, report = prefix_init.init_from_text(setup.spec, params, setup.lm.model, setup.lm.params,
                                                    setup.init_ids, c.prefix.init_fit_steps,
                                                    c.prefix.init_fit_learning_rate)
        log.info("prefix initialised from %r: %s", c.prefix.init_text, report)
    return sharding.replicate(training.init_state(params, tx, state_rng), setup.mesh)


def run(config: Any) -> dict:
    """Trains a prefix as `config` says (or only evaluates it: `train.eval_only`); returns a summary."""
    setup = build(config)
    c, spec, mesh = setup.config, setup.spec, setup.mesh
    is_main = jax.process_index() == 0
    if is_main:
        log.info("config:\n%s", c)

    # The optimizer needs only the tree's paths and shapes.
    shapes = jax.eval_shape(lambda key: prefix_lib.init_params(spec, key), jax.random.PRNGKey(0))
    tx, schedule = optim.make_optimizer(
        shapes, c.optim.learning_rate, setup.total_steps, c.optim.warmup_steps, c.optim.weight_decay, c.optim.b1,
        c.optim.b2, c.optim.eps, c.optim.max_grad_norm or None, tuple(c.optim.frozen))
    meta = run_metadata(setup)
    mngr = checkpoint.manager(setup.workdir / "checkpoints", c.train.keep_checkpoints or None)
    state = initial_state(setup, mngr, tx, meta)

    # [scale] The LM is already on the mesh (sharded_load); the step takes it with its own shardings.
    lm_params = setup.lm.params
    lm_sharding = sharded_load.shardings_of(lm_params)
    replicated, batch_sharding = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    shard_prefix = lambda prefix: partitioning.constrain_prefix(prefix, mesh)
    step_fn = training.jit_train_step(setup.lm.model, spec, tx, schedule, c.train.label_smoothing,
                                      state_sharding=replicated, lm_sharding=lm_sharding,
                                      batch_sharding=batch_sharding, grad_accum_steps=c.train.grad_accum_steps,
                                      shard_prefix=shard_prefix)
    eval_fn = training.jit_eval_step(setup.lm.model, spec, replicated, lm_sharding, batch_sharding, shard_prefix)
    generate_fn = None
    if c.eval.generate:
        generate_fn = make_generate_fn(setup.lm.model, GenerationConfig(
            c.generate.max_new_tokens, c.generate.num_beams, c.generate.length_penalty))
    writer = MetricsWriter(setup.workdir, enabled=is_main)
    if is_main:
        (setup.workdir / "config.json").write_text(json.dumps(c.to_dict(), indent=2, default=str))
        log.info("trainable parameters: %d (LM: %d, frozen)", prefix_lib.num_params(state.params),
                 prefix_lib.num_params(setup.lm.params))

    start = int(jax.device_get(state.step))
    end = start if c.train.eval_only else min(setup.total_steps, c.train.stop_at or setup.total_steps)
    summary: dict = {"start_step": start, "steps": setup.total_steps, "workdir": str(setup.workdir)}
    if c.train.eval_only:
        result = evaluate(setup, start, state.params, lm_params, eval_fn, generate_fn)
        writer.write(start, {f"{c.data.eval_split}/{k}": v for k, v in result.items()})
        summary.update({k: float(v) for k, v in result.items()})
    progress = _progress(start, setup.total_steps, is_main and not c.train.eval_only)
    last_time, last_step, losses = time.perf_counter(), start, []
    for step in range(start, end):
        batch = sharding.shard_batch(setup.train.train_batch(step), mesh)
        state, metrics = step_fn(state, lm_params, batch)
        done = step + 1
        losses.append(metrics["loss"])
        if done % c.train.log_every == 0 or done == end:
            host = jax.device_get(metrics)
            now = time.perf_counter()
            host["steps_per_sec"] = (done - last_step) / max(now - last_time, 1e-9)
            host["train_loss"] = float(np.mean(jax.device_get(losses)))
            last_time, last_step, losses = now, done, []
            writer.write(done, host)
            progress.set_postfix(loss=f"{host['train_loss']:.4f}", refresh=False)
            summary["train_loss"] = float(host["train_loss"])
        if setup.eval is not None and ((c.train.eval_every and done % c.train.eval_every == 0)
                                        or done == setup.total_steps):
            result = evaluate(setup, done, state.params, lm_params, eval_fn, generate_fn)
            writer.write(done, result)
            summary.update({k: float(v) for k, v in result.items()})
        if done % c.train.save_every == 0 or done == end:
            checkpoint.save(mngr, done, state, {**meta, "data_position": setup.train.position(done)})
        progress.update(1)
    progress.close()
    mngr.wait_until_finished()
    mngr.close()
    writer.close()

    if c.train.export and is_main and end == setup.total_steps and not c.train.eval_only:
        export_meta = {k: meta[k] for k in ("base_model", "architecture", "model_config")}
        summary["export"] = str(prefix_lib.export(jax.device_get(state.params), spec, setup.workdir / "export",
                                                  {**export_meta, "step": setup.total_steps}))
    summary["final_step"] = int(jax.device_get(state.step))
    return summary


def _progress(start: int, total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, unit="step", dynamic_ncols=True,
                desc="train", smoothing=0.1)
