"""Decode inputs with a frozen LM and one or many trained prefixes (rows of different tasks in one batch).

  python predict.py --config configs/predict.py --config.model.name_or_path=DIR \
      --config.prefixes=task_a=DIR_A,task_b=DIR_B --config.input=inputs.jsonl

Same as `python -m prefix_jax.predict ...`. See configs/predict.py for every field.
"""

from prefix_jax.predict import cli

if __name__ == "__main__":
    cli()
