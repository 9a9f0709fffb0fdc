"""Ours against ours: the prefix read as its own block of keys (now) vs concatenated in front of every row's keys
(before), in one process, interleaved, so the machine's load hits both alike.

  python benchmarks/prefix_attention_ab.py                  # small shapes of train_step_vs_peft / beam_vs_generate
  python benchmarks/prefix_attention_ab.py --shapes issue   # the issue's shapes

"concatenated" re-creates the earlier path by wrapping `attention.attend`: the prefix (or a bank's rows) is
broadcast to `[B, P, N, K]` and concatenated to the keys and values, then attended with no prefix; for beam
search it also gathers the cross-attention memory on every reorder, as before. Rows: training step time and
compiled step memory (`memory_analysis`: temp, peak) of the GPT-2 and T5 training shapes; beam search time.
Writes benchmarks/results/prefix_attention_ab.<shapes>.json (or --json).
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time

import _common as c

TRAIN = {"small": [c.Shape("gpt2", layers=4, batch=4, source=64, target=64, prefix=10),
                   c.Shape("t5", layers=2, batch=4, source=128, target=32, prefix=30)],
         "issue": [c.Shape("gpt2", layers=12, batch=8, source=64, target=64, prefix=10),
                   c.Shape("t5", layers=6, batch=8, source=256, target=64, prefix=30)]}
BEAM = {"small": c.Shape("t5", layers=2, batch=4, source=64, target=0, prefix=30),
        "issue": c.Shape("t5", layers=6, batch=8, source=256, target=0, prefix=30)}
MIB = 2**20


@contextlib.contextmanager
def concatenated_prefix():
    """While active, tracing uses the earlier attention (prefix concatenated) and full-cache beam reorders."""
    from prefix_jax import generate
    from prefix_jax.models import attention, fused_attention

    plain = attention.attend

    def concatenating(q, k, v, mask, bias, scale, dropout=None, deterministic=True, prefix=None, kernel="einsum"):
        if prefix is not None:  # in front of the keys, a bank's empty slots masked
            k, v, mask = fused_attention.with_prefix(k, v, mask, *attention._prefix_block(prefix, k.dtype))
        return plain(q, k, v, mask, bias, scale, dropout, deterministic, kernel=kernel)

    attention.attend, same = concatenating, generate._SAME_FOR_EVERY_BEAM
    generate._SAME_FOR_EVERY_BEAM = ()
    try:
        yield
    finally:
        attention.attend, generate._SAME_FOR_EVERY_BEAM = plain, same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", choices=sorted(TRAIN), default="small")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--beams", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    threads = c.pin_threads(args.threads)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from prefix_jax.generate import GenerationConfig, make_generate_fn
    from prefix_jax.models import DECODER, KV, Prefix, load_pretrained

    rows, results = [], []
    for shape in TRAIN[args.shapes]:
        with tempfile.TemporaryDirectory() as directory:
            c.save_random_checkpoint(shape, directory)
            steps = {"block": c.ours_step_fn(shape, directory)}
            with concatenated_prefix():
                steps["concatenated"] = c.ours_step_fn(shape, directory)
                steps["concatenated"]()  # traced (and compiled) with the earlier attention
        memory = {}
        for name, s in steps.items():
            with concatenated_prefix() if name == "concatenated" else contextlib.nullcontext():
                m = s.step.lower(s.state, s.lm_params, s.batch).compile().memory_analysis()
            memory[name] = {"temp": m.temp_size_in_bytes,
                            "peak": m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                            - m.alias_size_in_bytes}
        times = c.interleaved(steps, 1, args.steps)
        med = {name: c.median(t) for name, t in times.items()}
        results.append({"shape": shape.describe(), "times": times, "memory": memory})
        rows.append([f"train step: {shape.describe()}", f"{med['concatenated'] * 1e3:.0f}", f"{med['block'] * 1e3:.0f}",
                     f"{med['concatenated'] / med['block']:.2f}x",
                     f"{memory['concatenated']['temp'] / MIB:.0f} -> {memory['block']['temp'] / MIB:.0f}",
                     f"{memory['concatenated']['peak'] / MIB:.0f} -> {memory['block']['peak'] / MIB:.0f}"])

    shape = BEAM[args.shapes]
    with tempfile.TemporaryDirectory() as directory:
        c.save_random_checkpoint(shape, directory)
        lm = load_pretrained(directory)
    g = lm.config.prefix_geometry()[DECODER]
    rng = np.random.default_rng(0)
    kv = KV(*(jnp.asarray(rng.normal(size=(g.num_layers, g.num_heads, shape.prefix, g.head_dim)), jnp.float32)
              for _ in range(2)))
    prefix = Prefix(kv={DECODER: kv})
    src = jnp.asarray(rng.integers(2, lm.config.vocab_size - 100, (shape.batch, shape.source)), jnp.int32)
    mask = jnp.ones_like(src)
    lm_params = jax.device_put(lm.params)
    fns = {}
    for name in ("block", "concatenated"):
        fn = make_generate_fn(lm.model, GenerationConfig(args.new_tokens, args.beams))
        with concatenated_prefix() if name == "concatenated" else contextlib.nullcontext():
            start = time.perf_counter()
            jax.block_until_ready(fn(lm_params, prefix, src, mask))
            print(f"{name}: first generate call {time.perf_counter() - start:.1f} s")
        fns[name] = (lambda fn: lambda: np.asarray(jax.block_until_ready(fn(lm_params, prefix, src, mask))))(fn)
    same = np.array_equal(fns["block"](), fns["concatenated"]())
    times = c.interleaved(fns, 0, 3)
    med = {name: c.median(t) for name, t in times.items()}
    results.append({"shape": shape.describe(), "beams": args.beams, "new_tokens": args.new_tokens, "times": times,
                    "same_tokens": bool(same)})
    rows.append([f"beam {args.beams}, {args.new_tokens} new: {shape.describe()} (same tokens: {same})",
                 f"{med['concatenated'] * 1e3:.0f}", f"{med['block'] * 1e3:.0f}",
                 f"{med['concatenated'] / med['block']:.2f}x", "", ""])
    table = c.print_table(["what", "concatenated ms", "block ms", "speed-up", "step temp MiB", "step peak MiB"], rows)
    c.write_json(args.json, f"prefix_attention_ab.{args.shapes}", {"machine": c.machine(threads), "args": vars(args),
                                                                  "results": results, "table": table})


if __name__ == "__main__":
    main()
