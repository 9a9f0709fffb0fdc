"""The benchmark scripts run end to end on a CPU (slow: each compiles several train steps)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_accelerator_smoke_runs_every_row_on_cpu(tmp_path):
    """`benchmarks/accelerator.sh --smoke`: every row measured (ours and PEFT), one table, JSON written.

    About a minute of CPU; the time limits are raised so that a loaded test machine does not skip rows."""
    out = tmp_path / "accelerator.json"
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "accelerator.sh"), "--smoke", "--budget", "800",
                          "--json", str(out)], capture_output=True, text=True, timeout=900,
                         env={**os.environ, "ACCELERATOR_LIMIT_S": "850"})
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert [r["label"] for r in results] == ["gpt2-tiny bfloat16", "t5-tiny bfloat16 encoder+decoder+cross",
                                             "llama-tiny bfloat16", "llama-tiny bfloat16 remat=minimal chunk=8"]
    for r in results:
        assert r["ours"]["step_s"] > 0 and r["ours"]["loss"] == pytest.approx(r["ours"]["loss"])  # finite
        assert r["ours"]["compiled_peak_bytes"] > 0 and r["flops"] > 0
        assert r["peft"]["step_s"] > 0 if r["row"]["peft"] else "peft" not in r  # the lever row is ours only
    assert run.stdout.count("| gpt2-tiny bfloat16 |") == 1 and "MFU" in run.stdout
    # Not a measurement, and said so: no speed-up figure, a note instead.
    assert "NOT a measurement" in run.stdout and "smoke: –" in run.stdout
    assert not any(line.rstrip(" |").endswith("x") for line in run.stdout.splitlines() if line.startswith("| "))


@pytest.mark.slow
def test_loop_overhead_measures_both_sides(tmp_path):
    out = tmp_path / "loop.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "loop_overhead.py"), "--models", "gpt2",
                          "--steps", "30", "--log-every", "10", "--save-every", "20", "--reps", "1", "--batch", "2",
                          "--length", "16", "--json", str(out)], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())["results"][0]
    assert result["loop_median"] > 0 and result["raw_median"] > 0
    assert len(result["loop_windows"][0]) == 2  # windows 11-20 and 21-30; the first (compile) is left out
    assert result["save_call_s"] > 0 and result["loop_cpu_ms_per_step"] > 0 and result["raw_cpu_ms_per_step"] > 0
