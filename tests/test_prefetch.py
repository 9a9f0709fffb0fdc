"""The prefetcher: same batches in the same step order, truly ahead, errors surface, and its thread always ends."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from prefix_jax import data, sharding
from prefix_jax.prefetch import PrefetchError, Prefetcher


class Recorder:
    """`make_batch` that records which steps were asked for, optionally failing at one step."""

    def __init__(self, fail_at: int | None = None):
        self.calls: list[int] = []
        self.fail_at = fail_at
        self.called = threading.Condition()

    def __call__(self, step: int) -> dict:
        if step == self.fail_at:
            raise RuntimeError(f"no batch for step {step}")
        with self.called:
            self.calls.append(step)
            self.called.notify_all()
        return {"step": step}

    def wait_for(self, step: int) -> bool:
        with self.called:
            return self.called.wait_for(lambda: step in self.calls, timeout=10)


def test_steps_in_order_from_the_resume_step_and_the_thread_ends():
    make = Recorder()
    with Prefetcher(make, 3, 11, depth=2) as batches:
        got = list(batches)
    assert got == [(s, {"step": s}) for s in range(3, 11)]
    assert make.calls == list(range(3, 11))
    assert not batches.alive


def test_the_next_batch_is_prepared_while_the_current_step_runs_and_no_more_than_depth_ahead():
    make = Recorder()
    with Prefetcher(make, 0, 100, depth=3) as batches:
        step, _ = next(batches)
        assert step == 0
        assert make.wait_for(1)  # made while the consumer still "runs" step 0
        assert make.wait_for(3)
        # three in the queue (1..3) plus at most one being made (blocked on a full queue)
        assert max(make.calls) <= 0 + 3 + 1
    assert not batches.alive
    assert max(make.calls) <= 4


def test_an_error_making_a_batch_surfaces_at_its_step_and_the_thread_ends():
    make = Recorder(fail_at=4)
    batches = Prefetcher(make, 0, 10)
    got = []
    with pytest.raises(RuntimeError, match="no batch for step 4"):
        for step, _ in batches:
            got.append(step)
    assert got == [0, 1, 2, 3]
    assert not batches.alive
    with pytest.raises(StopIteration):
        next(batches)


def test_an_error_in_the_loop_or_a_break_stops_the_thread():
    batches = Prefetcher(Recorder(), 0, 1000, depth=2)
    with pytest.raises(ZeroDivisionError):
        with batches:
            for step, _ in batches:
                if step == 2:
                    1 / 0
    assert not batches.alive
    with Prefetcher(Recorder(), 0, 1000) as batches:
        for step, _ in batches:
            break
    assert not batches.alive


def test_bad_depth_is_refused():
    with pytest.raises(PrefetchError, match="^[^\n]+$"):
        Prefetcher(Recorder(), 0, 1, depth=0)


def test_device_batches_equal_the_batchers_batches_for_each_step():
    rng = np.random.default_rng(0)
    split = data.TokenizedSplit(source_ids=[list(rng.integers(3, 50, rng.integers(1, 6))) for _ in range(10)],
                                target_ids=[list(rng.integers(3, 50, rng.integers(1, 4))) for _ in range(10)],
                                examples=[])
    batcher = data.Batcher(split, global_batch_size=4, source_width=6, target_width=4, pad_id=0,
                           left_pad_source=False, seed=3)
    mesh = sharding.make_mesh()
    make = lambda step: sharding.shard_batch(batcher.train_batch(step), mesh)
    with Prefetcher(make, 5, 12) as batches:
        for step, batch in batches:
            expected = batcher.train_batch(step)
            assert sorted(batch) == sorted(expected)
            for key, value in expected.items():
                np.testing.assert_array_equal(np.asarray(batch[key]), value)
