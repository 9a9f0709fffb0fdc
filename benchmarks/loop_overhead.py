"""The trainer loop's overhead: steps/s of `trainer.run` vs the same jitted step called back-to-back.

  python benchmarks/loop_overhead.py                 # tiny GPT-2 and T5 (prefix_jax.tiny_checkpoints: d64, 2 layers)
  python benchmarks/loop_overhead.py --shapes small  # GPT-2 d256 x 4 layers and T5 d256 2+2 (random, 50k vocab)

Both sides run the offline demo configs (configs/gpt2_e2e_offline.py, configs/t5_offline.py: bundled E2E
data; by default batch 4, 16 + 16 tokens: a short step, where overhead shows) on a random checkpoint built
in a temporary directory (never in the repo's artifacts/). Per repetition, alternating:
- loop: `trainer.run` for `--steps` steps with logging every `--log-every` and an Orbax save every
  `--save-every` steps (no evaluation, no export). Timed between its log writes (right after the loop's
  metrics sync), over every log window but the first (which holds the compile); saves fall inside windows.
- raw: the same jitted step (same model, prefix, optimizer, shardings, donation) called back-to-back on the
  same batches, already on the device, blocking every `--log-every` steps as the loop does when it logs;
  the first call (compile) is not timed.
The table gives the medians over repetitions of steps/s and loop/raw (wall clock), and the same ratio by
this process's CPU time per step (XLA's threads, the prefetch thread, Orbax's writer and Python together),
which other jobs on a shared machine disturb far less than wall time. One save's blocking and background
times are measured apart. The target: the loop within 5% of the raw step.
Writes benchmarks/results/loop_overhead.<shapes>.json.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import _common as c

SHAPES = {
    "tiny": {"gpt2": None, "t5": None},  # prefix_jax.tiny_checkpoints's checkpoints as they are
    # Only the model's dimensions are used (batch and lengths come from the arguments).
    "small": {"gpt2": c.Shape("gpt2", layers=4, batch=0, source=0, target=0, prefix=5, d_model=256, vocab=50257),
              "t5": c.Shape("t5", layers=2, batch=0, source=0, target=0, prefix=8, d_model=256, vocab=50258)},
}
CONFIGS = {"gpt2": "configs.gpt2_e2e_offline", "t5": "configs.t5_offline"}


def make_checkpoint(arch: str, shape: c.Shape | None, root: Path) -> tuple[str, str]:
    """(model directory, tokenizer directory) of a random checkpoint built under `root`."""
    from prefix_jax import tiny_checkpoints

    tiny_dir = tiny_checkpoints.build_tiny_checkpoint(root / f"tiny-{arch}", arch)
    if shape is None:
        return str(tiny_dir), str(tiny_dir)
    model_dir = root / f"{arch}-{shape.d_model}x{shape.layers}"
    c.save_random_checkpoint(shape, str(model_dir))
    return str(model_dir), str(tiny_dir)  # the tiny directory holds the bundled tokenizer (vocab sizes match)


def run_config(arch: str, model_dir: str, tokenizer_dir: str, workdir: str, args: argparse.Namespace):
    import importlib

    config = importlib.import_module(CONFIGS[arch]).get_config()
    config.model.name_or_path = model_dir
    config.model.tokenizer = tokenizer_dir
    config.model.create_tiny = ""
    config.train.workdir = workdir
    config.train.steps = args.steps
    config.train.batch_size = args.batch
    config.data.max_source_length = config.data.max_target_length = args.length
    config.train.log_every = args.log_every
    config.train.save_every = args.save_every
    config.train.export = False
    config.data.eval_split = ""
    config.eval.generate = False
    return config


class RawStep:
    """The trainer's jitted step (`trainer.train_step_for`), fed pre-placed batches back-to-back."""

    def __init__(self, config, steps: int):
        from prefix_jax import run_options, run_setup, sharding, trainer

        plan = run_setup.build(run_options.from_config(config))
        tx, schedule = trainer.optimizer_for(plan)
        self.lm_params = plan.lm.params
        self.step = trainer.train_step_for(plan, tx, schedule)
        self.state = trainer.fresh_state(plan, tx)
        self.batches = [sharding.shard_batch(plan.train.train_batch(s), plan.mesh) for s in range(steps)]
        self.tokens_per_step = int(plan.train.train_batch(0)["target_mask"].sum())
        self._run(self.batches[:1])  # compile

    def _run(self, batches) -> None:
        import jax

        metrics = None
        for batch in batches:
            self.state, metrics = self.step(self.state, self.lm_params, batch)
        jax.block_until_ready((self.state, metrics))

    def save_seconds(self, directory: Path, reps: int = 3) -> tuple[float, float]:
        """Medians of how long `checkpoint.save` of this state blocks the caller, and how long its write then
        takes in the background (`wait_until_finished`)."""
        from prefix_jax import checkpoint

        mngr = checkpoint.manager(directory)
        calls, waits = [], []
        try:
            for step in range(1, reps + 1):
                start = time.perf_counter()
                checkpoint.save(mngr, step, self.state, {"benchmark": True})
                calls.append(time.perf_counter() - start)
                mngr.wait_until_finished()
                waits.append(time.perf_counter() - start - calls[-1])
        finally:
            mngr.close()
        return statistics.median(calls), statistics.median(waits)

    def steps_per_sec(self, window: int) -> tuple[float, list[float]]:
        """Every batch but the first (the compile's), dispatched back-to-back: overall steps/s, and the wall and
        process CPU seconds of each `window` steps (blocking at the end of each, as the loop does when it logs)."""
        windows, start = [], time.perf_counter()
        for first in range(1, len(self.batches), window):
            wall, cpu = time.perf_counter(), time.process_time()
            self._run(self.batches[first:first + window])
            windows.append({"steps": len(self.batches[first:first + window]), "wall_s": time.perf_counter() - wall,
                            "cpu_s": time.process_time() - cpu})
        return (len(self.batches) - 1) / (time.perf_counter() - start), windows


