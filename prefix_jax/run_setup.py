"""Everything a training run loads and sizes before its first step, from its typed options (`run_options`).

`build(options) -> RunPlan`: mesh, frozen LM (straight into its shards), tokenizer, prefix spec, tokenized
splits, batchers, step count, and what the workdir already holds; every size is checked here, before anything
is written. It only reads, except through `before_lm`: the caller's `prepare_offline_demo` (the one step that
may write a model: the random tiny checkpoint `model.create_tiny` asks for), called once the data and the
workdir have been read and checked. `start_processes` (multi-process runs join before JAX touches a device)
comes before it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable

import jax
from etils import epath

from prefix_jax import checkpoint, config_checks, data, models, quantize, sharding, tiny_checkpoints
from prefix_jax import prefix as prefix_lib
from prefix_jax.config_checks import ConfigError
from prefix_jax.fingerprint import lm_fingerprint
from prefix_jax.models import common, sharded_load
from prefix_jax.run_options import DataOptions, MeshOptions, ModelOptions, PrefixOptions, RunOptions

log = logging.getLogger("prefix_jax")


@dataclasses.dataclass(frozen=True)
class SavedRun:
    """What the workdir's checkpoints directory held when the run was planned (read-only)."""

    steps: tuple[int, ...]  # every saved step, oldest first
    meta: dict | None  # the metadata of the newest step whose metadata reads; None: none does


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """Everything a run derives from its options before the first step; the loop reads only this."""

    options: RunOptions
    lm: models.PretrainedLM  # with `model.quantize`: its model and params quantized on load (`load_lm`)
    lm_fingerprint: str  # of the float checkpoint's weights, quantized or not: a prefix fits the float LM too
    tokenizer: Any
    spec: prefix_lib.PrefixSpec
    mesh: Any
    train: data.Batcher
    eval: data.Batcher | None
    total_steps: int
    workdir: epath.Path
    init_ids: list[int]  # prefix.init="words": the token ids of prefix.init_text
    saved: SavedRun


def start_processes(mesh: MeshOptions) -> None:
    """Joins the run's other processes (no-op for one); must come before anything touches a JAX device."""
    try:
        sharding.initialize_distributed(mesh.coordinator_address or None, mesh.num_processes, mesh.process_id)
    except ValueError as e:  # JAX's "coordinator_address should be defined": "auto" on a machine not in a cluster
        if mesh.coordinator_address != sharding.AUTO or "coordinator_address" not in str(e):
            raise
        raise ConfigError(f"mesh.coordinator_address={sharding.AUTO!r} found no cluster here (JAX detects TPU pods, "
                          "SLURM and Open MPI jobs); on one host set --config.mesh.coordinator_address='' (with a "
                          "mesh.shape this host's devices fill), or give host:port with mesh.num_processes and "
                          "mesh.process_id.") from None


def prepare_offline_demo(model: ModelOptions) -> None:
    """`model.create_tiny`: builds the random tiny checkpoint the offline demo configs train on at
    `model.name_or_path` (reused if this code built it before; anything else there is refused, untouched)."""
    if model.create_tiny:
        where = tiny_checkpoints.build_tiny_checkpoint(model.name_or_path, model.create_tiny)
        log.info("model.create_tiny=%r: training on the random tiny checkpoint at %s", model.create_tiny, where)


def load_lm(model: ModelOptions, mesh: Any, lm_partitioning: str) -> models.PretrainedLM:
    """The frozen LM `model` names, its params read straight into their shards on `mesh`; with `model.quantize`,
    its Dense kernels (and vocabulary matrices, `model.quantize_embeddings`) quantized on the host as they are read
    (`models.quantize_on_load`), so no float kernel is ever on a device."""
    overrides = {"remat": common.remat_policy(model.remat), "attention_kernel": model.attention_kernel}
    if model.positions_after_prefix is not None:
        overrides["positions_after_prefix"] = bool(model.positions_after_prefix)
    lm = sharded_load.load_sharded(model.name_or_path, mesh, lm_partitioning, model.param_dtype,
                                   model.compute_dtype or None, model.quantize, model.quantize_group_size,
                                   model.quantize_embeddings, **overrides)
    if model.quantize != "none":
        sizes = quantize.quantized_bytes(lm.params)
        log.info("LM quantized on load (%s%s): %d bytes of quantized kernels (values and scales); %d bytes stay "
                 "float (%snorms, biases)", model.quantize,
                 f", groups of {model.quantize_group_size}" if model.quantize == "int4" else "", sizes["quantized"],
                 sizes["float"], "" if model.quantize_embeddings else "embeddings, LM head, ")
    return lm


