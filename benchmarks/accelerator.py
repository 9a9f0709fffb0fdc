"""bf16 prefix-tuning steps on a GPU/TPU: step time, tokens/s, analytic MFU, peak device memory; PEFT beside it.

Run through `benchmarks/accelerator.sh` (one command, <= 8 minutes, one table). Run on an NVIDIA H200
(JAX 0.11.2, torch 2.11 + CUDA 13; results in benchmarks/README.md); not yet on a TPU.

Rows (random weights, paper's prefix settings; the trainable prefix and its AdamW state are float32):
- gpt2-medium (d1024, 24 layers), table-to-text: batch 16, 64 + 64 tokens, prefix 10, MLP 512, decoder.
- t5-base (d768, 12+12), summarization: batch 16, 512 + 64 tokens, prefix 100, MLP 800, encoder + decoder
  + cross prefixes (the paper's three).
- llama-1b (Llama-3.2-1B shapes: d2048, 16 layers, 32 heads / 8 KV heads, vocab 128256, tied head):
  batch 8, 256 + 128 tokens, prefix 10, MLP 512, decoder.
- gpt2-medium again in float32 (params and compute), for its peak memory beside bf16's.
Those four are `--group base` (the default; <= 8 minutes on an H200). `--group levers` (ours only): chunked loss,
remat "minimal", T5 with a decoder-only prefix. `--group kernels` (ours only): `model.attention_kernel` "jax" /
"cudnn" for t5-base (dropout off, beside an einsum row with dropout off) and llama-1b. `--group all`: every row.
Each row and side runs in its own child process (so peak memory is that row's, and JAX's and torch's
allocators never share a GPU) with its share of the time budget; a row that does not fit is reported as
skipped. `--smoke` runs everything in this process instead (`--isolate` forces children). PEFT rows (PyTorch prefix tuning, bf16, same shapes;
PEFT gives a seq2seq model a decoder prefix only) run when torch sees a GPU, else they are skipped.

MFU = analytic model FLOPs per step / step time / peak. Model FLOPs: matmuls only, 2 per multiply-add;
forward over every linear layer, attention scores and mixing over prefix + keys, the LM head over the
target positions, the prefix MLP; backward = activation gradients only (frozen weights get none): linear
layers 1x, attention 2x, everywhere the prefix reaches (everything here). Peaks: a bf16 8192^3 matmul
measured in the same child (float32 1024^3 on CPU), and the device's nominal dense bf16 peak when known.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Dense bf16 peak FLOP/s by `device_kind` substring (vendor data sheets; no sparsity).
NOMINAL_BF16_PEAK = (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12),
                     ("A10G", 70e12), ("V100", 125e12), ("TPU v6", 918e12), ("TPU v5p", 459e12),
                     ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v4", 275e12))


@dataclasses.dataclass(frozen=True)
class Row:
    """One benchmarked model: architecture, HF config fields, batch and prefix settings."""

    name: str
    arch: str  # gpt2 | t5 | llama
    hf: dict
    batch: int
    source: int
    target: int
    prefix: int
    mlp: int
    placements: tuple[str, ...]
    dtype: str = "bfloat16"
    budget_s: int = 90  # the child's time limit
    remat: str = "none"  # model.remat
    loss_chunk_tokens: int = 0  # train.loss_chunk_tokens (0: the whole [B, T, V] logits)
    peft: bool = True  # also run PEFT (its own shapes ignore remat, chunking and our placements)
    attention_kernel: str = "einsum"  # model.attention_kernel (einsum | jax | cudnn)
    group: str = "base"  # base (what a plain run measures, <= 8 minutes) | levers | kernels (`--group`)

    @property
    def label(self) -> str:
        """The row's name with what differs from the defaults (what `--only` matches)."""
        extras = [self.dtype] + [f"remat={self.remat}"] * (self.remat != "none") + \
            [f"chunk={self.loss_chunk_tokens}"] * (self.loss_chunk_tokens > 0) + \
            [f"attn={self.attention_kernel}"] * (self.attention_kernel != "einsum") + \
            ["dropout=0"] * (self.hf.get("dropout_rate") == 0.0)
        extras += ["+".join(self.placements)] if self.arch == "t5" else []
        return " ".join([self.name] + extras)


LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                max_position_embeddings=4096)
T5_BASE_NO_DROPOUT = dict(d_model=768, d_ff=3072, d_kv=64, num_layers=12, num_heads=12, dropout_rate=0.0)
FULL = (
    Row("gpt2-medium", "gpt2", dict(n_embd=1024, n_layer=24, n_head=16), 16, 64, 64, 10, 512, ("decoder",),
        budget_s=100),
    Row("t5-base", "t5", dict(d_model=768, d_ff=3072, d_kv=64, num_layers=12, num_heads=12), 16, 512, 64, 100, 800,
        ("encoder", "decoder", "cross"), budget_s=110),
    Row("llama-1b", "llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                  num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                                  tie_word_embeddings=True, max_position_embeddings=4096), 8, 256, 128, 10, 512,
        ("decoder",), budget_s=130),
    Row("gpt2-medium", "gpt2", dict(n_embd=1024, n_layer=24, n_head=16), 16, 64, 64, 10, 512, ("decoder",),
        dtype="float32", budget_s=80),
    # Memory levers (ours only): the chunked loss, then with remat "minimal"; T5 with PEFT's decoder-only prefix.
    Row("gpt2-medium", "gpt2", dict(n_embd=1024, n_layer=24, n_head=16), 16, 64, 64, 10, 512, ("decoder",),
        budget_s=70, loss_chunk_tokens=256, peft=False, group="levers"),
    Row("gpt2-medium", "gpt2", dict(n_embd=1024, n_layer=24, n_head=16), 16, 64, 64, 10, 512, ("decoder",),
        budget_s=70, loss_chunk_tokens=256, remat="minimal", peft=False, group="levers"),
    Row("t5-base", "t5", dict(d_model=768, d_ff=3072, d_kv=64, num_layers=12, num_heads=12), 16, 512, 64, 100, 800,
        ("decoder",), budget_s=80, peft=False, group="levers"),
    Row("t5-base", "t5", dict(d_model=768, d_ff=3072, d_kv=64, num_layers=12, num_heads=12), 16, 512, 64, 100, 800,
        ("encoder", "decoder", "cross"), budget_s=80, remat="minimal", peft=False, group="levers"),
    Row("llama-1b", "llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                  num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                                  tie_word_embeddings=True, max_position_embeddings=4096), 8, 256, 128, 10, 512,
        ("decoder",), budget_s=80, loss_chunk_tokens=256, remat="minimal", peft=False, group="levers"),
    # Attention through jax.nn.dot_product_attention (`--group kernels`): "jax" is its XLA implementation,
    # "cudnn" the fused kernel (fails, reported as skipped, where there is no cuDNN). Attention dropout takes the
    # einsum path, so the T5 rows turn T5's dropout_rate (also its attention dropout) off, with an einsum baseline.
    *(Row("t5-base", "t5", T5_BASE_NO_DROPOUT, 16, 512, 64, 100, 800, ("encoder", "decoder", "cross"), budget_s=80,
          peft=False, attention_kernel=kernel, group="kernels") for kernel in ("einsum", "jax")),
    Row("llama-1b", "llama", LLAMA_1B, 8, 256, 128, 10, 512, ("decoder",), budget_s=80, peft=False,
        attention_kernel="jax", group="kernels"),
    Row("t5-base", "t5", T5_BASE_NO_DROPOUT, 16, 512, 64, 100, 800, ("encoder", "decoder", "cross"), budget_s=80,
        peft=False, attention_kernel="cudnn", group="kernels"),
    Row("llama-1b", "llama", LLAMA_1B, 8, 256, 128, 10, 512, ("decoder",), budget_s=80, peft=False,
        attention_kernel="cudnn", group="kernels"),
)
SMOKE = (
    Row("gpt2-tiny", "gpt2", dict(n_embd=64, n_layer=2, n_head=4, vocab_size=512, n_positions=128, bos_token_id=1,
                                  eos_token_id=1), 2, 16, 8, 4, 16, ("decoder",), budget_s=40),
    Row("t5-tiny", "t5", dict(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4, vocab_size=512), 2, 16, 8, 4,
        16, ("encoder", "decoder", "cross"), budget_s=40),
    Row("llama-tiny", "llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=16, vocab_size=512, tie_word_embeddings=True,
                                    max_position_embeddings=128), 2, 16, 8, 4, 16, ("decoder",), budget_s=40),
    Row("llama-tiny", "llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=16, vocab_size=512, tie_word_embeddings=True,
                                    max_position_embeddings=128), 2, 16, 8, 4, 16, ("decoder",), budget_s=40,
        loss_chunk_tokens=8, remat="minimal", peft=False),
)


