"""The trainable prefix: spec, parameters, reparameterization, materialization and export.

The trainable tree is a plain dict of arrays, one entry per *group* of placements that share
parameters (by default every placement is its own group, as in the paper; `PrefixSpec.tie` joins
placements into one group, e.g. `(("decoder", "cross"),)` as PEFT's layout implies):

  method "prefix" / "infix"  group -> {"embedding": [P, D], "mlp_in": Dense(D->F), "mlp_out": Dense(F->E)}
  method "prefix_direct"     group -> {"kv": [P, E]}               (no MLP: deep prompt tuning)
  method "embedding_only"    {"prompt": {"embedding": [P, D]}}     (input-layer virtual tokens)

with E = 2 * L * H * K (layers, heads, head dim; letters as in `prefix_jax.shapes`), laid out
layer-major as PEFT lays it out: for layer l, the key is columns `[2l * H*K, (2l+1) * H*K)` and the
value the next `H*K`. `materialize` turns the tree into per-placement `KV(key, value)` of shape
`[layers, heads, P, head_dim]`; after training the MLP can be dropped and only those are kept
(`export`). "infix" is the paper's `[x; INFIX; y]` for decoder-only models: the same K/V, seen by
target tokens only (see `Prefix.infix`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from prefix_jax import fingerprint, prefix_bank
from prefix_jax.models import common, dropout
from prefix_jax.models.prefix_contract import DECODER, KV, BankKV, Prefix, StackGeometry
from prefix_jax.sharding import MODEL_AXIS

METHODS = ("prefix", "prefix_direct", "embedding_only", "infix")
# normal: N(0, 1) virtual tokens / direct prefixes and PyTorch-default MLP layers (PEFT; the paper's MLP).
# uniform: U(-0.5, 0.5) virtual tokens / direct prefixes (the random-uniform init of prompt tuning).
# zero: the last MLP layer (or the direct prefix) starts at zero (PEFT's init_weights="zero").
# words: from the frozen LM's own activations on a text (`prefix_init.init_from_text`).
INITS = ("normal", "uniform", "zero", "words")


@dataclasses.dataclass(frozen=True)
class PrefixSpec:
    """Everything that fixes the shapes and meaning of a prefix for one model."""

    length: int
    placements: tuple[str, ...]
    geometry: Mapping[str, StackGeometry]  # of the model, per placement it offers
    hidden_size: int  # the model's d_model (embedding width of virtual tokens)
    method: str = "prefix"
    mlp_hidden: int = 512
    mlp_activation: str = "tanh"
    dropout: float = 0.0
    init: str = "normal"
    tie: tuple[tuple[str, ...], ...] = ()  # groups of placements sharing one set of parameters
    tasks: tuple[str, ...] = ()  # multi-task: one prefix per task (each param leaf gets a leading task axis)

    def __post_init__(self) -> None:
        if self.tasks and (self.method == "embedding_only" or len(set(self.tasks)) != len(self.tasks)):
            raise ValueError(f"data.task_field: tasks {list(self.tasks)} must be distinct, and need K/V prefixes "
                             "(prefix.method other than 'embedding_only').")
        if self.method not in METHODS:
            raise ValueError(f"prefix.method={self.method!r} is not one of {METHODS}.")
        if self.length < 1:
            raise ValueError(f"prefix.length={self.length} must be at least 1.")
        if self.init not in INITS:
            raise ValueError(f"prefix.init={self.init!r} is not one of {INITS}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"prefix.dropout={self.dropout} must be in [0, 1).")
        if self.uses_mlp:
            if self.mlp_hidden < 1:
                raise ValueError(f"prefix.mlp_hidden={self.mlp_hidden} must be at least 1.")
            common.activation(self.mlp_activation, "prefix.mlp_activation")
        if self.method == "embedding_only":
            if self.tie:
                raise ValueError("prefix.tie does not apply to method='embedding_only' (it has no placements).")
            return
        if not self.placements:
            raise ValueError(f"prefix.placements is empty; name at least one of {sorted(self.geometry)}.")
        unknown = [p for p in self.placements if p not in self.geometry]
        if unknown:
            raise ValueError(f"prefix.placements has {unknown}, which this model does not have; it has "
                             f"{sorted(self.geometry)}.")
        if len(set(self.placements)) != len(self.placements):
            raise ValueError(f"prefix.placements={self.placements} names a placement twice.")
        if self.method == "infix" and (set(self.geometry) != {DECODER} or self.placements != (DECODER,)):
            raise ValueError("prefix.method='infix' is for decoder-only models ([x; INFIX; y]) with "
                             "prefix.placements=('decoder',).")
        tied = [p for group in self.tie for p in group]
        if len(set(tied)) != len(tied) or not set(tied) <= set(self.placements):
            raise ValueError(f"prefix.tie={self.tie} must name distinct placements from prefix.placements="
                             f"{self.placements}.")
        for group in self.tie:
            if len({self.geometry[p] for p in group}) != 1:
                raise ValueError(f"prefix.tie group {group} joins placements of different shapes: "
                                 f"{[self.geometry[p] for p in group]}.")

    @property
    def uses_mlp(self) -> bool:
        return self.method in ("prefix", "infix")

    def groups(self) -> dict[str, tuple[str, ...]]:
        """Parameter group name -> the placements it feeds (`'decoder+cross'` for a tied pair)."""
        tied = {p: group for group in self.tie for p in group}
        out: dict[str, tuple[str, ...]] = {}
        for placement in self.placements:
            group = tied.get(placement, (placement,))
            out.setdefault("+".join(group), group)
        return out

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["placements"] = list(self.placements)
        d["tie"] = [list(g) for g in self.tie]
        d["geometry"] = {k: dataclasses.asdict(v) for k, v in self.geometry.items()}
        if self.tasks:  # checkpoints of the earlier layout ({task: params}) differ here, so resuming them is refused
            d["task_layout"] = TASK_LAYOUT
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "PrefixSpec":
        d = dict(d)
        d["placements"] = tuple(d["placements"])
        d["tie"] = tuple(tuple(g) for g in d.get("tie", ()))
        d["tasks"] = tuple(d.get("tasks", ()))
        d["geometry"] = {k: StackGeometry(**v) for k, v in d["geometry"].items()}
        d.pop("task_layout", None)
        return cls(**d)


def _torch_linear_init(rng: jax.Array, fan_in: int, fan_out: int) -> dict:
    """PyTorch's default `nn.Linear` init (what PEFT's prefix MLP starts from): U(+-1/sqrt(fan_in))."""
    k_rng, b_rng = jax.random.split(rng)
    bound = 1.0 / np.sqrt(fan_in)
    return {
        "kernel": jax.random.uniform(k_rng, (fan_in, fan_out), jnp.float32, -bound, bound),
        "bias": jax.random.uniform(b_rng, (fan_out,), jnp.float32, -bound, bound),
    }


def _virtual_tokens(rng: jax.Array, shape: tuple[int, ...], init: str) -> jax.Array:
    if init == "uniform":
        return jax.random.uniform(rng, shape, jnp.float32, -0.5, 0.5)
    return jax.random.normal(rng, shape, jnp.float32)


def single_task(spec: PrefixSpec) -> PrefixSpec:
    """The spec of one task's prefix of a multi-task spec (itself for a single-task one)."""
    return dataclasses.replace(spec, tasks=()) if spec.tasks else spec


