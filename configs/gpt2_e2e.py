"""GPT-2 medium on E2E with the paper's table-to-text settings (Li & Liang 2021, Table 1 / Appendix A).

lr 8e-5, 5 epochs, batch 10, prefix length 5, MLP mid dim 512, beam 5 (`default.e2e_table_to_text`). Tables
are linearized as `field : value | field : value`; the target follows the separator token (GPT-2's
<|endoftext|>). The paper reports BLEU 69.7 (arXiv v1; 70.3 in the ACL version) with the official E2E scripts;
we report sacreBLEU against all references. Offline: `hf download GEM/e2e_nlg --repo-type dataset --revision
refs/convert/parquet --local-dir DIR` and set data.data_files.train=DIR/e2e_nlg/train/0000.parquet (and
.validation), or use configs/gpt2_e2e_offline.py.
"""

from configs import default


def get_config():
    c = default.e2e_table_to_text(default.get_config())
    c.model.name_or_path = "openai-community/gpt2-medium"
    return c
