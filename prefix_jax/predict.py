"""Decode a file of inputs with one frozen LM and one or many trained prefixes.

  python -m prefix_jax.predict --config configs/predict.py --config.model.name_or_path=DIR \
      --config.prefixes=e2e=runs/e2e/export,dart=runs/dart/export --config.input=inputs.jsonl

The LM is loaded once; every prefix joins one bank (`prefix_bank`), so rows of different tasks share
batches. Rows are batched by source length (one compiled shape per width, rounded up to 8); outputs
are written as jsonl (`id`, `task`, `source`, `prediction`, and `references` when given) in input
order, and scored per task when references are present.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

DEFAULT_TASK = "default"


class PredictError(ValueError):
    """Bad predict input: a file, row, column, prefix or model that does not fit."""


# --- Inputs ---

def _parse_references(value: Any) -> list[str] | None:
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [str(value)]


def read_rows(path: str, source_field: str, task_field: str, reference_field: str, id_field: str,
              multi_task: bool, stdin: io.TextIOBase | None = None) -> list[dict]:
    """Rows `{id, task, source, references}` from jsonl / csv / txt (or stdin: jsonl, else one source a line)."""
    where = "stdin" if path == "-" else path
    if path == "-":
        text = (stdin or sys.stdin).read()
        lines = [line for line in text.splitlines() if line.strip()]
        kind = "jsonl" if lines and lines[0].lstrip().startswith("{") else "txt"
    else:
        if not Path(path).is_file():
            raise PredictError(f"input={path!r} is not a file.")
        kind = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".txt": "txt"}.get(Path(path).suffix)
        if kind is None:
            raise PredictError(f"input={path!r}: use a .jsonl, .csv or .txt file (or '-' for stdin).")
        text = Path(path).read_text()
        lines = [line for line in text.splitlines() if line.strip()]
    if kind == "txt":
        if multi_task:
            raise PredictError(f"{where}: plain text has no {task_field!r} column, but several prefixes are loaded; "
                               "use jsonl or csv with a task column.")
        return [{"id": i, "task": DEFAULT_TASK, "source": line, "references": None} for i, line in enumerate(lines)]
    if kind == "jsonl":
        records = []
        for i, line in enumerate(lines):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise PredictError(f"{where} row {i}: not valid JSON ({e.msg}).") from None
    else:
        records = list(csv.DictReader(io.StringIO(text)))
    rows = []
    for i, record in enumerate(records):
        if not isinstance(record, Mapping) or source_field not in record:
            raise PredictError(f"{where} row {i}: no {source_field!r} column; set source_field to the column holding "
                               "the input text.")
        if multi_task and task_field not in record:
            raise PredictError(f"{where} row {i}: no {task_field!r} column, which picks the prefix when several are "
                               "loaded; add it or set task_field.")
        rows.append({"id": record.get(id_field, i), "task": str(record.get(task_field, DEFAULT_TASK)),
                     "source": str(record[source_field]), "references": _parse_references(record.get(reference_field))})
    return rows


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Row indices grouped into batches of similar length (sorted, longest first; stable)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


# --- Prefixes ---

def parse_prefixes(spec: str) -> dict[str, str]:
    """`"DIR"` -> {default: DIR}; `"a=DIR,b=DIR2"` -> {a: DIR, b: DIR2}."""
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if len(items) == 1 and "=" not in items[0]:
        return {DEFAULT_TASK: items[0]}
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise PredictError(f"prefixes={spec!r}: with several prefixes write task=DIR for each ({item!r} has no "
                               "task).")
        task, directory = (s.strip() for s in item.split("=", 1))
        if task in out:
            raise PredictError(f"prefixes={spec!r} names task {task!r} twice.")
        out[task] = directory
    return out


def _same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def check_fits(meta: Mapping[str, Any], where: str, lm_name: str, lm_architecture: str) -> None:
    """A prefix only fits the LM it was trained on: same base model and architecture, or a one-line error."""
    base, arch = meta.get("base_model"), meta.get("architecture")
    if arch != lm_architecture or base is None or not _same_model(str(base), lm_name):
        raise PredictError(f"the prefix in {where} was trained on base model {base!r} ({arch}), but model.name_or_path "
                           f"is {lm_name!r} ({lm_architecture}); load the LM it was trained on.")


def load_prefix(directory: str) -> tuple[Any, dict]:
    """An export (`prefix.json` + `prefix.safetensors`) or a train workdir's latest checkpoint."""
    from prefix_jax import prefix as prefix_lib

    path = Path(directory)
    if (path / prefix_lib.EXPORT_META).is_file():
        return prefix_lib.load_export(path)
    raise PredictError(f"{directory!r} holds no exported prefix ({prefix_lib.EXPORT_META}); pass the run's "
                       "export/ directory, or the workdir as checkpoint=.")


