"""Training-step time: prefix_jax vs HF PEFT prefix tuning, side by side, with analytic MFU.

  python benchmarks/train_step_vs_peft.py                  # small shapes, ~2-4 minutes on 2 cores
  python benchmarks/train_step_vs_peft.py --shapes issue   # the issue's shapes (GPT-2 small, T5-small)

Both sides get the same random model, batch, prefix length (decoder self-attention, MLP width 512, tanh),
AdamW, float32, and the same cores (each process is pinned to `--threads` cores; torch uses that many
threads). Each side runs in its own process (`--reps` per side, alternating PEFT, ours, PEFT, ours... so the
machine's load hits both alike), `--steps` timed steps after `--warmup` (ours compiles in its first call);
the median of each side's steps is reported, with their ratio: on a shared, noisy machine only same-run
ratios mean anything. `--processes one` alternates the two sides' steps in one process instead, where each
step starts from the caches and allocator state the other library left (on 2 cores that slowed our
GPT-2 step by 25% and made the comparison about the harness). MFU = analytic model FLOPs of the step (see
`_common.train_step_flops`) / median step time, against the best rate of a float32 1024^3 matmul measured
in the same run (in every process). Processes restart with train.py's host memory settings
(`prefix_jax.host_memory`: malloc on huge pages; `PREFIX_JAX_HUGE_PAGES=0` keeps glibc's defaults), which
both sides share.
Writes benchmarks/results/train_step_vs_peft.<shapes>.json (or --json).
"""

from __future__ import annotations

import argparse
import json

import _common as c

SHAPES = {
    "small": [c.Shape("gpt2", layers=4, batch=4, source=64, target=64, prefix=10),
              c.Shape("t5", layers=2, batch=4, source=128, target=32, prefix=30)],
    "issue": [c.Shape("gpt2", layers=12, batch=8, source=64, target=64, prefix=10),
              c.Shape("t5", layers=6, batch=8, source=256, target=64, prefix=30)],
}


def one_side(side: str, shape: c.Shape, warmup: int, steps: int) -> dict:
    """`steps` timed steps of one side ("peft" or "ours") on `shape` after `warmup`, in this process."""
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        hf = c.save_random_checkpoint(shape, directory)  # seeded: every process builds the same model
        step = c.peft_step_fn(shape, directory) if side == "peft" else c.ours_step_fn(shape, directory)
        times = c.interleaved({side: step}, warmup, steps)[side]
    return {"times": times, "model_flops": c.train_step_flops(shape, hf)["total"], "peak": c.matmul_peak_flops()}


def separate_processes(shape: c.Shape, args: argparse.Namespace) -> dict:
    """Each side in its own child process, alternating PEFT, ours, PEFT, ours... (`--reps` each)."""
    runs: dict[str, list[dict]] = {"peft": [], "ours": []}
    for _ in range(args.reps):
        for side in runs:
            runs[side].append(c.child_result(__file__, side, "--shapes", args.shapes, "--model", shape.model, "--steps",
                                             str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)))
    return {"times": {side: [t for r in rs for t in r["times"]] for side, rs in runs.items()},
            "model_flops": runs["ours"][0]["model_flops"], "peaks": [r["peak"] for rs in runs.values() for r in rs]}


def one_process(shape: c.Shape, args: argparse.Namespace) -> dict:
    """Both sides in this process, steps alternating (each step then starts where the other library left
    the caches and the allocator: on CPU that slows whichever follows; kept to show it)."""
    import tempfile

    peaks: list[float] = []
    with tempfile.TemporaryDirectory() as directory:
        hf = c.save_random_checkpoint(shape, directory)
        steps = {"peft": c.peft_step_fn(shape, directory), "ours": c.ours_step_fn(shape, directory),
                 "matmul": lambda: peaks.append(c.matmul_peak_flops())}
        times = c.interleaved(steps, args.warmup, args.steps)
    del times["matmul"]
    return {"times": times, "model_flops": c.train_step_flops(shape, hf)["total"], "peaks": peaks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="small")
    parser.add_argument("--model", choices=("all", "gpt2", "t5"), default="all")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side and process (after warm-up)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=2, help="processes per side and shape (separate processes)")
    parser.add_argument("--processes", choices=("separate", "one"), default="separate")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", choices=("peft", "ours"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    c.run_as_train_py()
    threads = c.pin_threads(args.threads)
    shapes = [s for s in SHAPES[args.shapes] if args.model in ("all", s.model)]
    if args.child:
        print(json.dumps(one_side(args.child, shapes[0], args.warmup, args.steps)))
        return

    results, peaks = [], [c.matmul_peak_flops()]
    for shape in shapes:
        run = separate_processes(shape, args) if args.processes == "separate" else one_process(shape, args)
        peaks += run["peaks"]
        times, flops = run["times"], run["model_flops"]
        p, o = c.median(times["peft"]), c.median(times["ours"])
        results.append({"shape": shape.describe(), "peft_s": p, "ours_s": o, "speedup": p / o,
                        "model_flops": flops, "ours_flops_per_s": flops / o, "peft_flops_per_s": flops / p,
                        "times": times})
    peak = max(peaks + [c.matmul_peak_flops()])  # the best rate seen in the run: MFU errs low
    rows = []
    for r in results:
        r["ours_mfu"], r["peft_mfu"] = r["ours_flops_per_s"] / peak, r["peft_flops_per_s"] / peak
        rows.append([r["shape"], f"{r['peft_s'] * 1e3:.0f}", f"{r['ours_s'] * 1e3:.0f}", f"{r['speedup']:.2f}x",
                     f"{r['model_flops'] / 1e9:.0f}", f"{r['ours_mfu']:.0%}", f"{r['peft_mfu']:.0%}"])
    print(f"matmul peak (float32, JAX, best in this run): {peak / 1e9:.0f} GFLOP/s on {threads} threads; "
          f"{args.processes} process(es) per side")
    table = c.print_table(["shape", "PEFT ms", "ours ms", "ours speed-up", "model GFLOP", "ours MFU",
                           "PEFT MFU (same FLOPs)"], rows)
    c.write_json(args.json, f"train_step_vs_peft.{args.shapes}", {"machine": c.machine(threads),
                                                                 "matmul_peak_flops": peak, "args": vars(args),
                                                                 "results": results, "table": table})


if __name__ == "__main__":
    main()