def init_text_ids(prefix: PrefixOptions, tokenizer: Any) -> list[int]:
    """Token ids of `prefix.init_text` (for `prefix.init="words"`), without special tokens."""
    if prefix.init != "words":
        return []
    return list(tokenizer(prefix.init_text, add_special_tokens=False)["input_ids"])


def prefix_spec(prefix: PrefixOptions, model_config: Any, init_ids: list[int]) -> prefix_lib.PrefixSpec:
    """The prefix `prefix` describes, shaped for the LM whose config is `model_config`."""
    placements = prefix.placements
    if not model_config.is_encoder_decoder and placements == ("encoder", "decoder", "cross"):
        placements = ("decoder",)  # the default placements, read for a decoder-only model
    length = prefix.length or len(init_ids)
    if init_ids and len(init_ids) != length:
        raise ConfigError(f"prefix.init_text has {len(init_ids)} tokens but prefix.length={length}; set "
                          f"prefix.length={len(init_ids)} or 0 (as many as the text has).")
    return prefix_lib.PrefixSpec(
        length=length, placements=placements, geometry=model_config.prefix_geometry(),
        hidden_size=model_config.hidden_size, method=prefix.method, mlp_hidden=prefix.mlp_hidden,
        mlp_activation=prefix.mlp_activation, dropout=prefix.dropout, init=prefix.init, tie=prefix.tie)


