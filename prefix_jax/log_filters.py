"""Log records of our libraries that are false for this program, or that it reports itself in one line.

`install()` (idempotent) drops: Orbax's "Given directory is read only" (said of the read-only managers that
inspect a workdir, not of the directory); Orbax's and asyncio's tracebacks of a save that failed on a full or
read-only disk (`checkpoint.CheckpointWriteError` says it in one line); JAX's "Unable to initialize backend
'tpu'" when libtpu is simply not installed (a CPU or GPU host). Everything else is kept.
"""

from __future__ import annotations

import logging

from prefix_jax import checkpoint

_installed = False


class _Drop(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Given directory is read only"):
            return False
        if message.startswith("Unable to initialize backend 'tpu'") and "cannot open shared object file" in message:
            return False
        if record.levelno >= logging.ERROR:
            error = record.exc_info[1] if record.exc_info else None
            if checkpoint.disk_error(error) is not None or any(w in message for w in checkpoint.DISK_FULL_WORDS):
                return False
        return True


def install() -> None:
    """Adds the filter to the loggers those records come from."""
    global _installed
    if _installed:
        return
    for name in ("absl", "asyncio", "jax._src.xla_bridge"):
        logging.getLogger(name).addFilter(_Drop())
    _installed = True