class ClockMarks:
    """Wall and process CPU time at each training-log write of `trainer.run` (`MetricsWriter.write` is wrapped
    while the `with` block runs): the loop's log windows measured on both clocks."""

    def __enter__(self) -> "ClockMarks":
        from prefix_jax import metrics_file

        self.marks: list[tuple[int, float, float]] = []
        self._original = original = metrics_file.MetricsWriter.write
        marks = self.marks

        def write(writer, step, metrics):
            if "steps_per_sec" in metrics:  # a training log row, written right after the loop's metrics sync
                marks.append((int(step), time.perf_counter(), time.process_time()))
            return original(writer, step, metrics)

        metrics_file.MetricsWriter.write = write
        return self

    def __exit__(self, *exc) -> None:
        from prefix_jax import metrics_file

        metrics_file.MetricsWriter.write = self._original

    def windows(self) -> list[dict]:
        """Windows between consecutive log writes (the first log, which follows the compile, only opens one)."""
        return [{"steps": b[0] - a[0], "wall_s": b[1] - a[1], "cpu_s": b[2] - a[2]}
                for a, b in zip(self.marks, self.marks[1:])]


def loop_steps_per_sec(config) -> tuple[float, list[dict]]:
    """`trainer.run(config)`; steps/s over its log windows after the first (sum of steps / sum of seconds), and
    the windows (steps, wall and CPU seconds)."""
    from prefix_jax import trainer

    with ClockMarks() as clock:
        trainer.run(config)
    windows = clock.windows()
    if not windows:
        raise SystemExit("--steps must exceed 2 x --log-every (the first log window holds the compile).")
    return sum(w["steps"] for w in windows) / sum(w["wall_s"] for w in windows), windows


