"""Llama 3.2 1B on E2E with the paper's table-to-text settings (Li & Liang 2021, Table 1 / Appendix A).

lr 8e-5, 5 epochs, batch 10, prefix length 5, MLP mid dim 512, beam 5 (as configs/gpt2_e2e.py). The
prefix has Llama's grouped-query shape: per layer 8 K/V heads x 64 dims, taken as already-rotated keys;
tokens follow it at positions P.. as with PEFT. The model is gated on the Hub: accept its licence, then
`hf download meta-llama/Llama-3.2-1B --local-dir DIR` and pass --config.model.name_or_path=DIR.
Weights load in bfloat16 (`model.param_dtype`); the prefix trains in float32.
"""

from configs import default


def get_config():
    c = default.get_config()
    c.model.name_or_path = "meta-llama/Llama-3.2-1B"
    c.model.param_dtype = "bfloat16"
    c.prefix.length = 5
    c.prefix.placements = ("decoder",)
    c.prefix.mlp_hidden = 512
    c.data.name = "GEM/e2e_nlg"
    c.data.format = "e2e"
    c.data.target_prefix = " "  # the target continues "x <sep>": words start with a space
    c.data.max_source_length = 128
    c.data.max_target_length = 128
    c.data.eval_split = "validation"
    c.eval.metrics = ("bleu",)
    c.generate.num_beams = 5
    c.generate.max_new_tokens = 100
    c.train.batch_size = 10
    c.train.epochs = 5.0
    c.train.eval_every = 5000
    c.train.save_every = 5000
    c.optim.learning_rate = 8e-5
    return c
