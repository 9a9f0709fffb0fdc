"""Stopping cleanly on SIGTERM / SIGINT, at any point of a run.

Before the run's first step has finished there is nothing new to save: a signal stops the run at once
(`Preempted(None)`, exit `EXIT_PREEMPTED`), except inside the few writes it defers (`deferred()`: the lock,
config.json, runs.jsonl), which finish first. When the main thread is inside a long native call (an XLA
compilation, a tokenizer batch) and cannot run Python's handler, a watcher thread woken through
`signal.set_wakeup_fd` ends the process with `EXIT_PREEMPTED` after `grace_s` seconds; nothing is being
written then. From the first finished step on, the loop finishes the step in flight, saves a checkpoint
and exits (`Preempted(step)`). Several processes: every host must stop at the same step, so the loop asks
JAX's preemption sync point, which agrees on that step through the coordination service without a
collective per step (JAX catches SIGTERM itself there).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from types import FrameType
from typing import Any, Iterator

import jax

log = logging.getLogger("prefix_jax")

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again" — schedulers that requeue on non-zero exits resume the run


class Preempted(Exception):
    """A signal stopped the run: after saving the checkpoint of `step`, or (`step` None) before any step of this
    run finished, with nothing half-written."""

    def __init__(self, step: int | None):
        super().__init__(f"stopped by a signal after step {step}; its checkpoint is saved, rerun the same command "
                         "to resume." if step is not None else
                         "stopped by a signal before this run finished a step; nothing was half-written, rerun the "
                         "same command to start (or resume) again.")
        self.step = step


class StopSignal:
    """Context manager catching SIGTERM/SIGINT for its lifetime (see the module docstring).

    `immediate`: a signal stops the run at once (set it False once a step has finished: from then on
    `should_stop(step)` says when to save and exit).
    """

    def __init__(self, grace_s: float = 20.0) -> None:
        self.received: int | None = None
        self.immediate = True
        self.grace_s = grace_s
        self._deferring = 0
        self._previous: dict[int, Any] = {}
        self._multi_process = jax.process_count() > 1
        self._wakeup: tuple[int, int] | None = None
        self._previous_wakeup = -1

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait for the save
        self.received = signum
        if self.immediate and not self._deferring:
            log.warning("received %s before a step finished: stopping now", signal.Signals(signum).name)
            raise Preempted(None)
        log.warning("received %s: finishing this step, then saving a checkpoint and exiting (Ctrl-C again to "
                    "abort without saving)", signal.Signals(signum).name)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A write a signal must not cut in half: an immediate stop waits for its end."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
        if self.immediate and not self._deferring and self.received is not None:
            raise Preempted(None)

    def _watch(self, read_fd: int) -> None:
        """Ends the process when a signal came while Python's handler cannot run (a long native call)."""
        while os.read(read_fd, 64):
            deadline = time.monotonic() + self.grace_s
            while time.monotonic() < deadline and self._wakeup is not None:
                time.sleep(0.05)
            if self._wakeup is not None and self.immediate and not self._deferring and self.received is None:
                log.warning("a stop signal came while the main thread was in a native call for %.0f s; nothing was "
                            "being written: exiting with status %d", self.grace_s, EXIT_PREEMPTED)
                logging.shutdown()
                os._exit(EXIT_PREEMPTED)
        os.close(read_fd)

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be installed from the main thread
        if self._multi_process:
            return self  # SIGTERM belongs to JAX's preemption service; a local Ctrl-C cannot stop every host
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        self._previous_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        self._wakeup = (read_fd, write_fd)
        threading.Thread(target=self._watch, args=(read_fd,), name="stop-signal-watch", daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        if self._wakeup is not None:
            signal.set_wakeup_fd(self._previous_wakeup)
            write_fd, self._wakeup = self._wakeup[1], None
            os.close(write_fd)  # the watcher reads end-of-file and stops

    def should_stop(self, step: int) -> bool:
        """True when every process should save at `step` and exit."""
        if self._multi_process:
            from jax.experimental import multihost_utils

            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # the preemption service is disabled (jax_enable_preemption_service)
                return False
        return self.received is not None


def ignore_signals_after_done() -> None:
    """The run is complete: a SIGTERM/SIGINT while the process winds down changes nothing (no exit 143)."""
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)
