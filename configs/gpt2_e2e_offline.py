"""Offline E2E demo on GPT-2: a *random, tiny* GPT-2 (2 layers, d 64) built in artifacts/tiny-gpt2 with the
real GPT-2 tokenizer (data/gpt2-tokenizer), trained on the bundled E2E dev set and evaluated on the
bundled test set (BLEU against all references). It shows the paper's E2E pipeline end to end here;
the numbers say nothing about GPT-2. For the real run see configs/gpt2_e2e.py.
"""

from configs import gpt2_e2e


def get_config():
    c = gpt2_e2e.get_config()
    c.model.name_or_path = "artifacts/tiny-gpt2"
    c.model.create_tiny = "gpt2"
    c.data.name = ""
    c.data.data_files = {"train": "data/e2e/devset.csv", "validation": "data/e2e/testset_w_refs.csv"}
    c.data.max_source_length = 64
    c.data.max_target_length = 64
    c.data.max_eval_examples = 256
    c.prefix.mlp_hidden = 64
    c.eval.max_generate = 32
    c.generate.num_beams = 1
    c.generate.max_new_tokens = 32
    c.train.workdir = "runs/gpt2_e2e_offline"
    c.train.batch_size = 16
    c.train.steps = 200
    c.train.epochs = 1.0
    c.train.log_every = 25
    c.train.eval_every = 100
    c.train.save_every = 100
    c.optim.learning_rate = 5e-3
    c.optim.warmup_steps = 20
    return c
