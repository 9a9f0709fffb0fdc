"""Stopping cleanly on SIGTERM / SIGINT: finish the step, save a checkpoint, exit with `EXIT_PREEMPTED`.

One process: a signal handler sets a flag the loop reads after each step. Several processes: every host
must stop at the same step, so the loop asks JAX's preemption sync point, which agrees on that step
through the coordination service without a collective per step (JAX catches SIGTERM itself there).
"""

from __future__ import annotations

import logging
import signal
from types import FrameType
from typing import Any

import jax

log = logging.getLogger("prefix_jax")

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again" — schedulers that requeue on non-zero exits resume the run


class Preempted(Exception):
    """Raised by the loop after the checkpoint of the step it stopped at is written."""

    def __init__(self, step: int):
        super().__init__(f"stopped by a signal after step {step}; its checkpoint is saved, rerun the same command "
                         "to resume.")
        self.step = step


class StopSignal:
    """Context manager catching SIGTERM/SIGINT for its lifetime; `should_stop(step)` says when to save and exit."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._multi_process = jax.process_count() > 1

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait for the save
        self.received = signum
        log.warning("received %s: finishing this step, then saving a checkpoint and exiting (Ctrl-C again to "
                    "abort without saving)", signal.Signals(signum).name)

    def __enter__(self) -> "StopSignal":
        import threading

        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be installed from the main thread
        if self._multi_process:
            return self  # SIGTERM belongs to JAX's preemption service; a local Ctrl-C cannot stop every host
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def should_stop(self, step: int) -> bool:
        """True when every process should save at `step` and exit."""
        if self._multi_process:
            from jax.experimental import multihost_utils

            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # the preemption service is disabled (jax_enable_preemption_service)
                return False
        return self.received is not None