# Multi-task params are one task's tree with a leading task axis on every leaf (`[T, ...]`), so the program
# (init, materialize, optimizer) does not grow with the number of tasks: the bank is data, not code.
TASK_LAYOUT = "stacked"


def task_params(params: Mapping[str, Any], spec: PrefixSpec, task: str) -> dict:
    """The trainable params of one task of a multi-task spec (a single-task tree, for `single_task(spec)`)."""
    index = spec.tasks.index(task)
    return jax.tree.map(lambda x: x[index], params)


def stack_tasks(per_task: Sequence[Mapping[str, Any]]) -> dict:
    """Single-task trees, one per task in order -> the multi-task tree (leading task axis)."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *per_task)


def split_tasks(params: Mapping[str, Any], spec: PrefixSpec) -> dict[str, dict]:
    """Per task, its single-task tree (for `single_task(spec)`): `{task: tree}` in `spec.tasks` order, or
    `{"": params}` for a single-task spec. With `join_tasks`, the one place per-task work is split and joined."""
    if not spec.tasks:
        return {"": dict(params)}
    return {task: task_params(params, spec, task) for task in spec.tasks}


def task_ids(spec: PrefixSpec, examples: Sequence[Any]) -> list[int] | None:
    """Each example's prefix index in `spec.tasks` (from its `task`), the rows' `task_ids`; None for one task."""
    if not spec.tasks:
        return None
    index = {task: i for i, task in enumerate(spec.tasks)}
    return [index[e.task] for e in examples]


def join_tasks(per_task: Mapping[str, Any], spec: PrefixSpec) -> dict:
    """Inverse of `split_tasks`: per-task trees (in `spec.tasks` order) -> the params of `spec`."""
    if not spec.tasks:
        return per_task[""]
    return stack_tasks([per_task[task] for task in spec.tasks])


def init_params(spec: PrefixSpec, rng: jax.Array) -> dict:
    """Random trainable params (float32), per `spec.init` ("words" starts random: see `prefix_init`).

    Multi-task specs give one task's tree with a leading task axis, task t drawn from split(rng, T)[t]."""
    if spec.tasks:
        one = single_task(spec)
        return jax.vmap(lambda key: init_params(one, key))(jax.random.split(rng, len(spec.tasks)))
    if spec.method == "embedding_only":
        emb = _virtual_tokens(rng, (spec.length, spec.hidden_size), spec.init)
        return {"prompt": {"embedding": jnp.zeros_like(emb) if spec.init == "zero" else emb}}
    params: dict = {}
    groups = spec.groups()
    for (name, placements), rng_g in zip(groups.items(), jax.random.split(rng, len(groups))):
        size = spec.geometry[placements[0]].kv_size
        e_rng, in_rng, out_rng = jax.random.split(rng_g, 3)
        if spec.method == "prefix_direct":
            kv = _virtual_tokens(e_rng, (spec.length, size), spec.init)
            params[name] = {"kv": jnp.zeros_like(kv) if spec.init == "zero" else kv}
            continue
        mlp_out = _torch_linear_init(out_rng, spec.mlp_hidden, size)
        if spec.init == "zero":
            mlp_out = jax.tree.map(jnp.zeros_like, mlp_out)
        params[name] = {
            "embedding": _virtual_tokens(e_rng, (spec.length, spec.hidden_size), spec.init),
            "mlp_in": _torch_linear_init(in_rng, spec.hidden_size, spec.mlp_hidden),
            "mlp_out": mlp_out,
        }
    return params


