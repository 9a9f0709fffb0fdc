"""Peak memory of a prefix-tuning step: ours vs PEFT's, vs a full fine-tuning step of the same model in our
code, and the chunked loss at a 256k vocabulary.

  python benchmarks/memory.py                  # GPT-2 d768, 4 layers, batch 4, 64 + 64 tokens, prefix 10
  python benchmarks/memory.py --shapes issue   # GPT-2 small (12 layers), batch 8, 64 + 64, prefix 10

Two measures:
- compiled (ours only): XLA's `memory_analysis()` of the jitted step: `temp` (activations, gradients,
  logits: everything the step allocates beyond its arguments and results) and `peak` = arguments + results
  + temp - donated (aliased) bytes, which counts the frozen weights once.
- RSS (PEFT's working memory): its step runs in a fresh child process with glibc's mmap threshold fixed
  at 64 KiB (`MALLOC_MMAP_THRESHOLD_`), so every tensor is mapped when allocated and returned to the OS
  when freed; the peak resident memory sampled every millisecond during one step (after two warm-up
  steps), above the resident memory just before it, is then its activations, gradients, logits and
  temporaries: the analogue of our compiled `temp`. (Without the fixed threshold glibc keeps freed memory
  after the first steps and the rise undercounts. Ours is measured the same way too and kept in the JSON
  as `ours_rss_step`, but XLA's CPU runtime keeps its buffers between steps, so that number is not a
  measure of the step.)
The 256k row compiles (does not run) a GPT-2-like model (d256, 2 layers, vocab 256,000) from abstract
shapes, with the logits loss and with `losses.chunked_token_cross_entropy` (default chunks: 64 tokens here).
Writes benchmarks/results/memory.<shapes>.json (or --json).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import _common as c

SHAPES = {"small": c.Shape("gpt2", layers=4, batch=4, source=64, target=64, prefix=10),
          "issue": c.Shape("gpt2", layers=12, batch=8, source=64, target=64, prefix=10)}
MIB = 2**20


def compiled_memory(jitted, *args) -> dict:
    m = jitted.lower(*args).compile().memory_analysis()
    return {"temp": m.temp_size_in_bytes, "arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
            "aliased": m.alias_size_in_bytes,
            "peak": m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes}


def full_fine_tuning_step(model):
    """Our model trained in full (every weight, AdamW), the same loss: what prefix tuning saves against."""
    import jax
    import jax.numpy as jnp
    import optax

    from prefix_jax import losses

    tx = optax.adamw(5e-5)

    def step(lm_params, opt_state, batch):
        def loss_fn(p):
            total, count = losses.token_cross_entropy(model.apply({"params": p}, batch), batch["target_ids"],
                                                        batch["target_mask"])
            return total / jnp.maximum(count, 1.0)

        loss, grads = jax.value_and_grad(loss_fn)(lm_params)
        updates, opt_state = tx.update(grads, opt_state, lm_params)
        return optax.apply_updates(lm_params, updates), opt_state, loss

    return tx, jax.jit(step, donate_argnums=(0, 1))


def rss_of_one_step(fn, warmup: int = 2) -> int:
    for _ in range(warmup):
        fn()
    with c.RssSampler() as sampler:
        fn()
    return sampler.increase


def rss_in_child(side: str, shapes: str, directory: str, threads: int) -> int:
    """`rss_of_one_step` of one side's step, in a fresh process whose freed buffers go back to the OS."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, __file__, "--child", side, "--checkpoint", directory, "--shapes", shapes,
                          "--threads", str(threads)], env=env, capture_output=True, text=True, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("rss_rise=")]
    if out.returncode or not lines:
        raise RuntimeError(f"memory child {side} failed:\n{out.stderr[-3000:]}")
    return int(lines[-1].split("=", 1)[1])


def child(side: str, shape: c.Shape, directory: str) -> None:
    if side == "peft":
        fn = c.peft_step_fn(shape, directory)
    else:
        fn = c.ours_step_fn(shape, directory, loss="chunked" if side == "ours_chunked" else "logits")
    print(f"rss_rise={rss_of_one_step(fn)}")


