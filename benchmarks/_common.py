"""Shared pieces of the benchmarks: thread pinning, random checkpoints, both sides' training steps,
interleaved timing, a same-run matmul peak, analytic model FLOPs, tables and JSON. Not part of the package.

Import this before jax or torch (it pins the process to `--threads` cores first).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run_as_train_py() -> None:
    """Restarts this process with the host memory settings train.py starts with (`prefix_jax.host_memory`)."""
    from prefix_jax import host_memory

    host_memory.reexec_with_huge_pages()


def child_result(script: str, *args: str, env: dict | None = None) -> dict:
    """Runs `script --child ARGS` in a new Python process and returns the JSON object of its last stdout line."""
    out = subprocess.run([sys.executable, script, "--child", *args], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{Path(script).name} --child {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def pin_threads(threads: int) -> int:
    """Pins this process (JAX's and torch's pools alike) to the first `threads` allowed cores."""
    allowed = sorted(os.sched_getaffinity(0))
    threads = max(1, min(threads, len(allowed)))
    os.sched_setaffinity(0, allowed[:threads])
    import torch

    torch.set_num_threads(threads)
    return threads


def machine(threads: int) -> dict:
    """What ran the benchmark: CPU model, cores used, library versions."""
    import jax
    import torch
    import transformers

    from prefix_jax import host_memory

    cpu = platform.processor() or "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "threads": threads, "visible_cores": os.cpu_count(), "python": platform.python_version(),
            "jax": jax.__version__, "backend": jax.default_backend(), "torch": torch.__version__,
            "transformers": transformers.__version__, "host_memory": host_memory.status()}


# --- Random checkpoints with real shapes ---


@dataclasses.dataclass(frozen=True)
class Shape:
    """One benchmarked training shape."""

    model: str  # gpt2 | t5
    layers: int  # per stack
    batch: int
    source: int
    target: int
    prefix: int
    d_model: int = 0  # 0: the model's default (GPT-2 small 768, T5-small 512)
    vocab: int = 0  # 0: the model's default

    def describe(self) -> str:
        dims = f"d{self.d_model or (768 if self.model == 'gpt2' else 512)}"
        stacks = f"{self.layers}" if self.model == "gpt2" else f"{self.layers}+{self.layers}"
        return (f"{self.model} {dims} {stacks} layers, batch {self.batch}, {self.source} src + {self.target} tgt, "
                f"prefix {self.prefix}")


def hf_config(shape: Shape) -> Any:
    from transformers import GPT2Config, T5Config

    if shape.model == "gpt2":
        kw = dict(n_layer=shape.layers)
        if shape.d_model:
            kw.update(n_embd=shape.d_model, n_head=max(1, shape.d_model // 64))
        if shape.vocab:
            kw.update(vocab_size=shape.vocab)
        return GPT2Config(**kw)
    kw = dict(num_layers=shape.layers, decoder_start_token_id=0)
    if shape.d_model:
        kw.update(d_model=shape.d_model, d_ff=4 * shape.d_model, num_heads=max(1, shape.d_model // 64))
    if shape.vocab:
        kw.update(vocab_size=shape.vocab)
    return T5Config(**kw)


def save_random_checkpoint(shape: Shape, directory: str) -> Any:
    """A random HF model of `shape` saved to `directory`; returns its HF config."""
    import torch
    from transformers import GPT2LMHeadModel, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = hf_config(shape)
    cls = GPT2LMHeadModel if shape.model == "gpt2" else T5ForConditionalGeneration
    cls(config).save_pretrained(directory)
    return config


def host_batch(shape: Shape, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"source_ids": rng.integers(2, vocab - 100, (shape.batch, shape.source)).astype(np.int32),
            "source_mask": np.ones((shape.batch, shape.source), np.int32),
            "target_ids": rng.integers(2, vocab - 100, (shape.batch, shape.target)).astype(np.int32),
            "target_mask": np.ones((shape.batch, shape.target), np.int32)}


# --- Both sides' training steps (same model, batch, prefix length, MLP width 512, AdamW, float32) ---


def peft_model(shape: Shape, directory: str) -> Any:
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    if shape.model == "gpt2":
        base, task = AutoModelForCausalLM.from_pretrained(directory), "CAUSAL_LM"
    else:
        base, task = AutoModelForSeq2SeqLM.from_pretrained(directory), "SEQ_2_SEQ_LM"
    return get_peft_model(base, PrefixTuningConfig(task_type=task, num_virtual_tokens=shape.prefix,
                                                   prefix_projection=True, encoder_hidden_size=512))


def peft_step_fn(shape: Shape, directory: str) -> Callable[[], float]:
    """A PEFT prefix-tuning step on the benchmark batch; returns a function that runs one and gives the loss."""
    import torch

    model = peft_model(shape, directory)
    model.train()
    b = {k: torch.tensor(v, dtype=torch.long) for k, v in host_batch(shape, model.config.vocab_size).items()}
    if shape.model == "gpt2":  # [source; target], loss on the target half only, as ours
        ids = torch.cat([b["source_ids"], b["target_ids"]], 1)
        labels = ids.clone()
        labels[:, :shape.source] = -100
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    else:
        kwargs = dict(input_ids=b["source_ids"], attention_mask=b["source_mask"], labels=b["target_ids"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5)

    def step() -> float:
        loss = model(**kwargs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return float(loss)

    return step


@dataclasses.dataclass
class OursStep:
    """Our jitted prefix-tuning step with everything it needs; `__call__` runs one step and blocks."""

    step: Callable
    state: Any
    lm_params: Any
    batch: dict
    lm: Any
    spec: Any

    def __call__(self) -> float:
        import jax

        self.state, metrics = self.step(self.state, self.lm_params, self.batch)
        return float(jax.block_until_ready(metrics["loss"]))


def ours_step_fn(shape: Shape, directory: str, loss: str = "logits", remat: str = "none") -> OursStep:
    """Our prefix-tuning step (decoder placement, as PEFT). `loss='chunked'`: the chunked cross-entropy
    (`train.loss_chunk_tokens`, chunks of ~64 MiB of logits); `remat`: `model.remat` (none | minimal | full)."""
    import jax
    import jax.numpy as jnp

    from prefix_jax import losses, optim, train_steps
    from prefix_jax import prefix as prefix_lib
    from prefix_jax.models import common, load_pretrained

    lm = load_pretrained(directory, remat=common.remat_policy(remat))
    spec = prefix_lib.PrefixSpec(length=shape.prefix, placements=("decoder",), geometry=lm.config.prefix_geometry(),
                                 hidden_size=lm.config.hidden_size, mlp_hidden=512)
    params = prefix_lib.init_params(spec, jax.random.PRNGKey(0))
    tx, schedule = optim.make_optimizer(params, learning_rate=5e-5, total_steps=1000, max_grad_norm=None)
    chunk = max(1, losses.CHUNK_LOGITS // lm.config.vocab_size) if loss == "chunked" else 0
    step = train_steps.jit_train_step(lm.model, spec, tx, schedule, loss_chunk_tokens=chunk)
    state = train_steps.init_state(params, tx, jax.random.PRNGKey(1))
    batch = {k: jnp.asarray(v) for k, v in host_batch(shape, lm.config.vocab_size).items()}
    return OursStep(step, state, jax.device_put(lm.params), batch, lm, spec)


# --- Timing ---


def interleaved(fns: dict[str, Callable[[], Any]], warmup: int, reps: int) -> dict[str, list[float]]:
    """Wall times of `reps` calls of each function, alternating A, B, A, B... after `warmup` calls each."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def matmul_peak_flops(n: int = 1024, reps: int = 10) -> float:
    """This machine's float32 matmul throughput (FLOP/s) through JAX, measured now (median of `reps`)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    mm = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(mm(a, a))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(mm(a, a))
        times.append(time.perf_counter() - start)
    return 2 * n**3 / median(times)


class RssSampler:
    """Peak resident memory of this process while the `with` block runs (sampled every ms), above its start."""

    def __enter__(self) -> "RssSampler":
        self.base = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def increase(self) -> int:
        return self.peak - self.base


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# --- Analytic model FLOPs of a prefix-tuning step ---


def train_step_flops(shape: Shape, hf: Any) -> dict[str, float]:
    """Forward and backward model FLOPs of our prefix-tuning step (decoder placement), counted analytically.

    Matmuls only (2 FLOPs per multiply-add). Forward: every linear layer over its tokens, attention scores and
    mixing over prefix + keys, the LM head over the target positions. Backward: only activation gradients
    (frozen weights get none) and only where the prefix reaches: linear layers 1x their forward, attention 2x
    (dQ, dK and dV, dP), and nothing through T5's encoder or cross-attention keys/values (they do not depend
    on a decoder prefix; cross-attention then costs 1x: dP and dQ). The prefix MLP's own cost is included.
    """
    b, s, t, p = shape.batch, shape.source, shape.target, shape.prefix
    prefix_mlp_fwd = 2 * p * (hf_hidden(hf) * 512 + 512 * 2 * hf_layers(hf) * hf_hidden(hf))
    if shape.model == "gpt2":
        d, layers, v = hf.n_embd, hf.n_layer, hf.vocab_size
        length = s + t
        linear = 2 * b * length * (4 * d * d + 2 * d * 4 * d) * layers
        attention = 4 * b * length * (p + length) * d * layers
        head = 2 * b * t * d * v
        fwd = linear + attention + head + prefix_mlp_fwd
        bwd = linear + 2 * attention + head + 2 * prefix_mlp_fwd
        return {"forward": fwd, "backward": bwd, "total": fwd + bwd}
    d, inner, ff, layers, v = hf.d_model, hf.num_heads * hf.d_kv, hf.d_ff, hf.num_layers, hf.vocab_size
    encoder = (2 * b * s * (4 * d * inner + 2 * d * ff) + 4 * b * s * s * inner) * layers
    self_linear = 2 * b * t * 4 * d * inner
    self_attention = 4 * b * t * (p + t) * inner
    cross_q_o = 2 * b * t * 2 * d * inner
    cross_k_v = 2 * b * s * 2 * d * inner
    cross_attention = 4 * b * t * s * inner
    ffn = 2 * b * t * 2 * d * ff
    head = 2 * b * t * d * v
    fwd = encoder + layers * (self_linear + self_attention + cross_q_o + cross_k_v + cross_attention + ffn) + head
    bwd = layers * (self_linear + 2 * self_attention + cross_q_o + cross_attention + ffn) + head
    return {"forward": fwd + prefix_mlp_fwd, "backward": bwd + 2 * prefix_mlp_fwd,
            "total": fwd + bwd + 3 * prefix_mlp_fwd}


def hf_hidden(hf: Any) -> int:
    return getattr(hf, "n_embd", None) or hf.d_model


def hf_layers(hf: Any) -> int:
    return getattr(hf, "n_layer", None) or hf.num_layers


# --- Output ---


def print_table(columns: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table (printed and returned)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    text = "\n".join(lines)
    print(text)
    return text


def write_json(path: str | None, name: str, payload: dict) -> Path:
    out = Path(path) if path else ROOT / "benchmarks" / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, default=float))
    print(f"wrote {out}")
    return out
