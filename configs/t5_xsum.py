"""Prefix-tuning T5 on XSum with the paper's summarization settings (Li & Liang 2021, Sec. 5).

Paper (BART-large, XSum): lr 5e-5, 30 epochs, batch 14, prefix length 100, MLP mid dim 800,
512 source tokens. We use google-t5/t5-base (220M): the paper's method is architecture-agnostic, and
t5-base is the smallest T5 on which prefix-tuning is competitive (it improves with scale) while
training with batch 14 x 512 tokens on one 16 GB accelerator. T5 v1.0 checkpoints were pretrained with
the "summarize: " task prefix, so sources keep it. For t5-small, pass
--config.model.name_or_path=google-t5/t5-small.
"""

from configs import default


def get_config():
    c = default.get_config()
    c.model.name_or_path = "google-t5/t5-base"
    c.prefix.length = 100
    c.prefix.placements = ("encoder", "decoder", "cross")
    c.prefix.mlp_hidden = 800
    c.data.name = "EdinburghNLP/xsum"
    c.data.source_field = "document"
    c.data.target_field = "summary"
    c.data.source_prefix = "summarize: "
    c.data.max_source_length = 512
    c.data.max_target_length = 60
    c.eval.metrics = ("rouge",)
    c.eval.max_generate = 2000  # a fixed subset during training; decode the full test set after
    c.generate.num_beams = 6  # the paper's XSum decoding
    c.generate.length_penalty = 0.8
    c.generate.max_new_tokens = 60
    c.train.batch_size = 14
    c.train.epochs = 30.0
    c.train.eval_every = 5000
    c.train.save_every = 5000
    c.optim.learning_rate = 5e-5
    return c