def check_positions(model_config: Any, spec: prefix_lib.PrefixSpec, source_width: int, target_width: int,
                    packed: bool = False) -> None:
    """Fails before training when prefix + text (or + generated text) would overrun a learned position table.

    `target_width` is the longer of the padded targets and `generate.max_new_tokens` when evaluating by decoding.
    `packed`: the widths are those of packed training rows (`data.pack_width`; an encoder-decoder's target row).
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
    if packed:
        checks = {"a packed row (prefix + data.pack_width, or its targets)": max(checks.values())}
    for what, n in checks.items():
        if n > limit:
            fields = "data.pack_width" if packed else "data.max_source_length or data.max_target_length"
            raise ConfigError(f"{what} = {n} positions, but {model_config.architecture} has {limit}. Shorten "
                              f"prefix.length ({spec.length}), {fields}.")


def _examples(data_options: DataOptions, split: str, cap: int) -> list[data.Example]:
    examples = data.read_examples(data_options, split)
    if not examples:
        raise data.DataError(f"split {split!r} is empty.")
    return examples[:cap] if cap else examples


def read_saved(workdir: epath.Path) -> SavedRun:
    """The steps saved under `workdir`/checkpoints and the newest readable metadata among them (never writes)."""
    mngr = checkpoint.manager(workdir / "checkpoints", read_only=True)
    try:
        steps = tuple(sorted(mngr.all_steps()))
        for step in reversed(steps):
            try:
                return SavedRun(steps, checkpoint.read_meta(mngr, step))
            except Exception:  # noqa: BLE001 - unreadable: restoring reports and skips it
                continue
        return SavedRun(steps, None)
    finally:
        mngr.close()


def task_names(options: RunOptions, saved: SavedRun, train_split: data.TokenizedSplit,
               eval_split: data.TokenizedSplit | None) -> tuple[str, ...]:
    """Multi-task data: the tasks, one prefix each (sorted; evaluating only: those the checkpoint was trained on)."""
    tasks: tuple[str, ...] = ()
    if options.train.eval_only:
        tasks = tuple((saved.meta or {}).get("prefix_spec", {}).get("tasks", ()))
    tasks = tasks or tuple(sorted({e.task for e in train_split.examples}))
    for split, name in ((train_split, options.data.train_split), (eval_split, options.data.eval_split)):
        unknown = sorted({e.task for e in split.examples} - set(tasks)) if split is not None else []
        if unknown:
            raise ConfigError(f"data.task_field: split {name!r} has tasks {unknown[:5]} that the prefixes were not "
                              f"trained for ({list(tasks)[:10]}).")
    return tasks


def check_packing(options: RunOptions, spec: prefix_lib.PrefixSpec) -> None:
    """`data.pack` needs one task and a K/V prefix (each segment sees it as if alone)."""
    if options.data.task_field:
        raise ConfigError("data.pack=True with data.task_field (one prefix per task) is not supported: each row "
                          "would mix tasks; set data.pack=False.")
    if spec.method not in ("prefix", "prefix_direct"):
        raise ConfigError(f"data.pack=True with prefix.method={spec.method!r} is not supported (packed segments "
                          "would each need their own infix or prompt slots); set data.pack=False.")


def build(options: RunOptions, before_lm: Callable[[], None] = lambda: None) -> RunPlan:
    """Reads the data and the workdir, then (after `before_lm()`: `prepare_offline_demo`, so that a run refused
    for its data builds no model) loads the LM and tokenizer and checks every size, before anything is written.

    Call `start_processes` first.
    """
    o = options
    d = o.data
    eval_examples = _examples(d, d.eval_split, d.max_eval_examples) if d.eval_split else None
    # Evaluating only: no need to read (and tokenize) the training data.
    train_examples = None if o.train.eval_only else _examples(d, d.train_split, d.max_train_examples)
    workdir = config_checks.workdir_path(o.train.workdir)
    saved = read_saved(workdir)
    before_lm()
    mesh = sharding.mesh_from_config(o.mesh)  # before the LM: it is loaded straight into its shards
    lm = load_lm(o.model, mesh, o.mesh.lm_partitioning)
    fingerprint = lm.float_fingerprint or lm_fingerprint(lm.params)  # the float weights': what an export records
    tokenizer = data.load_tokenizer(o.model.tokenizer or str(lm.model_dir),
                                    field="model.tokenizer" if o.model.tokenizer else "model.name_or_path")
    init_ids = init_text_ids(o.prefix, tokenizer)
    spec = prefix_spec(o.prefix, lm.config, init_ids)
    encoder_decoder = lm.config.is_encoder_decoder
    tokenize = lambda examples, split: data.tokenize(examples, tokenizer, d.max_source_length, d.max_target_length,
                                                     encoder_decoder, d.source_prefix, d.target_prefix,
                                                     name=f"split {split!r}")
    eval_split = tokenize(eval_examples, d.eval_split) if eval_examples is not None else None
    train_split = eval_split if train_examples is None else tokenize(train_examples, d.train_split)
    if d.task_field:
        spec = dataclasses.replace(spec, tasks=task_names(o, saved, train_split, eval_split))
    for split in (train_split, eval_split):
        if split is not None:
            split.task_ids = prefix_lib.task_ids(spec, split.examples)
    widths = [data.padded_lengths(s, d.max_source_length, d.max_target_length)
              for s in (train_split, eval_split) if s is not None]
    source_width, target_width = max(w[0] for w in widths), max(w[1] for w in widths)
    generated = o.generate.max_new_tokens if o.eval.generate else 0
    check_positions(lm.config, spec, source_width, max(target_width, generated))

    t = o.train
    sharding.check_batch_size(t.batch_size, mesh, t.grad_accum_steps)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batcher = lambda split, size, **packing: data.Batcher(
        split, size, source_width, target_width, pad_id, left_pad_source=not encoder_decoder, seed=t.seed,
        process_index=jax.process_index(), process_count=jax.process_count(), **packing)
    packing = {}
    if d.pack:
        check_packing(o, spec)
        if encoder_decoder:  # the encoder's row: sources; the decoder's row: their targets (`targets_per_row`)
            packing = dict(pack_width=d.pack_width or source_width, encoder_decoder=True)
        else:
            packing = dict(pack_width=d.pack_width or source_width + target_width,
                           separator_id=lm.config.separator_token_id)
    train = batcher(train_split, t.batch_size, **packing)
    if d.pack:  # a packed row's positions run up to its width
        check_positions(lm.config, spec, train.pack_width, train.targets_per_row if encoder_decoder else 0,
                        packed=True)
    if train.steps_per_epoch == 0:
        raise ConfigError(f"train.batch_size={t.batch_size} is larger than the {len(train_split)} training "
                          "examples; lower it.")
    eval_size = t.eval_batch_size or t.batch_size
    sharding.check_batch_size(eval_size, mesh,
                              field="train.eval_batch_size" if t.eval_batch_size else "train.batch_size")
    total = t.steps or math.ceil(t.epochs * train.steps_per_epoch)
    if total < 1:
        raise ConfigError(f"train.steps={t.steps} / train.epochs={t.epochs} give no step to run.")
    eval_batcher = batcher(eval_split, eval_size, length_buckets=o.eval.length_buckets) if eval_split else None
    return RunPlan(o, lm, fingerprint, tokenizer, spec, mesh, train, eval_batcher,
                   total, workdir, init_ids, saved)