def mlp(group: Mapping[str, Any], activation: str) -> jax.Array:
    """The reparameterization `P = MLP(P')`: `[P, D] -> [P, E]`."""
    h = group["embedding"] @ group["mlp_in"]["kernel"] + group["mlp_in"]["bias"][None]
    h = common.activation(activation, "prefix.mlp_activation")(h)
    return h @ group["mlp_out"]["kernel"] + group["mlp_out"]["bias"][None]


def unflatten(flat_PxE: jax.Array, geometry: StackGeometry) -> KV:
    """`[P, 2*L*H*K]` (layer-major, key then value) -> `KV` of `[L, H, P, K]`."""
    g = geometry
    x = flat_PxE.reshape(flat_PxE.shape[0], g.num_layers, 2, g.num_heads, g.head_dim)
    x = jnp.transpose(x, (1, 2, 3, 0, 4))  # [L, 2, H, P, K]
    return KV(x[:, 0], x[:, 1])


def flatten(kv: KV) -> jax.Array:
    """Inverse of `unflatten`: `KV` of `[L, H, P, K]` -> `[P, 2*L*H*K]`."""
    x = jnp.stack([kv.key, kv.value], axis=1)  # [L, 2, H, P, K]
    return jnp.transpose(x, (3, 0, 1, 2, 4)).reshape(x.shape[3], -1)


def flat_kv(params: Mapping[str, Any], spec: PrefixSpec) -> dict[str, jax.Array]:
    """Per parameter group, the prefix as `[P, E]` before reshaping (MLP output or the direct parameter)."""
    return {name: mlp(params[name], spec.mlp_activation) if spec.uses_mlp else params[name]["kv"]
            for name in spec.groups()}


def materialize(params: Mapping[str, Any], spec: PrefixSpec, rng: jax.Array | None = None,
                deterministic: bool = True) -> Prefix:
    """Trainable params -> the `Prefix` the model consumes. Dropout (if any) only when not deterministic.

    Multi-task specs give a prefix bank (`prefix_bank.stack`, one prefix per task in `spec.tasks` order, named by
    task); `prefix_bank.for_rows(prefix, task_ids or task names)` then gives each row its task's prefix."""
    if spec.tasks:
        one = single_task(spec)
        if rng is None:
            per_task = jax.vmap(lambda p: materialize(p, one, None, deterministic))(params)
        else:
            keys = jax.random.split(rng, len(spec.tasks))
            per_task = jax.vmap(lambda p, k: materialize(p, one, k, deterministic))(params, keys)
        return prefix_bank.from_stacked(per_task, names=tuple(spec.tasks))
    if spec.method == "embedding_only":
        embeds = params["prompt"]["embedding"]
        if spec.dropout and not deterministic:
            embeds = _dropout(embeds, spec.dropout, rng)
        return Prefix(prompt_embeds=embeds)
    flats = flat_kv(params, spec)
    rngs = jax.random.split(rng, len(flats)) if (spec.dropout and not deterministic) else [None] * len(flats)
    kv = {}
    for (name, flat), rng_g in zip(flats.items(), rngs):
        if rng_g is not None:
            flat = _dropout(flat, spec.dropout, rng_g)
        for placement in spec.groups()[name]:
            kv[placement] = unflatten(flat, spec.geometry[placement])
    return Prefix(kv=kv, infix=spec.method == "infix")


