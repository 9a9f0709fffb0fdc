"""Batches for steps s+1..s+k built and placed on device by a background thread while step s runs.

    with Prefetcher(lambda s: sharding.shard_batch(batcher.train_batch(s), mesh), start, end) as batches:
        for step, batch in batches:
            state, metrics = train_step(state, lm_params, batch)

Batches stay addressed by step (`make_batch(step)` is called for start, start+1, ... in order), so a
resumed run sees exactly the batches an uninterrupted run would. An exception in `make_batch` is raised
by the consumer's `next()` for the step that failed (after the steps before it were handed out). Leaving
the `with` block — normally, by `break`, or by an exception in the loop — stops and joins the thread.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator

from prefix_jax.batch import Batch

_POLL_S = 0.05  # how often a blocked producer looks whether it was told to stop


class PrefetchError(ValueError):
    """A prefetcher argument is out of range."""


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


_DONE = object()


class Prefetcher:
    """Iterates `(step, make_batch(step))` for `step` in `[start, end)`, keeping up to `depth` ready ahead."""

    def __init__(self, make_batch: Callable[[int], Batch], start: int, end: int, depth: int = 2):
        if depth < 1:
            raise PrefetchError(f"depth={depth} must be at least 1 (batches prepared ahead); use e.g. 2.")
        self._make_batch = make_batch
        self._start, self._end = start, end
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._finished = False
        self._thread = threading.Thread(target=self._produce, name="prefix_jax-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        """Blocks until there is room or the consumer stopped us; False when stopped."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        for step in range(self._start, self._end):
            if self._stop.is_set():
                return
            try:
                item = (step, self._make_batch(step))
            except BaseException as e:  # handed to the consumer, which re-raises it
                self._put(_Failed(e))
                return
            if not self._put(item):
                return
        self._put(_DONE)

    def __iter__(self) -> Iterator[tuple[int, Batch]]:
        return self

    def __next__(self) -> tuple[int, Batch]:
        if self._finished:
            raise StopIteration
        while True:
            try:
                item = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():  # cannot happen unless killed; never hang
                    item = _DONE
                    break
        if item is _DONE or isinstance(item, _Failed):
            self.close()
            if isinstance(item, _Failed):
                raise item.error
            raise StopIteration
        return item

    @property
    def alive(self) -> bool:
        """Whether the producer thread is still running."""
        return self._thread.is_alive()

    def close(self) -> None:
        """Stops the producer, drops what it prepared, and waits for its thread to end."""
        self._finished = True
        self._stop.set()
        while self._thread.is_alive():
            try:  # unblock a producer waiting for room
                self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=_POLL_S)
        while not self._queue.empty():
            self._queue.get_nowait()

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
