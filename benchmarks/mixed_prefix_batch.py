"""Decoding a batch whose rows use 3 different prefixes: one mixed-batch call vs 3 single-prefix calls.

  python benchmarks/mixed_prefix_batch.py [--model DIR | --arch gpt2|t5|bart] [--batch 24] [--beams 1]
      [--new 32] [--repeats 5] [--out benchmarks/results/mixed_prefix_batch.json]

Without --model a tiny random checkpoint of --arch is built (prefix_jax.tiny_checkpoints). The 3 prefixes are
random, of lengths 5, 10 and 20 (every placement the model offers). "separate" decodes each task's
rows (batch/3 each) in its own call, as a one-prefix-per-batch library must; "mixed" decodes all rows in
one call with a prefix bank. Both are compiled first; the median of --repeats timed runs is reported,
with separate/mixed (> 1: the mixed batch is faster). Checks the outputs are identical. Not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--arch", default="gpt2", choices=("gpt2", "t5", "bart"))
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--source", type=int, default=32)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--beams", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" /
                                             "mixed_prefix_batch.json"))
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp

    from prefix_jax import prefix_bank, tiny_checkpoints
    from prefix_jax.generate import GenerationConfig, make_generate_fn
    from prefix_jax.models import KV, Prefix, load_pretrained

    model_dir = args.model or str(tiny_checkpoints.build_tiny_checkpoint(Path(tempfile.mkdtemp()) / args.arch, args.arch))
    lm = load_pretrained(model_dir)
    params = jax.device_put(lm.params)
    rng = np.random.default_rng(0)
    prefixes = []
    for length in (5, 10, 20):
        kv = {p: KV(*(jnp.asarray(rng.normal(size=(g.num_layers, g.num_heads, length, g.head_dim)), jnp.float32)
                      for _ in range(2))) for p, g in lm.config.prefix_geometry().items()}
        prefixes.append(Prefix(kv=kv))
    tasks = 3
    per_task = args.batch // tasks
    batch = per_task * tasks
    rows = np.arange(batch) % tasks  # interleaved tasks
    vocab = lm.config.vocab_size
    source_ids = jnp.asarray(rng.integers(3, vocab, (batch, args.source)), jnp.int32)
    source_mask = jnp.ones((batch, args.source), jnp.int32)
    generate = make_generate_fn(lm.model, GenerationConfig(args.new, args.beams))
    bank = prefix_bank.for_rows(prefix_bank.stack(prefixes), rows)

    def mixed():
        return np.asarray(generate(params, bank, source_ids, source_mask))

    def separate():
        out = np.zeros((batch, args.new), np.int32)
        for t, prefix in enumerate(prefixes):
            chosen = np.nonzero(rows == t)[0]
            out[chosen] = np.asarray(generate(params, prefix, source_ids[chosen], source_mask[chosen]))
        return out

    def timed(fn):
        first = fn()  # compile
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return first, statistics.median(times)

    mixed_out, mixed_s = timed(mixed)
    separate_out, separate_s = timed(separate)
    model = args.model or f"tiny random {args.arch} (prefix_jax.tiny_checkpoints, a temporary directory)"
    result = {"model": model, "arch": lm.config.architecture, "device": str(jax.devices()[0]), "batch": batch,
              "tasks": tasks, "prefix_lengths": [5, 10, 20], "source_len": args.source, "new_tokens": args.new,
              "beams": args.beams, "mixed_s": mixed_s, "separate_s": separate_s, "separate_over_mixed":
              separate_s / mixed_s, "identical_outputs": bool(np.array_equal(mixed_out, separate_out))}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"mixed batch: {mixed_s * 1e3:.1f} ms   3 separate runs: {separate_s * 1e3:.1f} ms   "
          f"ratio separate/mixed = {separate_s / mixed_s:.2f}   identical outputs: {result['identical_outputs']}")


if __name__ == "__main__":
    main()