def vocab_256k_rows() -> list[dict]:
    """Compiled memory of a prefix step at vocabulary 256k, with the logits loss and with the chunked loss."""
    import jax
    import jax.numpy as jnp
    from transformers import GPT2Config

    from prefix_jax import optim, train_steps
    from prefix_jax import prefix as prefix_lib
    from prefix_jax.models import gpt2

    batch_size, source, target, vocab = 4, 64, 64, 256_000
    config = gpt2.Config.from_hf(GPT2Config(vocab_size=vocab, n_embd=256, n_layer=2, n_head=4), set())
    model = gpt2.Model(config)
    batch = {"source_ids": jax.ShapeDtypeStruct((batch_size, source), jnp.int32),
             "source_mask": jax.ShapeDtypeStruct((batch_size, source), jnp.int32),
             "target_ids": jax.ShapeDtypeStruct((batch_size, target), jnp.int32),
             "target_mask": jax.ShapeDtypeStruct((batch_size, target), jnp.int32)}
    lm_params = jax.eval_shape(lambda b: model.init(jax.random.PRNGKey(0), b)["params"], batch)
    spec = prefix_lib.PrefixSpec(length=10, placements=("decoder",), geometry=config.prefix_geometry(),
                                 hidden_size=config.hidden_size, mlp_hidden=512)
    params = prefix_lib.init_params(spec, jax.random.PRNGKey(0))
    tx, schedule = optim.make_optimizer(params, learning_rate=5e-5, total_steps=1000, max_grad_norm=None)
    state = jax.eval_shape(lambda: train_steps.init_state(params, tx, jax.random.PRNGKey(1)))
    logits_bytes = batch_size * target * vocab * 4
    rows = []
    for name, step in (("logits loss", train_steps.jit_train_step(model, spec, tx, schedule)),
                       ("chunked loss", train_steps.jit_train_step(model, spec, tx, schedule, loss_chunk_tokens=64))):
        rows.append({"loss": name, "logits_f32_bytes": logits_bytes, **compiled_memory(step, state, lm_params, batch)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="small")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", choices=("peft", "ours", "ours_chunked"), help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    threads = c.pin_threads(args.threads)
    shape = SHAPES[args.shapes]
    if args.child:
        return child(args.child, shape, args.checkpoint)
    import jax

    results: dict = {"shape": shape.describe()}
    with tempfile.TemporaryDirectory() as directory:
        c.save_random_checkpoint(shape, directory)
        for side in ("peft", "ours", "ours_chunked"):
            results[f"{side}_rss_step"] = rss_in_child(side, args.shapes, directory, threads)
        ours = c.ours_step_fn(shape, directory)
        results["ours_compiled"] = compiled_memory(ours.step, ours.state, ours.lm_params, ours.batch)
        chunked = c.ours_step_fn(shape, directory, loss="chunked")
        results["ours_chunked_compiled"] = compiled_memory(chunked.step, chunked.state, chunked.lm_params,
                                                           chunked.batch)
        lean = c.ours_step_fn(shape, directory, loss="chunked", remat="minimal")
        results["ours_chunked_remat_compiled"] = compiled_memory(lean.step, lean.state, lean.lm_params, lean.batch)
        tx, full = full_fine_tuning_step(ours.lm.model)
        opt_state = tx.init(ours.lm_params)
        results["full_ft_compiled"] = compiled_memory(full, ours.lm_params, opt_state, ours.batch)
    results["vocab_256k"] = vocab_256k_rows()

    mib = lambda b: f"{b / MIB:.0f}"
    oc, cc, fc = results["ours_compiled"], results["ours_chunked_compiled"], results["full_ft_compiled"]
    rc = results["ours_chunked_remat_compiled"]
    peft_rss = results["peft_rss_step"]
    rows = [["PEFT prefix tuning (torch)", f"{mib(peft_rss)} (RSS rise)", "1.00", "–"],
            ["ours prefix tuning", f"{mib(oc['temp'])} (temp)", f"{oc['temp'] / peft_rss:.2f}", mib(oc["peak"])],
            ["ours prefix tuning, chunked loss", f"{mib(cc['temp'])} (temp)", f"{cc['temp'] / peft_rss:.2f}",
             mib(cc["peak"])],
            ["ours, chunked loss + model.remat=minimal", f"{mib(rc['temp'])} (temp)", f"{rc['temp'] / peft_rss:.2f}",
             mib(rc["peak"])],
            ["ours full fine-tuning (AdamW)", f"{mib(fc['temp'])} (temp)", f"{fc['temp'] / peft_rss:.2f}",
             mib(fc["peak"])]]
    print(f"{shape.describe()}; threads {threads}")
    table = c.print_table(["step", "step working memory MiB", "/ PEFT's", "compiled peak MiB (incl. weights)"], rows)
    print(f"full fine-tuning / prefix tuning compiled peak: {fc['peak'] / oc['peak']:.2f}")
    v_rows = [[r["loss"], mib(r["logits_f32_bytes"]), mib(r["temp"]), mib(r["peak"])] for r in results["vocab_256k"]]
    print("GPT-2-like d256, 2 layers, vocab 256,000, batch 4, 64 + 64 tokens, prefix 10 (compiled only)")
    table += "\n\n" + c.print_table(["loss", "[B,T,V] f32 logits MiB", "compiled temp MiB", "compiled peak MiB"],
                                    v_rows)
    c.write_json(args.json, f"memory.{args.shapes}", {"machine": c.machine(threads), "args": vars(args),
                                                     "results": results, "table": table,
                                                     "jax_devices": str(jax.devices())})


if __name__ == "__main__":
    main()
