"""Named tolerances, one per kind of comparison; every parity test uses these (README "Tests" quotes them)."""

# float32, absolute: our logits, hidden states, losses and prefix keys/values vs transformers / PEFT on the same
# checkpoint (and ours vs ours computed another way). Measured: at most 8.3e-6 (Llama/Mistral vs PEFT, logits of
# magnitude ~5); T5, BART and GPT-2 at most 3.8e-6.
F32_ATOL = 1e-5
# float32, relative: the same computation arranged differently (remat policies, gradient accumulation, device
# meshes, processes): the summation order changes, nothing else.
F32_REORDERED_RTOL = 2e-5
# bfloat16 compute with float32 weights: logits within this fraction of the largest float32 logit.
# Measured on the 2-layer tiny models: 1.1% (T5), 0.6% (BART), 1.1% (GPT-2), 1.3% (Llama).
BF16_LOGITS_RTOL = 0.03
# float32, relative to the largest logit: a real pretrained model, many layers deep (30 for SmolLM2-135M), where
# rounding differences accumulate over depth. Measured: 1.4e-6 (SmolLM2-135M GGUF vs transformers, logits up to 34).
F32_DEEP_RTOL = 1e-5
# Weight-only quantized frozen LM (prefix_jax.quantize) vs the same LM in float32, on the 2-layer width-64 tiny
# models of tests/test_quantize.py (random weights, Zipf-like token ids), over every target position:
# max |log p_q - log p_f32| and mean KL(p_f32 || p_q). Measured (llama, gpt2, t5), Dense kernels only: int8 max
# 0.066, 0.014, 0.116, KL 1.2e-4, 3.5e-6, 1.7e-4; int4 (groups of 32) max 1.19, 0.12, 1.14, KL 3.7e-2, 5.3e-4,
# 3.4e-2. With the vocabulary matrices quantized too (model.quantize_embeddings, the default): int8 max 0.082,
# 0.019, 0.134, KL 1.9e-4, 5.3e-6, 3.2e-4; int4 max 1.65, 0.16, 1.27, KL 6.5e-2, 8.1e-4, 5.5e-2. (bart, gemma 3,
# phi3), the default: int8 max 0.010, 0.092, 0.095, KL 2.5e-6, 1.3e-4, 1.9e-4; int4 max 0.14, 1.16, 1.34, KL 7.4e-4,
# 3.5e-2, 5.2e-2 (Dense kernels only: int8 max 0.006, 0.071, 0.064, KL 1.6e-6, 8.1e-5, 1.2e-4; int4 max 0.12, 0.86,
# 0.95, KL 6.0e-4, 1.7e-2, 2.7e-2). The bounds are about 1.5x the largest. Random weights have no outliers-free
# structure to exploit, so these are loose; SmolLM2's numbers are in benchmarks/README.md.
INT8_MAX_DLOGP = 0.2
INT8_KL = 5e-4
INT4_MAX_DLOGP = 2.5
INT4_KL = 0.1
