"""Compiled peak memory of a GPT-2-small-shaped prefix-tuning step in float32 vs bfloat16 params/compute.

  python benchmarks/bf16_memory.py                 # GPT-2 small (d768, 12 layers), batch 8, 64 + 64, prefix 10
  python benchmarks/bf16_memory.py --layers 2      # a quicker check

Step time in bf16 on a CPU says nothing about an accelerator (the CPU has no bf16 matmul units), but the
memory XLA plans for the step does carry over: `memory_analysis()` of the compiled train step, from
abstract shapes (no weights are created): `arguments` (the frozen LM + train state + batch), `temp`
(activations, logits, gradients) and `peak` = arguments + outputs + temp - donated. The trainable prefix
and its optimizer state stay float32 in every row (`prefix.init_params`); only the frozen LM's storage
(`model.param_dtype`) and the activations (`model.compute_dtype`) change. The logits loss is used (the
float32 `[B, T, V]` logits are the same in every row). Writes benchmarks/results/bf16_memory.json.
"""

from __future__ import annotations

import argparse

import _common as c

MIB = 2**20
ROWS = (("float32", "float32"), ("float32", "bfloat16"), ("bfloat16", "bfloat16"))


def step_memory(layers: int, batch_size: int, source: int, target: int, prefix_len: int, param_dtype: str,
                compute_dtype: str) -> dict:
    import jax
    import jax.numpy as jnp
    from transformers import GPT2Config

    from memory import compiled_memory
    from prefix_jax import optim, train_steps
    from prefix_jax import prefix as prefix_lib
    from prefix_jax.models import gpt2

    config = gpt2.Config.from_hf(GPT2Config(n_layer=layers), set(), dtype=compute_dtype, param_dtype=param_dtype)
    model = gpt2.Model(config)
    ints = lambda n: jax.ShapeDtypeStruct((batch_size, n), jnp.int32)
    batch = {"source_ids": ints(source), "source_mask": ints(source), "target_ids": ints(target),
             "target_mask": ints(target)}
    lm_params = jax.eval_shape(lambda b: model.init(jax.random.PRNGKey(0), b)["params"], batch)
    spec = prefix_lib.PrefixSpec(length=prefix_len, placements=("decoder",), geometry=config.prefix_geometry(),
                                 hidden_size=config.hidden_size, mlp_hidden=512)
    params = prefix_lib.init_params(spec, jax.random.PRNGKey(0))
    tx, schedule = optim.make_optimizer(params, learning_rate=5e-5, total_steps=1000, max_grad_norm=None)
    state = jax.eval_shape(lambda: train_steps.init_state(params, tx, jax.random.PRNGKey(1)))
    lm_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(lm_params))
    memory = compiled_memory(train_steps.jit_train_step(model, spec, tx, schedule), state, lm_params, batch)
    return {"param_dtype": param_dtype, "compute_dtype": compute_dtype, "lm_bytes": lm_bytes, **memory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--source", type=int, default=64)
    parser.add_argument("--target", type=int, default=64)
    parser.add_argument("--prefix", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    threads = c.pin_threads(args.threads)
    rows = [step_memory(args.layers, args.batch, args.source, args.target, args.prefix, p, d) for p, d in ROWS]
    base = rows[0]
    mib = lambda b: f"{b / MIB:.0f}"
    table_rows = [[r["param_dtype"], r["compute_dtype"], mib(r["lm_bytes"]), mib(r["temp"]),
                   f"{r['temp'] / base['temp']:.2f}", mib(r["peak"]), f"{r['peak'] / base['peak']:.2f}"] for r in rows]
    print(f"GPT-2 d768 {args.layers} layers, batch {args.batch}, {args.source} src + {args.target} tgt, prefix "
          f"{args.prefix} (compiled, CPU backend)")
    table = c.print_table(["LM params", "compute", "LM weights MiB", "step temp MiB", "temp / f32",
                           "compiled peak MiB", "peak / f32"], table_rows)
    c.write_json(args.json, "bf16_memory", {"machine": c.machine(threads), "args": vars(args), "results": rows,
                                            "table": table})


if __name__ == "__main__":
    main()