def kv_spec(num_heads: int, mesh: Any) -> PartitionSpec:
    """How a materialized prefix `[layers, heads, P, head_dim]` is laid out: heads over `model` when they divide."""
    model = dict(mesh.shape).get(MODEL_AXIS, 1)
    if model > 1 and num_heads % model == 0:
        return PartitionSpec(None, MODEL_AXIS)
    return PartitionSpec()


def constrain_kv(prefix: Prefix, mesh: Any) -> Prefix:
    """Inside a jitted function: the prefix K/V sharded over heads like the key projection (no-op without `model`).

    A prefix bank (`[L, T, H, P, K]` plus masks and row indices) stays replicated: it is small and gathered per row.
    """
    def constrain(x: jax.Array) -> jax.Array:
        spec = kv_spec(x.shape[1], mesh)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec)) if spec != PartitionSpec() else x

    return prefix.replace(kv={p: kv if isinstance(kv, BankKV) else jax.tree.map(constrain, kv)
                              for p, kv in prefix.kv.items()})


def _dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    if rng is None:
        raise ValueError("prefix.dropout > 0 needs an rng when not deterministic.")
    return dropout.drop(x, rate, rng)


def num_params(params: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


# --- Export: the materialized prefix alone, no MLP, for inference. ---

EXPORT_WEIGHTS = "prefix.safetensors"
EXPORT_META = "prefix.json"


def export(params: Mapping[str, Any], spec: PrefixSpec, directory: str | Path, metadata: Mapping[str, Any]) -> Path:
    """Writes `prefix.safetensors` (`<placement>.key`/`.value` `[L, H, P, K]`, or `prompt_embeds`) + `prefix.json`.

    `directory` may be local or on an object store (any `etils.epath` path)."""
    from etils import epath
    from safetensors.numpy import save

    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    prefix = jax.device_get(materialize(params, spec))
    tensors = {f"{p}.{part}": np.asarray(getattr(kv, part), np.float32)
               for p, kv in prefix.kv.items() for part in ("key", "value")}
    if prefix.prompt_embeds is not None:
        tensors["prompt_embeds"] = np.asarray(prefix.prompt_embeds, np.float32)
    tmp = directory / (EXPORT_WEIGHTS + ".tmp")
    tmp.write_bytes(save(tensors))
    tmp.replace(directory / EXPORT_WEIGHTS)
    (directory / EXPORT_META).write_text(json.dumps({"spec": spec.to_json(), **metadata}, indent=2, default=str))
    return directory


def load_export(directory: str | Path, lm: Any = None) -> tuple[Prefix, dict]:
    """Reads an `export` back: the `Prefix` (carrying the LM it was trained on, `Prefix.trained_on`) and its metadata.

    With `lm` (a `models.PretrainedLM`), refuses a prefix trained on another LM (`fingerprint.PrefixMismatchError`,
    naming both: other weights, architecture or shapes); without, `generate.make_generate_fn` checks when they meet.
    """
    from safetensors.numpy import load_file

    directory = Path(directory)
    for name in (EXPORT_META, EXPORT_WEIGHTS):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} holds no {name}: pass a run's export/ directory (<workdir>/export, "
                                    "or export/<task> for a multi-task run).")
    meta = json.loads((directory / EXPORT_META).read_text())
    tensors = load_file(directory / EXPORT_WEIGHTS)
    kv = {}
    for name in tensors:
        placement, part = name.rsplit(".", 1) if "." in name else (None, None)
        if part == "key":
            kv[placement] = KV(jnp.asarray(tensors[name]), jnp.asarray(tensors[f"{placement}.value"]))
    embeds = tensors.get("prompt_embeds")
    infix = meta["spec"]["method"] == "infix"
    prefix = Prefix(kv=kv, prompt_embeds=None if embeds is None else jnp.asarray(embeds), infix=infix,
                    trained_on=fingerprint.trained_on(meta))
    if lm is not None:
        fingerprint.check_fits(prefix, lm.config, lm.params, lm.name_or_path)
    return prefix, meta
