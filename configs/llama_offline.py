"""Offline E2E demo on a Llama-family decoder: a *random, tiny* Llama (2 layers, d 64, 4 query / 2 K/V heads)
built in artifacts/tiny-llama with the real GPT-2 tokenizer (data/gpt2-tokenizer), trained on the bundled
E2E dev set and evaluated on the bundled test set, with the paper's E2E prefix (length 5). It shows the
pipeline end to end; the numbers say nothing about Llama. The real runs: configs/llama_e2e.py, configs/qwen_e2e.py.
"""

from configs import default, llama_e2e


def get_config():
    c = default.offline_demo(llama_e2e.get_config(), "llama")
    c.train.workdir = "runs/llama_offline"
    return c
