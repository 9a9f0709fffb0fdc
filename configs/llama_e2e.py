"""Llama 3.2 1B on E2E with the paper's table-to-text settings (`default.e2e_table_to_text`, as
configs/gpt2_e2e.py).

The prefix has Llama's grouped-query shape: per layer 8 K/V heads x 64 dims, taken as already-rotated keys;
tokens follow it at positions P.. as with PEFT. The model is gated on the Hub: accept its licence, then
`hf download meta-llama/Llama-3.2-1B --local-dir DIR` and pass --config.model.name_or_path=DIR.
Weights load in bfloat16 (`model.param_dtype`); the prefix trains in float32.
"""

from configs import default


def get_config():
    c = default.e2e_table_to_text(default.get_config())
    c.model.name_or_path = "meta-llama/Llama-3.2-1B"
    c.model.param_dtype = "bfloat16"
    return c
