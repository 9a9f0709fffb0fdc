"""Where training metrics go: a JSON-lines file always, TensorBoard when tensorboardX is installed."""

from __future__ import annotations

import json
import time
from typing import Any, Mapping

from etils import epath

from prefix_jax.workdir import METRICS_FILE, append_line


class MetricsWriter:
    """Appends `{"step": s, ...}` lines to `metrics.jsonl` (process 0 only; others write nothing).

    A resumed run replays the steps after its checkpoint exactly; rows that the interrupted run already
    wrote for those steps (same step, same metric names) are not written twice.
    """

    def __init__(self, workdir: str | epath.PathLike, enabled: bool = True):
        self.enabled = enabled
        self.path = epath.Path(workdir) / METRICS_FILE
        self._tb = None
        self._written: set[tuple[int, frozenset]] = set()
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            text = self.path.read_text() if self.path.exists() else ""
            self._written = {(row["step"], _keys(row)) for row in _parse(text)}
            if text and not text.endswith("\n"):
                append_line(self.path, "")  # end the line a killed run left half-written
            if "://" not in str(self.path):
                try:
                    from tensorboardX import SummaryWriter

                    self._tb = SummaryWriter(str(self.path.parent / "tensorboard"))
                except ImportError:
                    pass

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "time": time.time(), **{k: _scalar(v) for k, v in metrics.items()}}
        key = (row["step"], _keys(row))
        if key in self._written:
            return
        self._written.add(key)
        append_line(self.path, json.dumps(row))
        if self._tb is not None:
            for k, v in row.items():
                if k not in ("step", "time") and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _keys(row: Mapping[str, Any]) -> frozenset:
    return frozenset(k for k in row if k not in ("step", "time", "steps_per_sec"))


def _scalar(v: Any) -> Any:
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def read_metrics(workdir: str | epath.PathLike) -> list[dict]:
    """All rows of a run's `metrics.jsonl` (a line a killed run left half-written is skipped)."""
    path = epath.Path(workdir) / METRICS_FILE
    return _parse(path.read_text() if path.exists() else "")


def _parse(text: str) -> list[dict]:
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
