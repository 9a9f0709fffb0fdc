"""BART-large on XSum with the paper's summarization settings (Li & Liang 2021, Sec. 5 / Table 2).

lr 5e-5, 30 epochs, batch 14, prefix length 100, MLP mid dim 800, 512 source tokens, beam 6 with
length penalty 0.8. Three independent prefixes (encoder self-attention, decoder self-attention,
cross-attention) and decoder positions starting at 0 after the prefix, as in the paper's BART code
(--config.model.positions_after_prefix=True gives PEFT's convention). Paper: ROUGE-1/2/L
43.80/20.93/36.05 (fine-tuning 45.14/22.27/37.25).
"""

from configs import t5_xsum


def get_config():
    c = t5_xsum.get_config()
    c.model.name_or_path = "facebook/bart-large"
    c.data.source_prefix = ""  # BART was not pretrained with task prefixes
    c.data.max_target_length = 60
    return c
