"""SmolLM2-135M-Instruct's GGUF (Q4_1 / Q8_0 blocks) loaded with `model.quantize=gguf` (the file's own blocks kept,
dequantized inside the matmuls) vs the same file dequantized to float32: bytes of the frozen LM, compiled forward
memory, max |delta log p| / mean KL over the target tokens of E2E test rows, and whether every kept kernel
dequantizes to the float loader's weights bitwise.

    python benchmarks/gguf_blocks_smollm2.py [--rows 16]
"""

from __future__ import annotations

import argparse
import json
import logging

import jax
import numpy as np
from quantized_smollm2 import SMOLLM2, e2e_batch  # the same model and E2E rows as the int8/int4 benchmark

from prefix_jax import data
from prefix_jax import quantize as qz
from prefix_jax.models import load_pretrained
from prefix_jax.partitioning import path_name


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=16)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    float_lm = load_pretrained(SMOLLM2)
    kept = load_pretrained(SMOLLM2, quantize="gguf")
    batch = e2e_batch(args.rows, data.load_tokenizer(SMOLLM2))
    mask = np.asarray(batch["target_mask"], bool)
    leaves = dict(qz._with_aux_leaves(kept.params))
    flat_float = {path_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(float_lm.params)[0]}
    dequantize = jax.jit(qz.dequantize_blocks)
    bitwise = all(np.array_equal(np.asarray(dequantize(leaf.array)), flat_float[name])
                  for name, leaf in leaves.items() if isinstance(leaf.array, qz.GGUFBlocks))
    kinds = {}
    for leaf in leaves.values():
        a = leaf.array
        key = f"{type(a).__name__}:{a.qvalue.dtype}" + (":min" if getattr(a, "min", None) is not None else "")
        kinds[key] = kinds.get(key, 0) + 1
    rows = {}
    for name, lm in (("float32", float_lm), ("gguf", kept)):
        forward = jax.jit(lambda p, b, m=lm.model: jax.nn.log_softmax(m.apply({"params": p}, b), axis=-1))
        params = jax.device_put(lm.params)
        compiled = forward.lower(params, batch).compile()
        memory = compiled.memory_analysis()
        rows[name] = {"logp": np.asarray(compiled(params, batch)), "argument_bytes": memory.argument_size_in_bytes,
                      "temp_bytes": memory.temp_size_in_bytes}
    float_bytes = sum(x.nbytes for x in jax.tree.leaves(float_lm.params))
    kernel_float_bytes = sum(flat_float[name].nbytes for name in leaves)
    sizes = qz.quantized_bytes(kept.params)
    ref, got = rows["float32"]["logp"], rows["gguf"]["logp"]
    kl = np.sum(np.exp(ref) * (ref - got), axis=-1)[mask]
    print(json.dumps({
        "rows": args.rows, "target_tokens": int(mask.sum()), "kept_kernels": kinds,
        "dequantized_equal_float_loader_bitwise": bool(bitwise),
        "lm_bytes_float32": float_bytes, "lm_bytes_gguf": sizes["quantized"] + sizes["float"],
        "lm_ratio": round((sizes["quantized"] + sizes["float"]) / float_bytes, 4),
        "kernel_bytes_float32": kernel_float_bytes, "kernel_bytes_gguf": sizes["quantized"],
        "kernel_ratio": round(sizes["quantized"] / kernel_float_bytes, 4),
        "forward_argument_bytes": {k: v["argument_bytes"] for k, v in rows.items()},
        "forward_temp_bytes": {k: v["temp_bytes"] for k, v in rows.items()},
        "max_abs_dlogp": float(np.abs(got - ref)[mask].max()), "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
    }, indent=1))


if __name__ == "__main__":
    main()
