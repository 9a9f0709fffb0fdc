"""Ours against ours: dropout masks from `prefix_jax.models.dropout` (now) vs `flax.linen.Dropout` (before),
and with dropout off, in one process, interleaved, so the machine's load hits all three alike.

  python benchmarks/dropout_ab.py                  # small shapes of train_step_vs_peft
  python benchmarks/dropout_ab.py --shapes issue   # the issue's shapes (GPT-2 small, T5-small)

Both dropout rows draw the same masks (the losses after the same steps must be bitwise equal; the script
checks it); "dropout off" zeroes the model's dropout rates (a different step: the floor of what masks can
cost). MFU as in train_step_vs_peft.py (analytic FLOPs, same-run float32 matmul). Writes
benchmarks/results/dropout_ab.<shapes>.json (or --json).
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time

import _common as c
import train_step_vs_peft

DROPOUT_FIELDS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout_rate")


@contextlib.contextmanager
def flax_dropout():
    """While active, tracing uses `flax.linen.Dropout` and `jax.random.bernoulli` (the earlier masks)."""
    import flax.linen as nn
    import jax

    from prefix_jax.models import attention, bart, dropout, gpt2, llama, t5

    modules = (attention, bart, gpt2, llama, t5)
    saved = [m.Dropout for m in modules], dropout.bernoulli
    for m in modules:
        m.Dropout = nn.Dropout
    dropout.bernoulli = jax.random.bernoulli
    try:
        yield
    finally:
        for m, cls in zip(modules, saved[0]):
            m.Dropout = cls
        dropout.bernoulli = saved[1]


def compiled_step(shape: c.Shape, directory: str, flax_masks: bool) -> tuple[c.OursStep, float]:
    """Our step on `shape`, compiled (under `flax_dropout` when `flax_masks`), and its first-call seconds."""
    ours = c.ours_step_fn(shape, directory)
    with flax_dropout() if flax_masks else contextlib.nullcontext():
        start = time.perf_counter()
        ours()
        return ours, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", choices=sorted(train_step_vs_peft.SHAPES), default="small")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (after warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    threads = c.pin_threads(args.threads)

    results, peak = [], c.matmul_peak_flops()
    for shape in train_step_vs_peft.SHAPES[args.shapes]:
        with tempfile.TemporaryDirectory() as on, tempfile.TemporaryDirectory() as off:
            hf = c.save_random_checkpoint(shape, on)
            base_config = c.hf_config
            c.hf_config = lambda s: _without_dropout(base_config(s))
            try:
                c.save_random_checkpoint(shape, off)
            finally:
                c.hf_config = base_config
            variants, compile_s = {}, {}
            for name, directory, flax_masks in (("flax", on, True), ("ours", on, False), ("off", off, False)):
                variants[name], compile_s[name] = compiled_step(shape, directory, flax_masks)
            times = c.interleaved(variants, warmup=1, reps=args.steps)
            losses = {name: float(step()) for name, step in variants.items()}
        if losses["flax"] != losses["ours"]:
            raise SystemExit(f"{shape.describe()}: losses differ (flax {losses['flax']!r}, ours {losses['ours']!r})")
        peak = max(peak, c.matmul_peak_flops())
        flops = c.train_step_flops(shape, hf)["total"]
        results.append({"shape": shape.describe(), "model_flops": flops, "compile_s": compile_s, "losses": losses,
                        "times": times, **{f"{k}_s": c.median(v) for k, v in times.items()}})
    rows = []
    for r in results:
        mfu = {k: r["model_flops"] / r[f"{k}_s"] / peak for k in ("flax", "ours", "off")}
        r["mfu"] = mfu
        rows.append([r["shape"], f"{r['flax_s'] * 1e3:.0f}", f"{r['ours_s'] * 1e3:.0f}", f"{r['off_s'] * 1e3:.0f}",
                     f"{r['flax_s'] / r['ours_s']:.2f}x", f"{mfu['flax']:.0%} / {mfu['ours']:.0%} / {mfu['off']:.0%}",
                     f"{r['compile_s']['flax']:.1f} / {r['compile_s']['ours']:.1f}", "yes"])
    print(f"matmul peak (float32, JAX, same run): {peak / 1e9:.0f} GFLOP/s on {threads} threads")
    table = c.print_table(["shape", "flax masks ms", "our masks ms", "dropout off ms", "ours faster",
                           "MFU flax / ours / off", "first call s flax / ours", "losses bitwise equal"], rows)
    c.write_json(args.json, f"dropout_ab.{args.shapes}", {"machine": c.machine(threads), "matmul_peak_flops": peak,
                                                         "args": vars(args), "results": results, "table": table})


def _without_dropout(config):
    for field in DROPOUT_FIELDS:
        if hasattr(config, field):
            setattr(config, field, 0.0)
    return config


if __name__ == "__main__":
    main()