def hf_config(row: Row):
    import transformers

    if row.arch == "gpt2":
        return transformers.GPT2Config(**row.hf)
    if row.arch == "t5":
        return transformers.T5Config(decoder_start_token_id=0, **row.hf)
    return transformers.LlamaConfig(bos_token_id=1, eos_token_id=2, **row.hf)


# --- Analytic FLOPs ---


def step_flops(row: Row) -> float:
    """Model FLOPs of one prefix-tuning step of `row` (see the module docstring)."""
    hf = hf_config(row)
    b, s, t, p = row.batch, row.source, row.target, row.prefix
    if row.arch == "t5":
        d, inner, ff, layers, v = hf.d_model, hf.num_heads * hf.d_kv, hf.d_ff, hf.num_layers, hf.vocab_size
        ffn = (3 if hf.is_gated_act else 2) * d * ff
        enc_linear = 2 * b * s * (4 * d * inner + ffn) * layers
        enc_attention = 4 * b * s * (p + s) * inner * layers
        dec_linear = (2 * b * t * (4 * d * inner + 2 * d * inner + ffn) + 2 * b * s * 2 * d * inner) * layers
        dec_attention = (4 * b * t * (p + t) * inner + 4 * b * t * (p + s) * inner) * layers
        linear, attention, head = enc_linear + dec_linear, enc_attention + dec_attention, 2 * b * t * d * v
        kv_size = 2 * layers * inner
        placements = 3
    else:
        if row.arch == "gpt2":
            d, layers, v, heads, kv_heads, head_dim = hf.n_embd, hf.n_layer, hf.vocab_size, hf.n_head, hf.n_head, \
                hf.n_embd // hf.n_head
            mlp_params = 2 * d * (hf.n_inner or 4 * d)
        else:
            d, layers, v = hf.hidden_size, hf.num_hidden_layers, hf.vocab_size
            heads, kv_heads, head_dim = hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim
            mlp_params = 3 * d * hf.intermediate_size
        length = s + t
        layer_params = 2 * d * heads * head_dim + 2 * d * kv_heads * head_dim + mlp_params
        linear = 2 * b * length * layer_params * layers
        attention = 4 * b * length * (p + length) * heads * head_dim * layers
        head = 2 * b * t * d * v
        kv_size = 2 * layers * kv_heads * head_dim
        placements = 1
    hidden = getattr(hf, "n_embd", None) or getattr(hf, "d_model", None) or hf.hidden_size
    prefix_mlp = placements * 2 * p * (hidden * row.mlp + row.mlp * kv_size)
    forward = linear + attention + head + prefix_mlp
    backward = linear + 2 * attention + head + 2 * prefix_mlp
    return float(forward + backward)


# --- Children ---


def matmul_peak(backend: str) -> float:
    import jax
    import jax.numpy as jnp

    n, dtype = (1024, jnp.float32) if backend == "cpu" else (8192, jnp.bfloat16)
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    mm = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(mm(a, a))
    times = []
    for _ in range(5):
        start = time.perf_counter()
        jax.block_until_ready(mm(a, a))
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times)


def nominal_peak(device_kind: str) -> float | None:
    return next((peak for key, peak in NOMINAL_BF16_PEAK if key.lower() in device_kind.lower()), None)


