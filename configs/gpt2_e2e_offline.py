"""Offline E2E demo on GPT-2: a *random, tiny* GPT-2 (2 layers, d 64) built in artifacts/tiny-gpt2 with the
real GPT-2 tokenizer (data/gpt2-tokenizer), trained on the bundled E2E dev set and evaluated on the
bundled test set (BLEU against all references), with the paper's E2E prefix (length 5). It shows the
paper's E2E pipeline end to end here; the numbers say nothing about GPT-2. The real run: configs/gpt2_e2e.py.
"""

from configs import default, gpt2_e2e


def get_config():
    c = default.offline_demo(gpt2_e2e.get_config(), "gpt2")
    c.train.workdir = "runs/gpt2_e2e_offline"
    return c
