"""GPT-2 medium on E2E with the paper's table-to-text settings (Li & Liang 2021, Table 1 / Appendix A).

lr 8e-5, 5 epochs, batch 10, prefix length 5, MLP mid dim 512, beam 5. Tables are linearized as
`field : value | field : value`; the target follows the separator token (GPT-2's <|endoftext|>).
The paper reports BLEU 69.7 (arXiv v1; 70.3 in the ACL version) with the official E2E scripts; we
report sacreBLEU against all references. Offline: `hf download GEM/e2e_nlg --repo-type dataset --revision
refs/convert/parquet --local-dir DIR` and set data.data_files.train=DIR/e2e_nlg/train/0000.parquet (and
.validation), or use configs/gpt2_e2e_offline.py.
"""

from configs import default


def get_config():
    c = default.get_config()
    c.model.name_or_path = "openai-community/gpt2-medium"
    c.prefix.length = 5
    c.prefix.placements = ("decoder",)
    c.prefix.mlp_hidden = 512
    c.data.name = "GEM/e2e_nlg"
    c.data.format = "e2e"
    c.data.target_prefix = " "  # GPT-2 BPE: the target is a continuation ("x <sep> y"), words start with a space
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
