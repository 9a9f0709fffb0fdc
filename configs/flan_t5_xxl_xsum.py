"""Prefix-tuning Flan-T5-XXL (11B) on XSum, the frozen LM sharded FSDP-style over a TPU pod slice.

Launch the same command on every host (no per-host flags; `mesh.coordinator_address="auto"` lets JAX
find the pod): `python train.py --config configs/flan_t5_xxl_xsum.py`. A v4-32 / v5e-16 slice has 16
devices; any count works as long as `train.batch_size` is a multiple of it.

Memory arithmetic (google/flan-t5-xxl: d_model 4096, 64 heads x 64, d_ff 10240 gated, 24 + 24 layers,
vocab 32128, untied head):
  LM params: 2 x 32128 x 4096 (embedding, lm_head)                        =  0.26 B
             24 encoder layers x (4 x 4096^2 + 3 x 4096 x 10240)           =  4.63 B
             24 decoder layers x (8 x 4096^2 + 3 x 4096 x 10240)           =  6.24 B
             total 11.1 B params -> 22.3 GB in bfloat16 (44.6 GB in float32: fits no 16/32 GB device).
  Sharded over fsdp = 16: 22.3 / 16 = 1.4 GB per device, plus the one layer being all-gathered inside the
    scan (a decoder layer: 260 M x 2 B = 0.52 GB; ~1 GB with the next one prefetched).
  Prefix (length 100, MLP 4096 -> 512 -> 2 x 24 x 64 x 64 = 196608, three placements): 3 x 103 M = 310 M
    float32 params, replicated with their gradient and two Adam moments: 310 M x 16 B = 5.0 GB per device.
    (mlp_hidden 800 as in the paper would be 3 x 158 M x 16 B = 7.6 GB; tie decoder+cross to save a third.)
  Activations, 2 examples per device x 512 source tokens, remat "full": layer inputs 48 x 2 x 512 x 4096 x 2 B
    = 0.4 GB, plus one layer recomputed at a time (encoder scores 2 x 64 x 512 x 612 x 4 B = 0.16 GB) and
    the float32 logits 2 x 60 x 32128 x 4 B = 15 MB: under 1 GB.
  Per device: ~1.4 + 1 + 5 + 1 = ~8.5 GB: fits a 16 GB v5e chip; on 32 GB v4 chips use remat "minimal"
  (keeps q/k/v + MLP inputs: ~2 GB more, less recompute).
"""

from configs import t5_xsum


def get_config():
    c = t5_xsum.get_config()
    c.model.name_or_path = "google/flan-t5-xxl"
    c.model.param_dtype = "bfloat16"  # loaded as bfloat16 straight into the shards: no float32 copy anywhere
    c.model.remat = "full"
    c.prefix.mlp_hidden = 512
    c.data.source_prefix = "summarize: "
    c.mesh.shape = (1, -1, 1)  # all devices on fsdp: the batch and the LM's d_model axis split 16 ways
    c.mesh.lm_partitioning = "fsdp"
    c.mesh.coordinator_address = "auto"
    c.train.batch_size = 32  # global; 2 per device on 16 devices
    c.train.grad_accum_steps = 1  # raise (e.g. 2) to halve activation memory at the same result
    return c
