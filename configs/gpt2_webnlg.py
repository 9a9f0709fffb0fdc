"""GPT-2 medium on WebNLG 2017 with the paper's settings: lr 5e-5, 5 epochs, batch 5, prefix 5, beam 5.

Triples are linearized as `subject : relation : object | ...` (GEM/web_nlg gives them as "s | r | o").
"""

from configs import gpt2_e2e


def get_config():
    c = gpt2_e2e.get_config()
    c.data.name = "GEM/web_nlg"
    c.data.config_name = "en"
    c.data.format = "webnlg"
    c.train.batch_size = 5
    c.train.epochs = 5.0
    c.optim.learning_rate = 5e-5
    return c
