"""A run's directory: one run at a time (a lock held for the run's life), and a record of every run in it.

Every file a run writes goes under its workdir through `etils.epath`, so the same code writes to a local
disk or an object store (`gs://bucket/run`). Nothing here deletes or rewrites a file an earlier run wrote.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import stat
import sys
import time
from pathlib import Path
from typing import Any

from etils import epath

log = logging.getLogger("prefix_jax")

LOCK_FILE = ".lock"  # local disks: held with flock, so a crashed run never leaves a stale lock
REMOTE_LOCK_FILE = "lock.json"  # object stores: an owner record refreshed while the run lives
RUNS_FILE = "runs.jsonl"  # one line per run started in this workdir
CONFIG_FILE = "config.json"  # the config of the run that created the workdir
METRICS_FILE = "metrics.jsonl"  # `metrics_file.MetricsWriter` writes it


class WorkdirBusyError(ValueError):
    """Another live run holds the workdir."""


class WorkdirError(ValueError):
    """The workdir cannot be used safely (a run file is a link to elsewhere)."""


def check_run_files(workdir: Path) -> None:
    """Refuses a local workdir whose run files (config.json, metrics.jsonl, runs.jsonl, .lock) are symbolic links
    out of it: a run would write through them into files it does not own. `.lock` may be no link at all."""
    root = workdir.resolve()
    for name in (CONFIG_FILE, METRICS_FILE, RUNS_FILE, LOCK_FILE):
        path = workdir / name
        if not path.is_symlink():
            continue
        target = path.resolve()
        if name == LOCK_FILE or not target.is_relative_to(root):
            raise WorkdirError(f"train.workdir={str(workdir)!r}: {name} is a symbolic link to {str(target)!r}"
                               f"{'' if name == LOCK_FILE else ' outside the workdir'}, which a run would write "
                               "through; remove the link or choose another train.workdir.")


def _owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _is_local(path: epath.Path) -> bool:
    return "://" not in str(path)


class WorkdirLock:
    """Exclusive use of a workdir by one run (taken by process 0 only; other hosts share its run).

    Local disks use `fcntl.flock`, which the kernel releases when the process dies, so a crashed run leaves
    no stale lock. Object stores have no locks: there a `lock.json` owner record is refreshed by `heartbeat()`,
    and a record older than `stale_after_s` is taken to belong to a dead run.
    """

    def __init__(self, workdir: epath.Path, stale_after_s: float = 900.0):
        self.workdir = workdir
        self.stale_after_s = stale_after_s
        self._fd: int | None = None
        self._remote_path: epath.Path | None = None

    def acquire(self) -> "WorkdirLock":
        self.workdir.mkdir(parents=True, exist_ok=True)
        if _is_local(self.workdir):
            self._acquire_local()
        else:
            self._acquire_remote()
        return self

    def _acquire_local(self) -> None:
        import fcntl

        path = self.workdir / LOCK_FILE
        try:  # never through a link: O_NOFOLLOW; and only a regular file is truncated below
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as e:
            raise WorkdirError(f"train.workdir={str(self.workdir)!r}: its lock file {LOCK_FILE} cannot be opened "
                               f"({os.strerror(e.errno)}; a symbolic link is never followed); remove it or choose "
                               "another train.workdir.") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise WorkdirError(f"train.workdir={str(self.workdir)!r}: its lock file {LOCK_FILE} is not a regular file; "
                               "remove it or choose another train.workdir.")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise WorkdirBusyError(f"train.workdir={str(self.workdir)!r} is in use by another run ({holder}); wait "
                                   "for it to end or choose another train.workdir.") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(_owner()).encode())
        self._fd = fd

    def _acquire_remote(self) -> None:
        path = self.workdir / REMOTE_LOCK_FILE
        if path.exists():
            try:
                record = json.loads(path.read_text())
                age = time.time() - float(record.get("heartbeat", 0))
            except (ValueError, OSError):
                record, age = {}, float("inf")
            if age < self.stale_after_s:
                raise WorkdirBusyError(f"train.workdir={str(self.workdir)!r} is in use by another run "
                                       f"({record.get('host')}, pid {record.get('pid')}, alive {age:.0f} s ago); "
                                       "wait for it to end or choose another train.workdir.")
            log.warning("taking over %s: its run stopped refreshing it %.0f s ago", path, age)
        self._remote_path = path
        self.heartbeat()

    def heartbeat(self) -> None:
        """Object stores: proves the run is alive (called at each log and save). Local: nothing to do."""
        if self._remote_path is not None:
            self._remote_path.write_text(json.dumps({**_owner(), "heartbeat": time.time()}))

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # the file stays (it is tiny and reused); the flock goes with the descriptor
            self._fd = None
        if self._remote_path is not None:
            self._remote_path.unlink(missing_ok=True)  # this run's own record
            self._remote_path = None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def record_run(workdir: epath.Path, config: dict, mode: str, start_step: int) -> None:
    """Writes `config.json` if the workdir has none (the run that created it) and appends this run to `runs.jsonl`.

    A resumed, evaluating or crashed run never replaces the config of the run that made the checkpoints.
    """
    config_path = workdir / CONFIG_FILE
    if not config_path.exists():
        config_path.write_text(json.dumps(config, indent=2, default=str))
    entry = {**_owner(), "mode": mode, "start_step": start_step, "argv": sys.argv, "config": config}
    append_line(workdir / RUNS_FILE, json.dumps(entry, default=str))


def append_line(path: epath.Path, line: str) -> None:
    """Appends one line (object stores cannot append: there the file is rewritten with the line added)."""
    if _is_local(path):
        with open(path, "a") as f:
            f.write(line + "\n")
    else:
        previous = path.read_text() if path.exists() else ""
        path.write_text(previous + line + "\n")
