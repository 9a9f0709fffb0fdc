"""Offline demo: the whole pipeline on this machine in a couple of minutes, no network.

A *random, tiny* T5 (2+2 layers, d_model 64) is built in artifacts/tiny-t5 on first use, with the real
GPT-2 byte-level BPE tokenizer bundled in data/; it learns E2E restaurant descriptions (data/e2e, the
official dev set as training data and the test set for evaluation) from linearized meaning
representations. The numbers mean nothing about T5: this config exists to show and test that
loading, prefix training, evaluation, checkpointing, resuming and export all work.
"""

from configs import default


def get_config():
    c = default.get_config()
    c.model.name_or_path = "artifacts/tiny-t5"
    c.model.create_tiny = "t5"
    c.prefix.length = 8
    c.prefix.mlp_hidden = 64
    c.data.format = "e2e"
    c.data.data_files = {"train": "data/e2e/devset.csv", "validation": "data/e2e/testset_w_refs.csv"}
    c.data.max_source_length = 64
    c.data.max_target_length = 64
    c.data.max_eval_examples = 256
    c.eval.max_generate = 32
    c.generate.max_new_tokens = 32
    c.train.workdir = "runs/t5_offline"
    c.train.batch_size = 16
    c.train.steps = 300
    c.train.log_every = 25
    c.train.eval_every = 100
    c.train.save_every = 100
    c.optim.learning_rate = 5e-3
    c.optim.warmup_steps = 20
    return c