def load_checkpoint_prefix(workdir: str) -> tuple[Any, dict]:
    """The materialized prefix of the latest checkpoint in `workdir/checkpoints`, and its metadata."""
    from prefix_jax import checkpoint
    from prefix_jax import prefix as prefix_lib

    directory = Path(workdir) / "checkpoints"
    if not directory.is_dir():
        raise PredictError(f"checkpoint={workdir!r} has no checkpoints/ directory.")
    mngr = checkpoint.manager(directory, None)
    meta = checkpoint.read_meta(mngr)
    if meta is None:
        raise PredictError(f"checkpoint={workdir!r}: no checkpoint saved yet.")
    state = checkpoint.read_state(mngr)
    spec = prefix_lib.PrefixSpec.from_json(meta["prefix_spec"])
    return prefix_lib.materialize(state["params"], spec), meta


def _positions_flag(metas: Mapping[str, Mapping[str, Any]], configured: bool | None) -> dict:
    """`positions_after_prefix` for loading the LM: the configured value, else the one the prefixes used."""
    if configured is not None:
        return {"positions_after_prefix": configured}
    used = {task: (m.get("model_config") or {}).get("positions_after_prefix") for task, m in metas.items()}
    values = {v for v in used.values() if v is not None}
    if len(values) > 1:
        raise PredictError(f"the prefixes were trained with different model.positions_after_prefix ({used}); "
                           "decode them in separate runs.")
    return {"positions_after_prefix": values.pop()} if values else {}


# --- The run ---

def _generation_config(fields: Mapping[str, Any]) -> Any:
    from prefix_jax.generate import GenerationConfig

    return GenerationConfig.from_config(dict(fields))


