"""Qwen2.5 0.5B on E2E with the paper's table-to-text settings (as configs/llama_e2e.py).

Qwen2 has biased q/k/v projections, 14 query / 2 K/V heads of 64 dims and a tied head; the prefix is
`[24 layers, 2 K/V heads, 5, 64]` per key and value. The separator between table and text is the
config's bos_token_id, which for Qwen2.5 is `<|endoftext|>`, also its EOS (ending the target).
"""

from configs import llama_e2e


def get_config():
    c = llama_e2e.get_config()
    c.model.name_or_path = "Qwen/Qwen2.5-0.5B"
    return c
