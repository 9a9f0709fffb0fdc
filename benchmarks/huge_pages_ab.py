"""Our training step with glibc's defaults vs with malloc on transparent huge pages (`prefix_jax.host_memory`,
what train.py and predict.py start with), each in its own process, alternating.

  python benchmarks/huge_pages_ab.py                  # small shapes of train_step_vs_peft
  python benchmarks/huge_pages_ab.py --shapes issue   # the issue's shapes (GPT-2 small, T5-small)

The tunable is read when a process starts, so the two variants cannot share one: per repetition and shape, a
child process with `PREFIX_JAX_HUGE_PAGES=0` and one restarted with `glibc.malloc.hugetlb=1` each compile the
same step and time `--steps` steps after one warm-up, one after the other. Reported: the median step time of
each variant (the median over repetitions of each child's median), minor page faults and kernel CPU time per
step, and MFU against the best float32 matmul rate any child measured. Writes
benchmarks/results/huge_pages_ab.<shapes>.json (or --json).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time

import _common as c
import train_step_vs_peft

VARIANTS = {"glibc defaults": "0", "huge pages": "1"}


def child(model: str, shapes: str, steps: int, threads: int) -> None:
    """One variant's measurement, printed as one JSON line (runs in the child process)."""
    from prefix_jax import host_memory

    c.run_as_train_py()
    c.pin_threads(threads)
    shape = next(s for s in train_step_vs_peft.SHAPES[shapes] if s.model == model)
    with tempfile.TemporaryDirectory() as directory:
        hf = c.save_random_checkpoint(shape, directory)
        ours = c.ours_step_fn(shape, directory)
        ours()
        ours()
        before, times = resource.getrusage(resource.RUSAGE_SELF), []
        for _ in range(steps):
            start = time.perf_counter()
            ours()
            times.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"shape": shape.describe(), "times": times, "step_s": statistics.median(times),
                      "page_faults": (after.ru_minflt - before.ru_minflt) / steps,
                      "kernel_s": (after.ru_stime - before.ru_stime) / steps,
                      "model_flops": c.train_step_flops(shape, hf)["total"], "peak": c.matmul_peak_flops(),
                      "host_memory": host_memory.status()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", choices=sorted(train_step_vs_peft.SHAPES), default="small")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per child (after warm-up)")
    parser.add_argument("--reps", type=int, default=2, help="child processes per variant and shape")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.shapes, args.steps, args.threads)

    runs: dict[str, dict[str, list[dict]]] = {}
    for shape in train_step_vs_peft.SHAPES[args.shapes]:
        runs[shape.model] = {name: [] for name in VARIANTS}
        for _ in range(args.reps):
            for name, flag in VARIANTS.items():
                env = {**os.environ, "PREFIX_JAX_HUGE_PAGES": flag}
                env.pop("GLIBC_TUNABLES", None)
                runs[shape.model][name].append(c.child_result(__file__, shape.model, "--shapes", args.shapes, "--steps",
                                                              str(args.steps), "--threads", str(args.threads), env=env))
    peak = max(r["peak"] for variants in runs.values() for rs in variants.values() for r in rs)
    rows, results = [], []
    for model, variants in runs.items():
        summary = {name: {"step_s": statistics.median(r["step_s"] for r in rs),
                          "page_faults": statistics.median(r["page_faults"] for r in rs),
                          "kernel_s": statistics.median(r["kernel_s"] for r in rs),
                          "host_memory": rs[0]["host_memory"]} for name, rs in variants.items()}
        first = next(iter(variants.values()))[0]
        off, on = summary["glibc defaults"], summary["huge pages"]
        results.append({"shape": first["shape"], "model_flops": first["model_flops"], "summary": summary,
                        "runs": variants})
        rows.append([first["shape"], f"{off['step_s'] * 1e3:.0f}", f"{on['step_s'] * 1e3:.0f}",
                     f"{off['step_s'] / on['step_s']:.2f}x", f"{off['page_faults']:,.0f} / {on['page_faults']:,.0f}",
                     f"{off['kernel_s'] * 1e3:.0f} / {on['kernel_s'] * 1e3:.0f}",
                     f"{first['model_flops'] / off['step_s'] / peak:.0%} / {first['model_flops'] / on['step_s'] / peak:.0%}"])
    print(f"matmul peak (float32, JAX, best of the children): {peak / 1e9:.0f} GFLOP/s on {args.threads} threads")
    table = c.print_table(["shape", "glibc defaults ms", "huge pages ms", "huge pages faster",
                           "page faults per step", "kernel CPU ms per step", "MFU"], rows)
    c.write_json(args.json, f"huge_pages_ab.{args.shapes}", {"machine": c.machine(args.threads), "args": vars(args),
                                                            "matmul_peak_flops": peak, "results": results,
                                                            "table": table})


if __name__ == "__main__":
    main()