def run_ours(row: Row, steps: int) -> dict:
    """Our jitted train step on random weights: compile time, median step time, peak memory."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from prefix_jax import models, optim, train_steps
    from prefix_jax import prefix as prefix_lib

    hf = hf_config(row)
    arch = models.architecture(hf.model_type)
    config = arch.Config.from_hf(hf, set(), dtype=row.dtype, param_dtype=row.dtype, remat=row.remat,
                                 attention_kernel=row.attention_kernel)
    model = arch.Model(config)
    rng = np.random.default_rng(0)
    vocab = config.vocab_size
    batch = {"source_ids": jnp.asarray(rng.integers(3, vocab - 1, (row.batch, row.source)), jnp.int32),
             "source_mask": jnp.ones((row.batch, row.source), jnp.int32),
             "target_ids": jnp.asarray(rng.integers(3, vocab - 1, (row.batch, row.target)), jnp.int32),
             "target_mask": jnp.ones((row.batch, row.target), jnp.int32)}
    lm_params = jax.jit(lambda key: model.init(key, batch)["params"])(jax.random.PRNGKey(0))
    spec = prefix_lib.PrefixSpec(length=row.prefix, placements=row.placements, geometry=config.prefix_geometry(),
                                 hidden_size=config.hidden_size, mlp_hidden=row.mlp)
    params = prefix_lib.init_params(spec, jax.random.PRNGKey(1))
    tx, schedule = optim.make_optimizer(params, learning_rate=5e-5, total_steps=1000)
    state = train_steps.init_state(params, tx, jax.random.PRNGKey(2))
    step = train_steps.jit_train_step(model, spec, tx, schedule, loss_chunk_tokens=row.loss_chunk_tokens)
    start = time.perf_counter()
    compiled = step.lower(state, lm_params, batch).compile()
    compile_s = time.perf_counter() - start
    analysis = compiled.memory_analysis()
    state, metrics = compiled(state, lm_params, batch)  # warm-up
    jax.block_until_ready(metrics["loss"])
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, lm_params, batch)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - start)
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    compiled_peak = None
    if analysis is not None:
        compiled_peak = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                         + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)
    return {"step_s": statistics.median(times), "compile_s": compile_s, "loss": float(metrics["loss"]),
            "peak_bytes": stats.get("peak_bytes_in_use"), "compiled_peak_bytes": compiled_peak,
            "lm_params": int(sum(x.size for x in jax.tree.leaves(lm_params))),
            "backend": jax.default_backend(), "device_kind": device.device_kind,
            "matmul_peak": matmul_peak(jax.default_backend())}


def run_peft(row: Row, steps: int, allow_cpu: bool) -> dict:
    """PEFT prefix tuning (PyTorch, bf16, AdamW) on the same shapes, on the GPU torch sees."""
    try:
        import torch
    except ImportError:
        return {"skipped": "torch is not installed"}
    if not torch.cuda.is_available() and not allow_cpu:
        return {"skipped": "torch sees no GPU"}
    import transformers
    from peft import PrefixTuningConfig, get_peft_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    hf = hf_config(row)
    cls = {"gpt2": transformers.GPT2LMHeadModel, "t5": transformers.T5ForConditionalGeneration,
           "llama": transformers.LlamaForCausalLM}[row.arch]
    task = "SEQ_2_SEQ_LM" if row.arch == "t5" else "CAUSAL_LM"
    with torch.device(device):  # random init straight on the GPU (a 1B model's CPU init alone takes long)
        model = cls(hf).to(dtype=torch.bfloat16)
    model = get_peft_model(model, PrefixTuningConfig(task_type=task, num_virtual_tokens=row.prefix,
                                                     prefix_projection=True, encoder_hidden_size=row.mlp))
    model.train()
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, hf.vocab_size - 1, (row.batch, n), generator=g).to(device)
    source, target = ids(row.source), ids(row.target)
    if row.arch == "t5":
        kwargs = dict(input_ids=source, attention_mask=torch.ones_like(source), labels=target)
    else:
        full = torch.cat([source, target], 1)
        labels = full.clone()
        labels[:, :row.source] = -100
        kwargs = dict(input_ids=full, attention_mask=torch.ones_like(full), labels=labels)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step() -> float:
        loss = model(**kwargs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    step()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times), "loss": float(loss.detach()), "device": device,
            "peak_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None}


def child(args: argparse.Namespace) -> None:
    rows = SMOKE if args.smoke else FULL
    row = rows[args.child_row]
    result = run_peft(row, args.steps, args.smoke) if args.child_side == "peft" else run_ours(row, args.steps)
    print("RESULT " + json.dumps(result))


def in_child(side: str, index: int, args: argparse.Namespace, timeout: float) -> dict:
    command = [sys.executable, __file__, "--child-side", side, "--child-row", str(index), "--steps", str(args.steps)]
    if args.smoke:
        command.append("--smoke")
    start = time.perf_counter()
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"skipped": f"did not finish in its {timeout:.0f} s share of the time budget"}
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        tail = (out.stderr.strip().splitlines() or ["?"])[-1][:200]
        return {"skipped": f"failed (exit {out.returncode}): {tail}", "stderr_tail": out.stderr[-3000:]}
    result = json.loads(lines[-1][len("RESULT "):])
    result["wall_s"] = time.perf_counter() - start
    return result


# --- Parent: one table ---


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, CPU is fine (< 2 minutes)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (default 10; smoke 2)")
    parser.add_argument("--budget", type=float, default=None, help="seconds for everything (default 450; smoke 110)")
    parser.add_argument("--no-peft", action="store_true")
    parser.add_argument("--isolate", action="store_true", help="children even with --smoke (always without it)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--group", default="base", help="rows to run: base (default), levers, kernels or all")
    parser.add_argument("--only", default=None, help="run only rows whose label contains one of these comma-separated texts (e.g. 'chunk=,remat=')")
    parser.add_argument("--child-side", choices=("ours", "peft"), help=argparse.SUPPRESS)
    parser.add_argument("--child-row", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.steps = args.steps or (2 if args.smoke else 10)
    if args.child_side:
        return child(args)
    budget = args.budget or (110.0 if args.smoke else 450.0)
    deadline = time.perf_counter() + budget
    rows = SMOKE if args.smoke else FULL
    results = []
    for index, row in enumerate(rows):
        if args.group != "all" and row.group != args.group and not args.smoke:
            continue
        if args.only and not any(text in row.label for text in args.only.split(",")):
            continue
        entry = {"row": dataclasses.asdict(row), "label": row.label, "flops": step_flops(row)}
        for side in ("ours",) + (() if args.no_peft or not row.peft or row.dtype != "bfloat16" else ("peft",)):
            left = deadline - time.perf_counter()
            if left < 15:
                entry[side] = {"skipped": "time budget spent"}
                continue
            if args.smoke and not args.isolate:
                entry[side] = run_peft(row, args.steps, True) if side == "peft" else run_ours(row, args.steps)
            else:
                entry[side] = in_child(side, index, args, min(row.budget_s, left))
            print(f"{row.label} {side}: " + json.dumps({k: v for k, v in entry[side].items()
                                                                   if k != "stderr_tail"}), flush=True)
        results.append(entry)
    table = print_table(results, smoke=args.smoke)
    if args.smoke:  # a check that the script runs, never a result: outside the repository unless --json says
        out = Path(args.json) if args.json else Path(tempfile.gettempdir()) / "prefix_jax_accelerator.smoke.json"
    else:
        out = Path(args.json) if args.json else ROOT / "benchmarks" / "results" / "accelerator.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"host": platform.node(), "python": platform.python_version(), "args": vars(args),
                               "results": results, "table": table}, indent=2))
    print(f"wrote {out}")
    if args.smoke:
        print(SMOKE_NOTE)


def _gib(b) -> str:
    return "–" if b is None else f"{b / 2**30:.3g}"


SMOKE_NOTE = ("smoke run: tiny random shapes and 2 steps, to check that the script runs; NOT a measurement (no "
              "speed-up is computed; run without --smoke on an accelerator for numbers)")


def print_table(results: list[dict], smoke: bool = False) -> str:
    columns = ["row", "batch, src + tgt, prefix", "ours step ms", "tokens/s", "MFU (same-run matmul)",
               "MFU (nominal)", "peak mem GiB (device; compiled)", "compile s", "PEFT step ms", "PEFT peak GiB",
               "ours speed-up"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for entry in results:
        row, ours, peft = entry["row"], entry.get("ours", {}), entry.get("peft", {})
        shape = f"{row['batch']}, {row['source']} + {row['target']}, {row['prefix']}"
        if "skipped" in ours:
            cells = [entry["label"], shape, f"skipped: {ours['skipped']}"] + ["–"] * 8
        else:
            step = ours["step_s"]
            tokens = row["batch"] * (row["source"] + row["target"]) / step
            nominal = nominal_peak(ours["device_kind"])
            peft_ms = "–" if "step_s" not in peft else f"{peft['step_s'] * 1e3:.1f}"
            cells = [entry["label"], shape, f"{step * 1e3:.1f}", f"{tokens:,.0f}",
                     f"{entry['flops'] / step / ours['matmul_peak']:.0%}",
                     "–" if nominal is None else f"{entry['flops'] / step / nominal:.0%}",
                     f"{_gib(ours['peak_bytes'])}; {_gib(ours['compiled_peak_bytes'])}", f"{ours['compile_s']:.1f}",
                     peft_ms if "skipped" not in peft else f"skipped: {peft['skipped']}",
                     _gib(peft.get("peak_bytes")),
                     "smoke: –" if smoke else (f"{peft['step_s'] / step:.2f}x" if "step_s" in peft else "–")]
        lines.append("| " + " | ".join(cells) + " |")
    device = next((e["ours"].get("device_kind") for e in results if "device_kind" in e.get("ours", {})), "?")
    text = (f"{SMOKE_NOTE}\n" if smoke else "") + f"device: {device}\n" + "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
