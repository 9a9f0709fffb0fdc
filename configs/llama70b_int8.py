"""Prefix-tuning a 70B Llama-family decoder (Llama 3.1 70B) on E2E with int8 weights, sharded FSDP-style over a
16-chip TPU pod slice (v5e-16: 16 GB a chip).

Launch the same command on every host (`mesh.coordinator_address="auto"` lets JAX find the pod):
`python train.py --config configs/llama70b_int8.py --config.model.name_or_path=DIR` (the model is gated on the
Hub: accept its licence, `hf download meta-llama/Llama-3.1-70B --local-dir DIR`). Any device count works as long
as `train.batch_size` is a multiple of it.

Memory arithmetic (meta-llama/Llama-3.1-70B: hidden 8192, 80 layers, 64 query / 8 K/V heads of 128, MLP 28672
gated, vocab 128256, untied head; "B" = 10^9 params, "GB" = 10^9 bytes):
  LM params: embedding + lm_head 2 x 128256 x 8192                                    =  2.10 B
             80 layers x (q, o 2 x 8192^2 + k, v 2 x 8192 x 1024 + MLP 3 x 8192 x 28672
                          = 134.2 M + 16.8 M + 704.6 M = 855.6 M)                     = 68.45 B
             total 70.55 B -> 141.1 GB in bfloat16 (282 GB in float32).
  int8 (`model.quantize="int8"`): every Dense kernel (the 68.45 B) as int8, one bfloat16 scale per output
    channel (80 x 83968 = 6.7 M scales = 13 MB); the embedding and the LM head too (`model.quantize_embeddings`,
    the default), one scale per vocabulary row (2 x 128256 scales = 0.5 MB); the norms stay bfloat16:
    68.45 + 2.10 + 0.01 = 70.6 GB, 0.50x of bfloat16 (0.25x of float32). (With quantize_embeddings=False the
    two vocabulary matrices stay bfloat16: 72.7 GB.)
  Sharded over fsdp = 16: 70.6 / 16 = 4.4 GB per chip, plus the one layer being all-gathered inside the scan
    (855.6 M x 1 B = 0.86 GB; ~1.7 GB with the next one prefetched; in bfloat16 it would be twice that). On TPU
    XLA fuses the dequantization into the matmul, so no bfloat16 copy of a layer is made.
  Prefix (the paper's E2E length 5, MLP 8192 -> 512 -> 2 x 80 x 8 x 128 = 163840): 5 x 8192 + 8192 x 512 +
    512 x 163840 (+ biases) = 88.3 M float32 params, replicated with their gradient and two Adam moments:
    88.3 M x 16 B = 1.4 GB per chip.
  Activations, 2 examples per chip x (128 source + 128 target) tokens, remat "full": layer inputs
    80 x 2 x 256 x 8192 x 2 B = 0.67 GB, plus one layer recomputed at a time (MLP 3 x 2 x 256 x 28672 x 2 B =
    88 MB; scores 2 x 64 x 256 x 261 x 4 B = 34 MB) and the float32 target logits 2 x 128 x 128256 x 4 B =
    131 MB (a few copies for the softmax and its gradient; `train.loss_chunk_tokens` bounds them): ~1.2 GB.
  Per chip: 4.4 + 1.7 + 1.4 + 1.2 = ~8.7 GB: fits a 16 GB v5e chip with room for XLA's buffers. Unquantized
    (bfloat16) the same run needs 8.8 + 3.4 + 1.4 + 1.2 = ~14.8 GB: at the edge of 16 GB.
  Loading: each host reads the slices its chips hold and quantizes them in host memory, so the chips only ever
    receive int8 values and scales (no bfloat16 copy of the LM on a device). A Dense kernel's per-output-channel
    scale needs its whole contraction: under fsdp a host reads the full input dimension of the output channels it
    holds. The two vocabulary matrices are split along their 128256 rows (= 2^8 x 501, so over fsdp = 16 too)
    with each row's scale, so a host reads only the rows its chips hold (1/16 of the 2 x 2.1 GB of bfloat16 per
    chip); the head reads them in 501 blocks of 256 rows, 16 from each chip's part, read where they lie.
"""

from configs import llama_e2e


def get_config():
    c = llama_e2e.get_config()
    c.model.name_or_path = "meta-llama/Llama-3.1-70B"
    c.model.param_dtype = "bfloat16"  # read as bfloat16 straight into the shards, then quantized there
    c.model.quantize = "int8"  # a scale per output channel (per row: vocabulary); int4 (groups of 64): 37.5 GB, 2.3 GB a chip
    c.model.remat = "full"
    c.mesh.shape = (1, -1, 1)  # all devices on fsdp: the batch and the LM's hidden axis split 16 ways
    c.mesh.lm_partitioning = "fsdp"
    c.mesh.coordinator_address = "auto"
    c.train.batch_size = 32  # global; 2 per chip on 16 chips
    c.train.loss_chunk_tokens = 64  # the 128256-wide logits of 64 target tokens at a time
    return c