def run(config: Any, stdin: io.TextIOBase | None = None, stdout: io.TextIOBase | None = None) -> dict:
    """Loads the LM once and the prefixes, decodes every input row, writes jsonl, returns the scores."""
    import jax

    from prefix_jax import data, text_metrics, models, prefix_bank
    from prefix_jax.generate import make_generate_fn

    c = config
    if bool(c.prefixes) == bool(c.checkpoint):
        raise PredictError("set exactly one of prefixes= (exported prefix directories) or checkpoint= (a workdir).")
    if not c.model.name_or_path:
        raise PredictError("model.name_or_path is empty; give the LM the prefixes were trained on.")
    if c.batch_size < 1:
        raise PredictError(f"batch_size={c.batch_size} must be at least 1.")
    for name in c.metrics:
        if name not in text_metrics.METRICS:
            raise PredictError(f"metrics has {name!r}; choose from {text_metrics.METRICS}.")
    gen_cfg = _generation_config(c.generate)

    loaded = ({task: load_prefix(d) for task, d in parse_prefixes(c.prefixes).items()} if c.prefixes
              else {DEFAULT_TASK: load_checkpoint_prefix(c.checkpoint)})
    metas = {task: meta for task, (_, meta) in loaded.items()}
    for task, meta in metas.items():
        arch = meta.get("architecture")
        if arch is not None:
            models.architecture(arch, f"prefix {task!r} architecture")
    lm = models.load_pretrained(c.model.name_or_path, c.model.param_dtype,
                                **_positions_flag(metas, c.model.positions_after_prefix))
    where = {task: (parse_prefixes(c.prefixes)[task] if c.prefixes else c.checkpoint) for task in loaded}
    for task, meta in metas.items():
        check_fits(meta, where[task], c.model.name_or_path, lm.config.architecture)
    tasks = list(loaded)
    prefixes = [loaded[t][0] for t in tasks]
    single = len(prefixes) == 1
    prefix_all = prefixes[0] if single else prefix_bank.stack(prefixes)

    tokenizer = data.load_tokenizer(c.model.tokenizer or str(lm.model_dir))
    rows = read_rows(c.input, c.source_field, c.task_field, c.reference_field, c.id_field, not single, stdin)
    if not rows:
        raise PredictError(f"input={c.input!r} has no rows.")
    task_index = {t: i for i, t in enumerate(tasks)}
    for i, row in enumerate(rows):
        if single:
            row["task"] = tasks[0]
        elif row["task"] not in task_index:
            raise PredictError(f"{c.input} row {i}: task {row['task']!r} has no prefix; loaded: {tasks}.")
    examples = [data.Example(source=r["source"], target="") for r in rows]
    source_ids = data.tokenize(examples, tokenizer, c.max_source_length, 1, lm.config.is_encoder_decoder,
                               c.source_prefix).source_ids
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    generate = make_generate_fn(lm.model, gen_cfg)
    lm_params = jax.device_put(lm.params)
    predictions: list[str | None] = [None] * len(rows)
    batches = length_batches([len(s) for s in source_ids], c.batch_size)
    progress = _progress(len(rows), c.progress)
    for indices in batches:
        width = max(8, -(-max(len(source_ids[i]) for i in indices) // 8) * 8)
        padded = indices + [indices[-1]] * (c.batch_size - len(indices))  # one compiled shape per width
        ids, mask = data.pad([source_ids[i] for i in padded], width, pad_id, left=False)
        prefix = prefix_all if single else prefix_bank.for_rows(prefix_all, np.asarray(
            [task_index[rows[i]["task"]] for i in padded], np.int32))
        tokens = np.asarray(generate(lm_params, prefix, ids, mask))[:len(indices)]
        for i, text in zip(indices, tokenizer.batch_decode(tokens.tolist(), skip_special_tokens=True)):
            predictions[i] = text.strip()
        progress.update(len(indices))
    progress.close()

    out_path = c.output or ("" if c.input == "-" else str(Path(c.input).with_suffix(".predictions.jsonl")))
    _write(rows, predictions, out_path, stdout)
    scores = score(rows, predictions, tuple(c.metrics))
    return {"rows": len(rows), "tasks": tasks, "output": out_path or "stdout", "scores": scores}


def score(rows: Sequence[Mapping[str, Any]], predictions: Sequence[str], names: tuple[str, ...]) -> dict:
    """Metrics per task (and over all rows when there are several tasks), over rows that have references."""
    from prefix_jax import text_metrics

    scored = [(r["task"], p, r["references"]) for r, p in zip(rows, predictions) if r["references"]]
    if not scored or not names:
        return {}
    groups: dict[str, list] = {}
    for task, prediction, refs in scored:
        groups.setdefault(task, []).append((prediction, refs))
    if len(groups) > 1:
        groups["all"] = [(p, r) for _, p, r in scored]
    return {task: text_metrics.compute(names, [p for p, _ in items], [r for _, r in items])
            for task, items in groups.items()}


def _write(rows: Sequence[Mapping[str, Any]], predictions: Sequence[str], path: str,
           stdout: io.TextIOBase | None) -> None:
    def lines() -> Iterable[str]:
        for row, prediction in zip(rows, predictions):
            record = {"id": row["id"], "task": row["task"], "source": row["source"], "prediction": prediction}
            if row["references"]:
                record["references"] = row["references"]
            yield json.dumps(record, ensure_ascii=False) + "\n"

    if not path:
        (stdout or sys.stdout).writelines(lines())
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path + ".tmp")
    with tmp.open("w") as f:
        f.writelines(lines())
    tmp.replace(path)


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(total=total, desc="predict", unit="row", file=sys.stderr)


def cli() -> None:
    """`python -m prefix_jax.predict --config configs/predict.py ...` (or the repo's predict.py)."""
    import logging

    from prefix_jax import host_memory

    host_memory.reexec_with_huge_pages()  # before JAX loads: XLA's CPU temporaries on huge pages (see there)
    from absl import app
    from ml_collections import config_flags

    default = str(Path(__file__).resolve().parent.parent / "configs" / "predict.py")
    config_flag = config_flags.DEFINE_config_file("config", default, "Path to a predict config (configs/predict.py).",
                                                  lock_config=True)

    def main(argv):
        del argv
        logging.getLogger("absl").setLevel(logging.WARNING)
        try:
            summary = run(config_flag.value)
        except ValueError as e:  # our errors name the field or the file and row
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        print(json.dumps(summary, indent=2), file=sys.stderr)

    app.run(main)


if __name__ == "__main__":
    cli()
