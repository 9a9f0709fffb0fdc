"""Train a prefix on a frozen pretrained LM.

  python train.py --config configs/t5_xsum.py [--config.train.steps=1000 ...]

Every field of the config can be overridden with --config.<group>.<field>=value; the resolved
config is printed at start and saved to <workdir>/config.json.
"""

import logging
import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    from prefix_jax import trainer

    config = _CONFIG.value
    if not config.train.workdir:
        config.train.workdir = str(Path("runs") / Path(config_flags.get_config_filename(flags.FLAGS["config"])).stem)
    try:
        summary = trainer.run(config)
    except ValueError as e:  # our errors name the field and the fix; no traceback needed
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    logging.info("done: %s", summary)


if __name__ == "__main__":
    app.run(main)
