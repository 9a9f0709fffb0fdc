"""First-step compile time of our prefix-tuning train step vs model size (and that it does not grow with it).

  python benchmarks/compile_time.py                 # GPT-2 at 2/6/12 layers and 2 widths, T5 at 2 and 6 layers
  python benchmarks/compile_time.py --shapes issue  # adds GPT-2 medium (d1024, 24 layers) and T5-base widths

Each row traces, lowers and compiles `train_steps.jit_train_step` from abstract shapes (`jax.ShapeDtypeStruct`:
no weights are created, so the time is the compiler's alone) in this process, on the benchmark batch of
its model (GPT-2: batch 8, 64 + 64 tokens, prefix 10; T5: batch 8, 256 + 64, prefix 30, decoder). The
frozen LM is an argument of the step, never a constant, and layers are scanned, so compile time should
depend on neither the weights' size nor the number of layers. Writes benchmarks/results/compile_time.<shapes>.json.
"""

from __future__ import annotations

import argparse
import time

import _common as c

SHAPES = {
    "small": [c.Shape("gpt2", layers=2, batch=8, source=64, target=64, prefix=10, d_model=256),
              c.Shape("gpt2", layers=6, batch=8, source=64, target=64, prefix=10),
              c.Shape("gpt2", layers=12, batch=8, source=64, target=64, prefix=10),
              c.Shape("t5", layers=2, batch=8, source=256, target=64, prefix=30),
              c.Shape("t5", layers=6, batch=8, source=256, target=64, prefix=30)],
}
SHAPES["issue"] = SHAPES["small"] + [
    c.Shape("gpt2", layers=24, batch=8, source=64, target=64, prefix=10, d_model=1024),
    c.Shape("t5", layers=12, batch=8, source=256, target=64, prefix=30, d_model=768)]


def compile_seconds(shape: c.Shape) -> dict:
    import jax
    import jax.numpy as jnp

    from prefix_jax import models, optim, train_steps
    from prefix_jax import prefix as prefix_lib

    hf = c.hf_config(shape)
    arch = models.architecture(hf.model_type)
    config = arch.Config.from_hf(hf, set())
    model = arch.Model(config)
    batch = {k: jax.ShapeDtypeStruct(v.shape, jnp.int32) for k, v in c.host_batch(shape, 1000).items()}
    lm_params = jax.eval_shape(lambda b: model.init(jax.random.PRNGKey(0), b)["params"], batch)
    weights = sum(x.size for x in jax.tree.leaves(lm_params))
    spec = prefix_lib.PrefixSpec(length=shape.prefix, placements=("decoder",), geometry=config.prefix_geometry(),
                                 hidden_size=config.hidden_size, mlp_hidden=512)
    params = prefix_lib.init_params(spec, jax.random.PRNGKey(0))
    tx, schedule = optim.make_optimizer(params, learning_rate=5e-5, total_steps=1000, max_grad_norm=None)
    state = jax.eval_shape(lambda: train_steps.init_state(params, tx, jax.random.PRNGKey(1)))
    step = train_steps.jit_train_step(model, spec, tx, schedule)
    start = time.perf_counter()
    lowered = step.lower(state, lm_params, batch)
    traced = time.perf_counter() - start
    lowered.compile()
    total = time.perf_counter() - start
    return {"shape": shape.describe(), "weights": weights, "trace_lower_s": traced, "compile_s": total - traced,
            "total_s": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="small")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    threads = c.pin_threads(args.threads)
    results = [compile_seconds(shape) for shape in SHAPES[args.shapes]]
    table = c.print_table(["shape", "frozen weights (M)", "trace + lower s", "XLA compile s", "first-step compile s"],
                          [[r["shape"], f"{r['weights'] / 1e6:.0f}", f"{r['trace_lower_s']:.1f}",
                            f"{r['compile_s']:.1f}", f"{r['total_s']:.1f}"] for r in results])
    c.write_json(args.json, f"compile_time.{args.shapes}", {"machine": c.machine(threads), "args": vars(args),
                                                           "results": results, "table": table})


if __name__ == "__main__":
    main()
