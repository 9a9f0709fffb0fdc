"""Device mesh, placement of the frozen LM / train state / batches, and multi-host start-up.

Data parallel with `jax.jit` + `NamedSharding`: the batch is split over the `data` axis (across
hosts through `jax.make_array_from_process_local_data`), the prefix state and the frozen LM are
replicated. The same code runs on 1 CPU, 8 simulated devices, several processes and a pod.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
    """`jax.distributed.initialize` when running several processes (no-op for one)."""
    if num_processes is None or num_processes <= 1:
        return
    if not coordinator_address:
        raise ValueError(f"mesh.num_processes={num_processes} needs mesh.coordinator_address (host:port of process 0).")
    # Asking for the backend would initialize it, which must come after `initialize`; read the setting instead.
    if (jax.config.jax_platforms or "").split(",")[0] == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D data-parallel mesh over all (or the first `num_devices`) devices of all processes."""
    devices = jax.devices()
    if num_devices:
        if num_devices > len(devices):
            raise ValueError(f"mesh.num_devices={num_devices} but only {len(devices)} devices are visible.")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the data axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every leaf of `tree` (host arrays) on all devices of the mesh."""
    sharding = replicated(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda i: np.asarray(x)[i]),
                        tree)


def check_batch_size(global_batch_size: int, mesh: Mesh) -> int:
    """The per-process batch size; the global batch must split evenly over devices and processes."""
    devices = mesh.devices.size
    if global_batch_size % devices:
        raise ValueError(f"train.batch_size={global_batch_size} must be a multiple of the number of devices "
                         f"({devices}); use {max(devices, global_batch_size - global_batch_size % devices)}.")
    return global_batch_size // jax.process_count()


def shard_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows of the global batch -> global arrays sharded over `data`."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}
