"""Training-step time: prefix_jax vs HF PEFT prefix tuning, side by side in one process, with analytic MFU.

  python benchmarks/train_step_vs_peft.py                  # small shapes, ~2-4 minutes on 2 cores
  python benchmarks/train_step_vs_peft.py --shapes issue   # the issue's shapes (GPT-2 small, T5-small)

Both sides get the same random model, batch, prefix length (decoder self-attention, MLP width 512, tanh),
AdamW, float32, and the same cores (the process is pinned to `--threads` cores; torch uses that many
threads). Steps alternate PEFT, ours, PEFT, ours... after warm-up (ours compiles in its first call) and
the median of each is reported, with their ratio: on a shared, noisy machine only same-run ratios mean
anything. MFU = analytic model FLOPs of the step (see `_common.train_step_flops`) / step time, against a
float32 matmul measured in the same run. Writes benchmarks/results/train_step_vs_peft.<shapes>.json (or --json).
"""

from __future__ import annotations

import argparse

import _common as c

SHAPES = {
    "small": [c.Shape("gpt2", layers=4, batch=4, source=64, target=64, prefix=10),
              c.Shape("t5", layers=2, batch=4, source=128, target=32, prefix=30)],
    "issue": [c.Shape("gpt2", layers=12, batch=8, source=64, target=64, prefix=10),
              c.Shape("t5", layers=6, batch=8, source=256, target=64, prefix=30)],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="small")
    parser.add_argument("--model", choices=("all", "gpt2", "t5"), default="all")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side (after warm-up)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    threads = c.pin_threads(args.threads)
    import tempfile

    results = []
    peak = c.matmul_peak_flops()
    for shape in SHAPES[args.shapes]:
        if args.model not in ("all", shape.model):
            continue
        with tempfile.TemporaryDirectory() as directory:
            hf = c.save_random_checkpoint(shape, directory)
            peft = c.peft_step_fn(shape, directory)
            ours = c.ours_step_fn(shape, directory)
            times = c.interleaved({"peft": peft, "ours": ours}, args.warmup, args.steps)
        peak = max(peak, c.matmul_peak_flops())  # measured again after, the better of the two
        flops = c.train_step_flops(shape, hf)["total"]
        p, o = c.median(times["peft"]), c.median(times["ours"])
        results.append({"shape": shape.describe(), "peft_s": p, "ours_s": o, "speedup": p / o,
                        "model_flops": flops, "ours_flops_per_s": flops / o, "peft_flops_per_s": flops / p,
                        "times": times})
    rows = []
    for r in results:  # MFU against the best matmul rate seen in this run
        r["ours_mfu"], r["peft_mfu"] = r["ours_flops_per_s"] / peak, r["peft_flops_per_s"] / peak
        rows.append([r["shape"], f"{r['peft_s'] * 1e3:.0f}", f"{r['ours_s'] * 1e3:.0f}", f"{r['speedup']:.2f}x",
                     f"{r['model_flops'] / 1e9:.0f}", f"{r['ours_mfu']:.0%}", f"{r['peft_mfu']:.0%}"])
    print(f"matmul peak (float32, JAX, same run): {peak / 1e9:.0f} GFLOP/s on {threads} threads")
    table = c.print_table(["shape", "PEFT ms", "ours ms", "ours speed-up", "model GFLOP", "ours MFU",
                           "PEFT MFU (same FLOPs)"], rows)
    c.write_json(args.json, f"train_step_vs_peft.{args.shapes}", {"machine": c.machine(threads),
                                                                 "matmul_peak_flops": peak, "args": vars(args),
                                                                 "results": results, "table": table})


if __name__ == "__main__":
    main()
