"""Defaults every config starts from, and the recipes configs compose.

Every field, its default, its check and its meaning are declared once, in prefix_jax/run_options.py (decoding
options: `generate.GenerationConfig`); `get_config` returns them as the ml_collections config that
`--config.group.field=...` overrides.
"""

from pathlib import Path

import ml_collections

from prefix_jax import run_options

DATA = Path(__file__).resolve().parent.parent / "data"  # bundled E2E / DART / GPT-2 tokenizer


def get_config() -> ml_collections.ConfigDict:
    return run_options.default_config()


def e2e_table_to_text(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`c` with the paper's E2E table-to-text settings for a decoder-only LM (Li & Liang 2021, Table 1 /
    Appendix A): lr 8e-5, 5 epochs, batch 10, prefix length 5, MLP mid dim 512, beam 5, on GEM/e2e_nlg."""
    c.prefix.length = 5
    c.prefix.placements = ("decoder",)
    c.prefix.mlp_hidden = 512
    c.data.name = "GEM/e2e_nlg"
    c.data.format = "e2e"
    c.data.target_prefix = " "  # the target continues "x <sep>" (BPE): words start with a space
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


def offline_demo(c: ml_collections.ConfigDict, architecture: str) -> ml_collections.ConfigDict:
    """`c` turned into an offline demo: a random tiny `architecture` LM built in artifacts/ on first use,
    trained on the bundled E2E dev set and evaluated on the bundled test set, in a few minutes on a CPU."""
    c.model.name_or_path = f"artifacts/tiny-{architecture}"
    c.model.create_tiny = architecture
    c.prefix.mlp_hidden = 64
    c.data.name = ""
    c.data.format = "e2e"
    c.data.data_files.train = str(DATA / "e2e/devset.csv")
    c.data.data_files.validation = str(DATA / "e2e/testset_w_refs.csv")
    c.data.max_source_length = 64
    c.data.max_target_length = 64
    c.data.max_eval_examples = 256
    c.eval.metrics = ("bleu",)
    c.eval.max_generate = 32
    c.generate.num_beams = 1
    c.generate.max_new_tokens = 32
    c.train.batch_size = 16
    c.train.epochs = 1.0
    c.train.steps = 200
    c.train.log_every = 25
    c.train.eval_every = 100
    c.train.save_every = 100
    c.optim.learning_rate = 5e-3
    c.optim.warmup_steps = 20
    return c
