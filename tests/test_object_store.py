"""Workdir files on an object store: every run file goes through `etils.epath`, so `gs://bucket/run` works.

Offline, `gs://` is served by fsspec's in-memory filesystem (what epath uses for `gs://` without TensorFlow).
Orbax's own array writes to `gs://` go through TensorStore's GCS driver and are Orbax's to test.
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np
import pytest
from etils import epath

from prefix_jax import prefix as prefix_lib
from prefix_jax import workdir
from prefix_jax.metrics_file import MetricsWriter, read_metrics
from prefix_jax.models.prefix_contract import StackGeometry


@pytest.fixture
def bucket(monkeypatch):
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    from etils.epath import backend
    from fsspec.registry import _registry

    for protocol in ("gs", "gcs"):
        fsspec.register_implementation(protocol, MemoryFileSystem, clobber=True)
    backend._FileSystemSpecBackend._get_filesystem.cache_clear()
    MemoryFileSystem.store.clear()
    yield epath.Path("gs://bucket/run")
    MemoryFileSystem.store.clear()
    for protocol in ("gs", "gcs"):
        _registry.pop(protocol, None)
    backend._FileSystemSpecBackend._get_filesystem.cache_clear()


def test_lock_record_metrics_and_export_go_to_the_object_store(bucket, tmp_path):
    lock = workdir.WorkdirLock(bucket).acquire()
    assert json.loads((bucket / workdir.REMOTE_LOCK_FILE).read_text())["pid"] > 0
    with pytest.raises(workdir.WorkdirBusyError, match="in use by another run"):
        workdir.WorkdirLock(bucket).acquire()

    workdir.record_run(bucket, {"train": {"steps": 3}}, "train", 0)
    workdir.record_run(bucket, {"train": {"steps": 9}}, "train", 3)
    assert json.loads((bucket / workdir.CONFIG_FILE).read_text()) == {"train": {"steps": 3}}
    assert len((bucket / workdir.RUNS_FILE).read_text().splitlines()) == 2

    writer = MetricsWriter(bucket)
    writer.write(1, {"loss": 2.0})
    writer.write(2, {"loss": 1.5})
    writer.write(2, {"loss": 1.5})  # a replayed step
    assert [(r["step"], r["loss"]) for r in read_metrics(bucket)] == [(1, 2.0), (2, 1.5)]

    spec = prefix_lib.PrefixSpec(length=2, placements=("decoder",), geometry={"decoder": StackGeometry(2, 2, 4)},
                                 hidden_size=8, method="prefix_direct")
    params = prefix_lib.init_params(spec, jax.random.PRNGKey(0))
    prefix_lib.export(params, spec, bucket / "export", {"base_model": "m"})
    assert not list(tmp_path.iterdir())  # nothing went to a local disk instead
    local = tmp_path / "copy"
    local.mkdir()
    for name in (prefix_lib.EXPORT_WEIGHTS, prefix_lib.EXPORT_META):
        (local / name).write_bytes((bucket / "export" / name).read_bytes())
    loaded, meta = prefix_lib.load_export(local)
    expected = prefix_lib.materialize(params, spec)
    np.testing.assert_array_equal(loaded.kv["decoder"].key, expected.kv["decoder"].key)

    lock.release()
    assert not (bucket / workdir.REMOTE_LOCK_FILE).exists()
    workdir.WorkdirLock(bucket).acquire().release()


def test_a_lock_that_stopped_beating_is_taken_over(bucket):
    bucket.mkdir(parents=True, exist_ok=True)
    (bucket / workdir.REMOTE_LOCK_FILE).write_text(json.dumps({"host": "gone", "pid": 1,
                                                               "heartbeat": time.time() - 3600}))
    lock = workdir.WorkdirLock(bucket, stale_after_s=600).acquire()
    assert json.loads((bucket / workdir.REMOTE_LOCK_FILE).read_text())["host"] != "gone"
    lock.release()
