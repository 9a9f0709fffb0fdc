"""Ours against ours: the training step as it is now vs its earlier forms, in one process, interleaved, so the
machine's load hits every variant alike.

  python benchmarks/step_ab.py                  # small shapes of train_step_vs_peft
  python benchmarks/step_ab.py --shapes issue   # the issue's shapes (GPT-2 small, T5-small)

Variants (the same random model, batch, prefix, AdamW, float32):
- earlier: dropout masks from `flax.linen.Dropout` / `jax.random.bernoulli` (on CPU, JAX runs their Threefry
  as a rolled loop) and the loss gradient by autodiff of `log_softmax` + `take_along_axis`;
- masks: `prefix_jax.models.dropout` (the same masks as straight-line code), the loss gradient by autodiff;
- now: our masks and `losses.token_losses` (its gradient written out);
- no dropout: "now" with the model's dropout rates zeroed (a different step: the floor of what masks cost).
The first step's loss of earlier and masks must be bitwise equal (same masks), and now's within 1e-6
(the same forward; XLA may sum the logsumexp in another order); the script checks it. MFU as in train_step_vs_peft.py (analytic FLOPs; the best same-run float32 matmul rate).
Runs with train.py's host memory settings (see train_step_vs_peft.py). Writes benchmarks/results/step_ab.<shapes>.json (or --json).
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


def autodiff_token_losses(logits_NxV, targets_N, label_smoothing=0.0):
    """The earlier per-token loss: the same values, its gradient left to autodiff."""
    import jax
    import jax.numpy as jnp

    log_probs = jax.nn.log_softmax(logits_NxV, axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets_N[..., None], axis=-1)[..., 0]
    if label_smoothing:
        nll = (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(log_probs, axis=-1)
    return nll


@contextlib.contextmanager
def autodiff_loss():
    from prefix_jax import losses

    saved, losses.token_losses = losses.token_losses, autodiff_token_losses
    try:
        yield
    finally:
        losses.token_losses = saved


@contextlib.contextmanager
def earlier():
    with flax_dropout(), autodiff_loss():
        yield


VARIANTS = {"earlier": (earlier, True), "masks": (autodiff_loss, True), "now": (contextlib.nullcontext, True),
            "no dropout": (contextlib.nullcontext, False)}


def compiled_step(shape: c.Shape, directory: str, context) -> tuple[c.OursStep, float, float]:
    """Our step on `shape` traced and compiled under `context`; its first call's seconds and loss."""
    ours = c.ours_step_fn(shape, directory)
    with context():
        start = time.perf_counter()
        loss = ours()
        return ours, time.perf_counter() - start, loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", choices=sorted(train_step_vs_peft.SHAPES), default="small")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (after warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    c.run_as_train_py()
    threads = c.pin_threads(args.threads)

    results, peaks = [], [c.matmul_peak_flops()]
    for shape in train_step_vs_peft.SHAPES[args.shapes]:
        with tempfile.TemporaryDirectory() as on, tempfile.TemporaryDirectory() as off:
            hf = c.save_random_checkpoint(shape, on)
            base_config = c.hf_config
            c.hf_config = lambda s: _without_dropout(base_config(s))
            try:
                c.save_random_checkpoint(shape, off)
            finally:
                c.hf_config = base_config
            steps, compile_s, first_loss = {}, {}, {}
            for name, (context, dropout_on) in VARIANTS.items():
                steps[name], compile_s[name], first_loss[name] = compiled_step(shape, on if dropout_on else off, context)
            steps["matmul"] = lambda: peaks.append(c.matmul_peak_flops())
            times = c.interleaved(steps, warmup=1, reps=args.steps)
            del times["matmul"]
        if first_loss["earlier"] != first_loss["masks"] or abs(first_loss["now"] / first_loss["masks"] - 1) > 1e-6:
            raise SystemExit(f"{shape.describe()}: first-step losses differ: {first_loss}")
        flops = c.train_step_flops(shape, hf)["total"]
        results.append({"shape": shape.describe(), "model_flops": flops, "compile_s": compile_s,
                        "first_loss": first_loss, "times": times, "step_s": {k: c.median(v) for k, v in times.items()}})
    peak = max(peaks)
    rows = []
    for r in results:
        s = r["step_s"]
        r["mfu"] = {k: r["model_flops"] / v / peak for k, v in s.items()}
        rows.append([r["shape"], *(f"{s[k] * 1e3:.0f}" for k in VARIANTS), f"{s['earlier'] / s['masks']:.2f}x",
                     f"{s['earlier'] / s['now']:.2f}x", " / ".join(f"{r['mfu'][k]:.0%}" for k in VARIANTS),
                     f"{r['compile_s']['earlier']:.1f} / {r['compile_s']['now']:.1f}"])
    print(f"matmul peak (float32, JAX, best in this run): {peak / 1e9:.0f} GFLOP/s on {threads} threads")
    table = c.print_table(["shape", *(f"{k} ms" for k in VARIANTS), "masks vs earlier", "now vs earlier",
                           "MFU " + " / ".join(VARIANTS), "first call s earlier / now"], rows)
    c.write_json(args.json, f"step_ab.{args.shapes}", {"machine": c.machine(threads), "matmul_peak_flops": peak,
                                                      "args": vars(args), "results": results, "table": table})


def _without_dropout(config):
    for field in DROPOUT_FIELDS:
        if hasattr(config, field):
            setattr(config, field, 0.0)
    return config


if __name__ == "__main__":
    main()
