"""Device mesh, placement of the frozen LM / train state / batches, and multi-host start-up.

The mesh has three named axes, `(data, fsdp, model)`: the batch is split over `data` x `fsdp`
(across hosts through `jax.make_array_from_process_local_data`), the frozen LM is sharded over
`fsdp` (FSDP: weights gathered per layer) and/or `model` (tensor parallelism over heads / MLP /
vocab) by `partitioning`, and the trainable prefix state is replicated. `mesh.shape = (-1, 1, 1)`
(the default) is plain data parallelism. The same code runs on 1 CPU, 8 simulated devices,
several processes and a pod.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from prefix_jax.batch import Batch

DATA_AXIS, FSDP_AXIS, MODEL_AXIS = "data", "fsdp", "model"
MESH_AXES = (DATA_AXIS, FSDP_AXIS, MODEL_AXIS)
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # the batch is split over both: FSDP is data parallelism with sharded weights
AUTO = "auto"  # mesh.coordinator_address="auto": let JAX detect the cluster (Cloud TPU, SLURM, Open MPI)


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
    """`jax.distributed.initialize` when running several processes (no-op for one).

    `coordinator_address="auto"`: no arguments, JAX reads the cluster from its environment, so the
    same command runs on every host of a pod. Otherwise host:port of process 0 plus explicit
    `num_processes` / `process_id` (bare hosts, local multi-process tests).
    """
    if coordinator_address == AUTO:
        jax.distributed.initialize()
        return
    if num_processes is None or num_processes <= 1:
        return
    if not coordinator_address:
        raise ValueError(f"mesh.num_processes={num_processes} needs mesh.coordinator_address (host:port of process 0, "
                         f"or '{AUTO}' on a cluster JAX detects).")
    # Asking for the backend would initialize it, which must come after `initialize`; read the setting instead.
    if (jax.config.jax_platforms or "").split(",")[0] == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, int, int]:
    """`mesh.shape` with its (at most one) `-1` replaced by what the other axes leave of `num_devices`."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES) or any(s == 0 or s < -1 for s in shape) or shape.count(-1) > 1:
        raise ValueError(f"mesh.shape={shape} must be {len(MESH_AXES)} sizes for {MESH_AXES}, each positive or one -1 "
                         "(the rest of the devices), e.g. (-1, 1, 1).")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"mesh.shape={shape}: {known} does not divide the {num_devices} devices; choose sizes "
                             f"whose product divides {num_devices}.")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh.shape={shape} multiplies to {math.prod(shape)} but there are {num_devices} devices; "
                         f"make the sizes multiply to {num_devices} (or use -1 for one axis).")
    return shape  # type: ignore[return-value]


def make_mesh(shape: Sequence[int] = (-1, 1, 1), num_devices: int | None = None) -> Mesh:
    """A `(data, fsdp, model)` mesh over all (or the first `num_devices`) devices of all processes.

    Axes are `Auto` (XLA propagates shardings from the arguments' shardings), not JAX 0.9's default
    `Explicit`. With all devices, `jax.make_mesh` orders them for the physical topology (TPU ICI).
    """
    devices = jax.devices()
    if num_devices:
        if num_devices > len(devices):
            raise ValueError(f"mesh.num_devices={num_devices} but only {len(devices)} devices are visible.")
        devices = devices[:num_devices]
    sizes = resolve_mesh_shape(shape, len(devices))
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if len(devices) == len(jax.devices()):
        return jax.make_mesh(sizes, MESH_AXES, axis_types=axis_types)
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES, axis_types=axis_types)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over `data` x `fsdp`; replicated over `model`."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def batch_shards(mesh: Mesh) -> int:
    """Into how many pieces a batch is split (`data` x `fsdp`)."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def place(tree: Any, shardings: Any) -> Any:
    """Host arrays -> global arrays with the given shardings (one sharding, or a matching tree of them).

    Several processes: each builds only the shards its own devices hold (every process has the host tree).
    """
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda i: np.asarray(x)[i]),
                        tree, shardings)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every leaf of `tree` (host arrays) on all devices of the mesh."""
    return place(tree, replicated(mesh))


def check_batch_size(global_batch_size: int, mesh: Mesh, grad_accum_steps: int = 1,
                     field: str = "train.batch_size") -> int:
    """The per-process batch size; the global batch (and each micro-batch) must split evenly over its shards."""
    shards = batch_shards(mesh)
    if grad_accum_steps < 1:
        raise ValueError(f"train.grad_accum_steps={grad_accum_steps} must be at least 1.")
    unit = shards * grad_accum_steps
    if global_batch_size % unit:
        what = (f"the number of batch shards (mesh data x fsdp = {shards})" if grad_accum_steps == 1 else
                f"train.grad_accum_steps x batch shards ({grad_accum_steps} x {shards})")
        raise ValueError(f"{field}={global_batch_size} must be a multiple of {what}; use "
                         f"{max(unit, global_batch_size - global_batch_size % unit)}.")
    if shards % jax.process_count():
        raise ValueError(f"mesh.shape={tuple(mesh.shape.values())}: data x fsdp = {shards} must be a multiple of the "
                         f"{jax.process_count()} processes (each process reads its own rows of a batch).")
    return global_batch_size // jax.process_count()


def shard_batch(local_batch: Batch, mesh: Mesh) -> Batch:
    """This process's rows of the global batch -> global arrays sharded over `data` x `fsdp`."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def mesh_from_config(mesh_config: Any) -> Mesh:
    """The mesh a run's `mesh` config group describes."""
    return make_mesh(tuple(mesh_config.shape), int(mesh_config.num_devices) or None)
