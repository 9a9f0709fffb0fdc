"""Offline demo: the whole pipeline on this machine in a few minutes, no network.

A *random, tiny* T5 (2+2 layers, d_model 64) is built in artifacts/tiny-t5 on first use, with the real
GPT-2 byte-level BPE tokenizer bundled in data/; it learns E2E restaurant descriptions (data/e2e, the
official dev set as training data and the test set for evaluation) from linearized meaning
representations. The numbers mean nothing about T5: this config exists to show and test that
loading, prefix training, evaluation, checkpointing, resuming and export all work.
"""

from configs import default


def get_config():
    c = default.offline_demo(default.get_config(), "t5")
    c.prefix.length = 8
    c.train.workdir = "runs/t5_offline"
    return c
