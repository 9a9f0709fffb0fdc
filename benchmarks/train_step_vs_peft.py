"""Train-step throughput: prefix_jax vs HF PEFT prefix tuning, side by side, same model, batch and threads.

  python benchmarks/train_step_vs_peft.py [--model gpt2|t5] [--steps 10] [--batch 8]

Both sides get the same random model (GPT-2 small or T5-small shapes), the same prefix (length 10, MLP
mid dim 512, tanh), AdamW, float32, and the same batch of `--batch` x (64 source + 64 target) tokens.
Reports the median step time of each and their ratio; this machine is shared and noisy, so only the
ratio measured in one run means anything. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def peft_steps(model_kind: str, directory: str, batch: int, steps: int, threads: int) -> list[float]:
    import torch
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    if model_kind == "gpt2":
        base = AutoModelForCausalLM.from_pretrained(directory)
        task = "CAUSAL_LM"
        ids = torch.tensor(rng.integers(0, 50000, (batch, 128)))
        labels = ids.clone()
        labels[:, :64] = -100  # loss on the target half only, as ours
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    else:
        base = AutoModelForSeq2SeqLM.from_pretrained(directory)
        task = "SEQ_2_SEQ_LM"
        src = torch.tensor(rng.integers(0, 32000, (batch, 64)))
        kwargs = dict(input_ids=src, attention_mask=torch.ones_like(src),
                      labels=torch.tensor(rng.integers(0, 32000, (batch, 64))))
    model = get_peft_model(base, PrefixTuningConfig(task_type=task, num_virtual_tokens=10, prefix_projection=True,
                                                    encoder_hidden_size=512))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5)
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        loss = model(**kwargs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return times[2:]


def ours_steps(directory: str, batch: int, steps: int, placements: tuple[str, ...]) -> list[float]:
    import jax
    import jax.numpy as jnp

    from prefix_jax import optim, training
    from prefix_jax import prefix as prefix_lib
    from prefix_jax.models import load_pretrained

    lm = load_pretrained(directory)
    spec = prefix_lib.PrefixSpec(length=10, placements=placements, geometry=lm.config.prefix_geometry(),
                                 hidden_size=lm.config.hidden_size, mlp_hidden=512)
    params = prefix_lib.init_params(spec, jax.random.PRNGKey(0))
    tx, schedule = optim.make_optimizer(params, learning_rate=5e-5, total_steps=1000, max_grad_norm=None)
    step = training.jit_train_step(lm.model, spec, tx, schedule)
    state = training.init_state(params, tx, jax.random.PRNGKey(1))
    lm_params = jax.device_put(lm.params)
    rng = np.random.default_rng(0)
    vocab = lm.config.vocab_size
    batch_arrays = {"source_ids": jnp.asarray(rng.integers(0, vocab - 100, (batch, 64)), jnp.int32),
                    "source_mask": jnp.ones((batch, 64), jnp.int32),
                    "target_ids": jnp.asarray(rng.integers(0, vocab - 100, (batch, 64)), jnp.int32),
                    "target_mask": jnp.ones((batch, 64), jnp.int32)}
    times = []
    for _ in range(steps + 2):  # the first call compiles
        start = time.perf_counter()
        state, metrics = step(state, lm_params, batch_arrays)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - start)
    return times[2:]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=("gpt2", "t5"), default="gpt2")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as directory:
        if args.model == "gpt2":  # GPT-2 small shapes (124M), the paper's table-to-text prefix
            GPT2LMHeadModel(GPT2Config()).save_pretrained(directory)
            placements = ("decoder",)
        else:  # T5-small shapes (60M); PEFT prefixes the decoder self-attention only, so do we here
            T5ForConditionalGeneration(T5Config(decoder_start_token_id=0)).save_pretrained(directory)
            placements = ("decoder",)
        peft = peft_steps(args.model, directory, args.batch, args.steps, threads)
        ours = ours_steps(directory, args.batch, args.steps, placements)
    p, o = statistics.median(peft), statistics.median(ours)
    print(f"model={args.model} batch={args.batch}x(64+64) threads={threads} steps={args.steps}")
    print(f"PEFT (torch) median step {p * 1000:.0f} ms | prefix_jax median step {o * 1000:.0f} ms | "
          f"speed-up {p / o:.2f}x")


if __name__ == "__main__":
    main()
