"""Decoding with one frozen LM and one or many trained prefixes:

  python predict.py --config configs/predict.py --config.model.name_or_path=DIR \
      --config.prefixes=e2e=runs/gpt2_e2e/export,dart=runs/gpt2_dart/export \
      --config.input=inputs.jsonl --config.output=predictions.jsonl

Each input row's `task` column picks its prefix (a single prefix needs no task column); rows of
different tasks share batches. Every field, its default and its meaning are declared once in
prefix_jax/run_options.py (`PredictOptions`; decoding options: `generate.GenerationConfig`).
"""

import ml_collections

from prefix_jax import run_options


def get_config() -> ml_collections.ConfigDict:
    return run_options.default_predict_config()
