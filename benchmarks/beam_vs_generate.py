"""Beam search with a decoder prefix: prefix_jax's `generate` vs transformers' `generate` given the prefix as
its cache (T5), side by side in one process.

  python benchmarks/beam_vs_generate.py                  # small: T5 d512 2+2 layers, batch 4, 64 src
  python benchmarks/beam_vs_generate.py --shapes issue   # T5-small 6+6, batch 8, 256 src, beam 5, 32 new

PEFT 0.21.2's `PeftModel.generate` on seq2seq silently drops the prefix, so the reference is plain
transformers fed the prefix the way its cache holds one: an `EncoderDecoderCache` whose self-attention part
holds the prefix K/V `[B * beams, H, P, K]` per layer (queries then start at position P, as ours), with P
placeholder decoder ids before the start token so that only the start token is new (and a decoder
attention mask of ones over them: without it generate masks the placeholders, which are pad ids, and with
them the prefix). EOS is made
unreachable (its embedding row zeroed: logit 0 of 32k random ones; the pad/start token's too) so both sides decode all
`--new-tokens` steps. The first rows' tokens are compared, as a check that both decode the same thing.
Writes benchmarks/results/beam_vs_generate.<shapes>.json (or --json).
"""

from __future__ import annotations

import argparse
import tempfile

import _common as c

SHAPES = {"small": c.Shape("t5", layers=2, batch=4, source=64, target=0, prefix=30),
          "issue": c.Shape("t5", layers=6, batch=8, source=256, target=0, prefix=30)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="small")
    parser.add_argument("--beams", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    threads = c.pin_threads(args.threads)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from transformers import T5ForConditionalGeneration
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    from prefix_jax.generate import GenerationConfig, make_generate_fn
    from prefix_jax.models import DECODER, KV, Prefix, load_pretrained

    shape = SHAPES[args.shapes]
    with tempfile.TemporaryDirectory() as directory:
        c.save_random_checkpoint(shape, directory)
        hf = T5ForConditionalGeneration.from_pretrained(directory).eval()
        eos = hf.config.eos_token_id
        with torch.no_grad():
            hf.shared.weight[eos] = 0.0
            hf.shared.weight[hf.config.pad_token_id] = 0.0  # else a random T5 repeats its start token forever
        hf.save_pretrained(directory)
        lm = load_pretrained(directory)
    geometry = lm.config.prefix_geometry()[DECODER]
    rng = np.random.default_rng(0)
    kv_shape = (geometry.num_layers, geometry.num_heads, shape.prefix, geometry.head_dim)
    k, v = (rng.normal(size=kv_shape).astype(np.float32) for _ in range(2))
    prefix = Prefix(kv={DECODER: KV(jnp.asarray(k), jnp.asarray(v))})
    src = rng.integers(2, hf.config.vocab_size - 100, (shape.batch, shape.source))
    mask = np.ones_like(src)

    fn = make_generate_fn(lm.model, GenerationConfig(args.new_tokens, args.beams))
    lm_params = jax.device_put(lm.params)
    ours_src, ours_mask = jnp.asarray(src, jnp.int32), jnp.asarray(mask, jnp.int32)
    rows = shape.batch * args.beams

    def hf_cache() -> EncoderDecoderCache:
        expand = lambda x: torch.from_numpy(x)[None].expand(rows, -1, -1, -1).clone()
        cache = EncoderDecoderCache(tuple((expand(k[i]), expand(v[i]), expand(k[i]), expand(v[i]))
                                          for i in range(k.shape[0])))
        cache.cross_attention_cache = DynamicCache()
        for layer in cache.is_updated:
            cache.is_updated[layer] = False
        return cache

    hf_src, hf_mask = torch.from_numpy(src), torch.from_numpy(mask)
    placeholders = torch.full((shape.batch, shape.prefix + 1), hf.config.decoder_start_token_id)
    outputs = {}

    def ours():
        outputs["ours"] = np.asarray(jax.block_until_ready(fn(lm_params, prefix, ours_src, ours_mask)))

    def transformers_generate():
        with torch.no_grad():
            out = hf.generate(input_ids=hf_src, attention_mask=hf_mask, decoder_input_ids=placeholders,
                              decoder_attention_mask=torch.ones_like(placeholders),
                              past_key_values=hf_cache(), num_beams=args.beams, max_new_tokens=args.new_tokens,
                              do_sample=False, early_stopping=False)
        outputs["hf"] = out[:, shape.prefix + 1:].numpy()

    import time

    start = time.perf_counter()
    ours()
    first_call = time.perf_counter() - start
    times = c.interleaved({"transformers": transformers_generate, "ours": ours}, 1, args.reps)
    same = int(sum(np.array_equal(a, b) for a, b in zip(outputs["ours"], outputs["hf"])))
    h, o = c.median(times["transformers"]), c.median(times["ours"])
    table = c.print_table(
        ["shape", "beams", "new tokens", "transformers ms", "ours ms", "ours speed-up", "ours first call (compile) s",
         "rows decoded identically"],
        [[shape.describe().replace(" + 0 tgt", ""), args.beams, args.new_tokens, f"{h * 1e3:.0f}", f"{o * 1e3:.0f}",
          f"{h / o:.2f}x", f"{first_call:.1f}", f"{same}/{shape.batch}"]])
    c.write_json(args.json, f"beam_vs_generate.{args.shapes}", {"machine": c.machine(threads), "args": vars(args),
                                                 "shape": shape.describe(), "transformers_s": h, "ours_s": o,
                                                 "speedup": h / o, "first_call_s": first_call,
                                                 "rows_identical": same, "times": times, "table": table})


if __name__ == "__main__":
    main()
