"""One attention layer with a prefix, forward + backward, three ways, on the device JAX sees:

- `ours`: `attention.attend` — the prefix read as its own block of keys, one float32 softmax over both blocks;
- `xla`: `jax.nn.dot_product_attention(implementation="xla")` over the prefix broadcast and concatenated in
  front of the keys (what a fused-kernel path would have to feed it), with the same boolean mask and bias;
- `cudnn`: the same call with `implementation="cudnn"` (the fused flash-attention kernel; GPU only).

It answers one question of issue 9 before any wiring: on this device, at the accelerator benchmark's shapes,
does a fused kernel beat our two-block attention by enough to be worth a second attention path? Each
variant's output is compared with `ours` (max abs difference) so a fast wrong answer is visible.

  python benchmarks/attention_impl_ab.py            # accelerator shapes (bf16)
  python benchmarks/attention_impl_ab.py --smoke    # tiny shapes, CPU (cudnn reported unsupported)

Gradients flow to the queries, the token keys/values and the prefix keys/values, as in a prefix-tuning step
(activations need gradients below every prefixed layer; the frozen weights are not involved here).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@dataclasses.dataclass(frozen=True)
class Case:
    """One attention call: the self-attention of a benchmarked row's layer."""

    name: str
    batch: int
    tokens: int
    heads: int
    kv_heads: int
    head_dim: int
    prefix: int
    causal: bool
    bias: bool  # T5's relative position bias, [1, H, Q, P + C]


FULL = (
    Case("gpt2-medium decoder", 16, 128, 16, 16, 64, 10, True, False),
    Case("t5-base encoder", 16, 512, 12, 12, 64, 100, False, True),
    Case("llama-1b decoder", 8, 384, 32, 8, 64, 10, True, False),
    Case("llama-1b decoder, 4k context", 2, 4096, 32, 8, 64, 10, True, False),
)
SMOKE = (
    Case("gpt2 tiny", 2, 16, 4, 4, 16, 4, True, False),
    Case("t5 tiny", 2, 16, 4, 4, 16, 4, False, True),
    Case("llama tiny", 2, 16, 4, 2, 16, 4, True, False),
)


def inputs(case: Case, dtype) -> dict:
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.PRNGKey(0), 6)
    b, c, h, n, k, p = case.batch, case.tokens, case.heads, case.kv_heads, case.head_dim, case.prefix
    normal = lambda key, shape: jax.random.normal(key, shape, jnp.float32).astype(dtype)
    visible = jnp.ones((c, p + c), bool)
    if case.causal:
        visible = visible.at[:, p:].set(jnp.tril(jnp.ones((c, c), bool)))
    bias = normal(keys[5], (1, h, c, p + c)) if case.bias else None
    return {"q": normal(keys[0], (b, c, h, k)), "k": normal(keys[1], (b, c, n, k)), "v": normal(keys[2], (b, c, n, k)),
            "pk": normal(keys[3], (n, p, k)), "pv": normal(keys[4], (n, p, k)), "mask": visible[None, None],
            "bias": bias}


def variant(name: str, case: Case):
    """`f(q, k, v, pk, pv, mask, bias) -> [B, C, H, K]` for one implementation."""
    import jax

    from prefix_jax.models import attention, fused_attention, prefix_contract

    scale = case.head_dim**-0.5

    if name == "ours":
        def f(q, k, v, pk, pv, mask, bias):
            return attention.attend(q, k, v, mask, bias, scale, prefix=prefix_contract.KV(pk, pv))
        return f

    def f(q, k, v, pk, pv, mask, bias):
        keys, values, mask = fused_attention.with_prefix(k, v, mask, pk, pv, None)
        return jax.nn.dot_product_attention(q, keys, values, bias=bias, mask=mask, scale=scale, implementation=name)
    return f


def time_variant(name: str, case: Case, data: dict, reps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    f = variant(name, case)
    args = [data[key] for key in ("q", "k", "v", "pk", "pv", "mask", "bias")]
    cotangent = jax.random.normal(jax.random.PRNGKey(9), data["q"].shape, jnp.float32).astype(data["q"].dtype)

    def loss(q, k, v, pk, pv, mask, bias):
        return jnp.sum((f(q, k, v, pk, pv, mask, bias) * cotangent).astype(jnp.float32))

    forward = jax.jit(f)
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))
    try:
        out = forward(*args)
        jax.block_until_ready(step(*args))
    except Exception as error:  # an implementation this backend or shape does not support
        return {"unsupported": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"}
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(step(*args))
        times.append(time.perf_counter() - start)
    return {"fwd_bwd_ms": statistics.median(times) * 1e3, "out": np.asarray(out, np.float32)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--json", default=None)
    parser.add_argument("--only", default=None, help="run only cases whose name contains this text")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    cases = [case for case in (SMOKE if args.smoke else FULL) if not args.only or args.only in case.name]
    dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    results = []
    for case in cases:
        data = inputs(case, dtype)
        entry = {"case": dataclasses.asdict(case)}
        for name in ("ours", "xla", "cudnn"):
            entry[name] = time_variant(name, case, data, args.reps)
        reference = entry["ours"].get("out")
        for name in ("ours", "xla", "cudnn"):
            out = entry[name].pop("out", None)
            if out is not None and reference is not None:
                entry[name]["max_abs_diff_vs_ours"] = float(np.max(np.abs(out - reference)))
        print(json.dumps(entry), flush=True)
        results.append(entry)

    columns = ["layer", "batch, tokens, heads/kv, prefix", "ours ms", "xla ms", "cudnn ms", "ours / cudnn",
               "max |xla - ours|", "max |cudnn - ours|"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    cell = lambda r: f"{r['fwd_bwd_ms']:.3f}" if "fwd_bwd_ms" in r else f"unsupported ({r['unsupported'][:60]})"
    for entry in results:
        case, ours, cudnn = entry["case"], entry["ours"], entry["cudnn"]
        ratio = f"{ours['fwd_bwd_ms'] / cudnn['fwd_bwd_ms']:.2f}" if "fwd_bwd_ms" in cudnn else "–"
        diff = lambda r: f"{r['max_abs_diff_vs_ours']:.2g}" if "max_abs_diff_vs_ours" in r else "–"
        lines.append("| " + " | ".join([case["name"], f"{case['batch']}, {case['tokens']}, {case['heads']}/"
                                         f"{case['kv_heads']}, {case['prefix']}", cell(ours), cell(entry["xla"]),
                                         cell(cudnn), ratio, diff(entry["xla"]), diff(cudnn)]) + " |")
    device = jax.devices()[0].device_kind
    table = f"device: {device}, dtype {jnp.dtype(dtype).name}, forward + backward of one layer's attention\n" + \
        "\n".join(lines)
    print(table)
    out = Path(args.json) if args.json else ROOT / "benchmarks" / "results" / (
        "attention_impl_ab.smoke.json" if args.smoke else "attention_impl_ab.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device, "jax": jax.__version__, "args": vars(args), "results": results,
                               "table": table}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
