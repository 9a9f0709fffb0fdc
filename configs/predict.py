"""Decoding with one frozen LM and one or many trained prefixes:

  python predict.py --config configs/predict.py --config.model.name_or_path=DIR \
      --config.prefixes=e2e=runs/gpt2_e2e/export,dart=runs/gpt2_dart/export \
      --config.input=inputs.jsonl --config.output=predictions.jsonl

Each input row's `task` column picks its prefix (a single prefix needs no task column); rows of
different tasks share batches.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    c.model.name_or_path = ""  # the frozen LM the prefixes were trained on (HF id or local directory)
    c.model.tokenizer = ""  # defaults to name_or_path
    c.model.param_dtype = "float32"
    c.model.positions_after_prefix = ml_collections.FieldReference(None, field_type=bool)  # None: from the export

    # Exported prefixes (`<workdir>/export`): "DIR" (task "default") or "task=DIR,task=DIR,...".
    c.prefixes = ""
    c.checkpoint = ""  # or a train workdir: its latest checkpoint (task "default"); not with prefixes

    c.input = "-"  # .jsonl | .csv | .txt (one source per line); "-": jsonl (or plain lines) on stdin
    c.output = ""  # jsonl: id, task, source, prediction (+ references); "": <input>.predictions.jsonl or stdout
    c.source_field = "source"
    c.task_field = "task"
    c.reference_field = "target"  # a string, or a list of references (jsonl); scored when present
    c.id_field = "id"  # kept when present, else the row number
    c.source_prefix = ""  # prepended to every source (e.g. "summarize: " for T5)
    c.max_source_length = 512
    c.batch_size = 16
    c.metrics = ("bleu",)  # metrics.METRICS (e2e, webnlg, dart, xsum: the paper's sets); per task and over all
    c.progress = True  # tqdm progress bar on stderr

    c.generate = default.generation_options()
    return c