def measure(arch: str, shape: c.Shape | None, root: Path, args: argparse.Namespace) -> dict:
    model_dir, tokenizer_dir = make_checkpoint(arch, shape, root)
    raw = RawStep(run_config(arch, model_dir, tokenizer_dir, str(root / f"{arch}-raw"), args), args.steps)
    loop, fast, windows, raw_windows = [], [], [], []
    for rep in range(args.reps):  # interleaved: loop, raw, loop, raw, ...
        sps, rows = loop_steps_per_sec(run_config(arch, model_dir, tokenizer_dir, str(root / f"{arch}-run{rep}"),
                                                  args))
        loop.append(sps)
        windows.append(rows)
        raw_sps, raw_rows = raw.steps_per_sec(args.log_every)
        fast.append(raw_sps)
        raw_windows.append(raw_rows)
        print(f"\n  {arch} rep {rep}: loop {sps:.2f} steps/s, raw {fast[-1]:.2f} steps/s", flush=True)
    dims = f"d{shape.d_model} x {shape.layers} layers" if shape else "prefix_jax.tiny_checkpoints d64 x 2 layers"
    describe = f"{arch} {dims}, batch {args.batch}, {args.length} src + {args.length} tgt"
    save_call, save_wait = raw.save_seconds(root / f"{arch}-save")
    cpu_per_step = lambda runs: (sum(w["cpu_s"] for ws in runs for w in ws)
                                 / sum(w["steps"] for ws in runs for w in ws))
    loop_cpu, raw_cpu = cpu_per_step(windows), cpu_per_step(raw_windows)
    return {"model": describe, "loop_steps_per_sec": loop, "raw_steps_per_sec": fast, "loop_windows": windows,
            "raw_windows": raw_windows, "loop_cpu_ms_per_step": loop_cpu * 1e3, "raw_cpu_ms_per_step": raw_cpu * 1e3,
            "cpu_ratio": raw_cpu / loop_cpu,
            "loop_median": statistics.median(loop), "raw_median": statistics.median(fast),
            "ratio": statistics.median(loop) / statistics.median(fast),
            "ratios_per_rep": [a / b for a, b in zip(loop, fast)], "tokens_per_step": raw.tokens_per_step,
            "overhead_ms_per_step": 1e3 / statistics.median(loop) - 1e3 / statistics.median(fast),
            "save_call_s": save_call, "save_background_s": save_wait}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--models", default="gpt2,t5", help="comma-separated: gpt2, t5")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--save-every", type=int, default=50)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=16, help="data.max_source_length = max_target_length")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    threads = c.pin_threads(args.threads)
    logging.getLogger("absl").setLevel(logging.WARNING)

    results = []
    with tempfile.TemporaryDirectory(prefix="loop_overhead-") as tmp:
        for arch in args.models.split(","):
            results.append(measure(arch, SHAPES[args.shapes][arch], Path(tmp), args))
    rows = [[r["model"], f"{r['raw_median']:.2f}", f"{r['loop_median']:.2f}", f"{r['ratio']:.3f}",
             " ".join(f"{x:.2f}" for x in r["ratios_per_rep"]),
             f"{r['raw_cpu_ms_per_step']:.1f} / {r['loop_cpu_ms_per_step']:.1f}", f"{r['cpu_ratio']:.3f}",
             f"{r['save_call_s'] * 1e3:.0f} / {r['save_background_s'] * 1e3:.0f}"] for r in results]
    print(f"{args.steps} steps, log every {args.log_every}, save every {args.save_every}, {args.reps} reps; "
          f"threads {threads}")
    table = c.print_table(["model", "raw step steps/s", "trainer loop steps/s", "loop / raw (median)",
                           "loop / raw per rep", "CPU ms/step raw / loop", "loop / raw by CPU time", "one save: blocking / background ms"],
                          rows)
    c.write_json(args.json, f"loop_overhead.{args.shapes}", {"machine": c.machine(threads), "args": vars(args),
                                                             "results": results, "table": table})


if __name__ == "__main__":
    main()
