"""What a training run is asked to do, as typed values: one frozen dataclass per config group.

`from_config(config)` is the one place a run's ml_collections config is read. It checks every value
(`config_checks.check`) and returns a `RunOptions`; building (`run_setup`) and the loop (`trainer`) read
only that. The raw config travels along as a plain dict (`RunOptions.config`) to be recorded in config.json
and in checkpoint metadata, never to be read again. Defaults live in configs/default.py, not here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from prefix_jax import config_checks
from prefix_jax.config_checks import ConfigError
from prefix_jax.generate import GenerationConfig


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """`model`: the frozen LM and how it computes."""

    name_or_path: str  # HF Hub id or local checkpoint directory
    tokenizer: str  # "": the model's own
    param_dtype: str
    compute_dtype: str  # "": param_dtype
    remat: str  # models.common.remat_policy name
    attention_kernel: str  # models.fused_attention.ATTENTION_KERNELS
    positions_after_prefix: bool | None  # None: the paper's choice for the architecture
    create_tiny: str  # offline demos: run_setup.prepare_offline_demo builds this architecture at name_or_path


@dataclasses.dataclass(frozen=True)
class PrefixOptions:
    """`prefix`: the trainable prefix (turned into a `prefix.PrefixSpec` once the LM is known)."""

    method: str
    length: int  # 0 with init="words": as many as init_text has tokens
    placements: tuple[str, ...]
    mlp_hidden: int
    mlp_activation: str
    dropout: float
    init: str
    init_text: str
    init_fit_steps: int
    init_fit_learning_rate: float
    tie: tuple[tuple[str, ...], ...]


@dataclasses.dataclass(frozen=True)
class DataOptions:
    """`data`: where the examples come from (what `data.read_examples` reads) and how they are cut."""

    name: str
    config_name: str
    data_files: Mapping[str, str]  # split -> local file; "" = unset
    format: str
    source_field: str
    target_field: str
    task_field: str  # multi-task: the column naming each row's task
    source_prefix: str
    target_prefix: str
    train_split: str
    eval_split: str  # "": no evaluation
    max_source_length: int
    max_target_length: int
    max_train_examples: int  # 0: all
    max_eval_examples: int  # 0: all
    pack: bool  # decoder-only training batches: packed rows (train.batch_size rows of pack_width tokens)
    pack_width: int  # 0: source width + target width


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """`train`: steps, batches, checkpoints, resume and export."""

    workdir: str
    batch_size: int  # global
    eval_batch_size: int  # 0: batch_size
    epochs: float
    steps: int  # 0: from epochs
    stop_at: int  # 0: run every step
    seed: int
    label_smoothing: float
    loss_chunk_tokens: int  # 0: full logits
    log_every: int
    eval_every: int  # 0: only at the end
    save_every: int
    keep_checkpoints: int  # 0: all
    resume: bool
    resume_anyway: bool
    max_nonfinite_steps: int
    export: bool
    prefetch_depth: int
    grad_accum_steps: int
    eval_only: bool


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """`eval`: what each evaluation decodes and scores."""

    generate: bool
    metrics: tuple[str, ...]
    max_generate: int  # 0: all


@dataclasses.dataclass(frozen=True)
class OptimOptions:
    """`optim`: the arguments of `optim.make_optimizer` besides the tree and the step count."""

    learning_rate: float
    warmup_steps: int
    weight_decay: float
    max_grad_norm: float  # 0: no clipping
    b1: float
    b2: float
    eps: float
    frozen: tuple[str, ...]  # regexes of trainable-tree paths kept fixed


@dataclasses.dataclass(frozen=True)
class MeshOptions:
    """`mesh`: devices, processes and how the frozen LM is laid out over them."""

    shape: tuple[int, ...]  # (data, fsdp, model); -1: the rest
    lm_partitioning: str
    num_devices: int  # 0: all
    coordinator_address: str  # "": one process
    num_processes: int
    process_id: int


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


_GROUPS: dict[str, type] = {"model": ModelOptions, "prefix": PrefixOptions, "data": DataOptions,
                            "train": TrainOptions, "eval": EvalOptions, "optim": OptimOptions, "mesh": MeshOptions}


def _plain(value: Any) -> Any:
    """Nested ConfigDicts as dicts and sequences as tuples: values a frozen dataclass can hold."""
    if hasattr(value, "items"):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return value


def _group(config: Any, name: str, cls: type) -> Any:
    group = config[name]
    fields = [f.name for f in dataclasses.fields(cls)]
    missing = [f for f in fields if f not in group]
    if missing:
        raise ConfigError(f"the config has no field {name}.{missing[0]}; start it from configs/default.py.")
    return cls(**{f: _plain(group[f]) for f in fields})


def from_config(config: Any) -> RunOptions:
    """Checks `config` (a resolved ml_collections config) and returns its values typed, each read once here.

    A field that no option holds is an error: it would otherwise be silently ignored.
    """
    config_checks.check(config)
    known = {**{name: {f.name for f in dataclasses.fields(cls)} for name, cls in _GROUPS.items()},
             "generate": {f.name for f in dataclasses.fields(GenerationConfig)}}
    for name in config:
        unused = sorted(set(config[name]) - known[name]) if name in known else []
        if name not in known or unused:
            field = name if name not in known else f"{name}.{unused[0]}"
            raise ConfigError(f"config field {field} is not a training option (prefix_jax/run_options.py); remove "
                              "it from the config file.")
    groups = {name: _group(config, name, cls) for name, cls in _GROUPS.items()}
    return RunOptions(**groups, generate=GenerationConfig.from_config(config.generate), config=config.to_dict(),
                      config_text=str(config))
