"""GPT-2 medium on DART with the paper's settings: lr 5e-5, 10 epochs, batch 5, prefix 10, beam 5.

Triples are linearized as `subject : relation : object | ...`. The DART v1.1.1 dev set is bundled
(data/dart) for offline evaluation: --config.data.data_files.validation=data/dart/dart-v1.1.1-full-dev.json.
"""

from configs import gpt2_e2e


def get_config():
    c = gpt2_e2e.get_config()
    c.data.name = "GEM/dart"
    c.data.format = "dart"
    c.prefix.length = 10
    c.train.batch_size = 5
    c.train.epochs = 10.0
    c.optim.learning_rate = 5e-5
    return c
