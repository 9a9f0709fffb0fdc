"""Decode a file of inputs with one frozen LM and one or many trained prefixes.

  python -m prefix_jax.predict --config configs/predict.py --config.model.name_or_path=DIR \
      --config.prefixes=e2e=runs/e2e/export,dart=runs/dart/export --config.input=inputs.jsonl

The LM is loaded once; every prefix joins one bank (`prefix_bank`), so rows of different tasks share
batches. Rows are batched by source length (one compiled shape per width, rounded up to 8); outputs
are written as jsonl (`id`, `task`, `source`, `prediction`, and `references` when given) in input
order, and scored per task when references are present.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np

from prefix_jax import checkpoint, data, fingerprint, host_memory, log_filters, models, prefix_bank, run_options, text_metrics
from prefix_jax import prefix as prefix_lib
from prefix_jax.generate import make_generate_fn
from prefix_jax.models.prefix_contract import DECODER, ENCODER

DEFAULT_TASK = "default"
log = logging.getLogger("prefix_jax")


class PredictError(ValueError):
    """Bad predict input: a file, row, column, prefix or model that does not fit."""


# --- Inputs ---

def _parse_references(value: Any) -> list[str] | None:
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [str(value)]


def _input_text(path: str, stdin: io.TextIOBase | None) -> tuple[str, str, str]:
    """(text, kind, how to name it in errors) of the input file or stdin, decoded as UTF-8 (a BOM dropped)."""
    if path == "-":
        stream = stdin or sys.stdin
        raw = stream.buffer.read() if hasattr(stream, "buffer") else stream.read().encode()
        text = data.decode_text(raw, "stdin")
        first = next((line for line in text.splitlines() if line.strip()), "")
        return text, "jsonl" if first.lstrip().startswith("{") else "txt", "stdin"
    where = f"input={path!r}"
    file = Path(path).expanduser()
    if not file.is_file():
        raise PredictError(f"{where} is not a file." if not file.exists() or file.is_dir() else
                           f"{where} is not a regular file (a named pipe or device); write the inputs to a file, or "
                           "pipe them to input='-'.")
    kind = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".txt": "txt"}.get(file.suffix.lower())
    if kind is None:
        raise PredictError(f"{where}: use a .jsonl, .csv or .txt file (or '-' for stdin).")
    return data.decode_text(file.read_bytes(), where), kind, where


def read_rows(path: str, source_field: str, task_field: str, reference_field: str, id_field: str,
              multi_task: bool, stdin: io.TextIOBase | None = None) -> list[dict]:
    """Rows `{id, task, source, references, where}` from jsonl / csv / txt (or stdin: jsonl, else one source a
    line); `where` names the row's line (`line 4`, `row 3 (line 4)`), as do the errors."""
    text, kind, where = _input_text(path, stdin)
    if kind == "txt":
        if multi_task:
            raise PredictError(f"{where}: plain text has no {task_field!r} column, but several prefixes are loaded; "
                               "use jsonl or csv with a task column.")
        lines = [(f"line {n}", line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        return [{"id": i, "task": DEFAULT_TASK, "source": line, "references": None, "where": at}
                for i, (at, line) in enumerate(lines)]
    records = data.json_lines(text, where) if kind == "jsonl" else data.csv_records(text, where)[1]
    rows = []
    for i, (at, record) in enumerate(records):
        located = f"{where} {at}"
        source = data.text_field(record, source_field, located, "source_field")
        task = data.text_field(record, task_field, located, "task_field").strip() if multi_task else DEFAULT_TASK
        rows.append({"id": record.get(id_field, i), "task": task, "source": source,
                     "references": _parse_references(record.get(reference_field)), "where": located})
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


def check_fits(meta: Mapping[str, Any], where: str, lm_name: str, lm_architecture: str,
               lm_fingerprint: Callable[[], str]) -> None:
    """A prefix only fits the LM it was trained on: same architecture and the same weights (the fingerprint its
    run stored, `fingerprint.lm_fingerprint`: a copy of the LM at another path or a Hub id fits), or a one-line error.
    Prefixes saved without a fingerprint are matched by path."""
    base, arch, saved = meta.get("base_model"), meta.get("architecture"), meta.get("lm_fingerprint")
    if arch == lm_architecture and base is not None:
        if saved is not None and saved == lm_fingerprint():
            return
        if saved is None and _same_model(str(base), lm_name):
            return
    weights = " whose weights differ" if arch == lm_architecture and saved is not None else ""
    raise PredictError(f"the prefix in {where} was trained on base model {base!r} ({arch}), but model.name_or_path "
                       f"is {lm_name!r} ({lm_architecture}){weights}; load the LM it was trained on.")


@dataclasses.dataclass
class Prefixes:
    """The prefixes of a run: `prefix` is one Prefix, or a bank with one prefix per task in `tasks` order."""

    tasks: list[str]
    prefix: Any
    metas: dict[str, dict]  # where each came from (a directory) -> its metadata
    by_task: bool  # each row's task column picks its prefix


def load_prefix(directory: str) -> tuple[Any, dict]:
    """An export (`prefix.json` + `prefix.safetensors`)."""
    path = Path(directory).expanduser()
    if (path / prefix_lib.EXPORT_META).is_file():
        return prefix_lib.load_export(path)
    raise PredictError(f"{directory!r} holds no exported prefix ({prefix_lib.EXPORT_META}); pass the run's "
                       "export/ directory, or the workdir as checkpoint=.")


def load_exports(spec: str) -> Prefixes:
    """`prefixes=DIR` or `task=DIR,...`: the exports, stacked into one bank when there are several."""
    directories = parse_prefixes(spec)
    loaded = {task: load_prefix(d) for task, d in directories.items()}
    tasks = list(loaded)
    prefixes = [loaded[t][0] for t in tasks]
    prefix = prefixes[0] if len(prefixes) == 1 else prefix_bank.stack(prefixes)
    return Prefixes(tasks, prefix, {directories[t]: loaded[t][1] for t in tasks}, len(tasks) > 1)


def load_checkpoint_prefixes(workdir: str) -> Prefixes:
    """The materialized prefix of the latest checkpoint in `workdir/checkpoints` (a multi-task run's: one per
    task, picked by each row's task column, as with exports)."""
    directory = Path(workdir).expanduser().absolute() / "checkpoints"  # Orbax wants absolute paths
    if not directory.is_dir():
        raise PredictError(f"checkpoint={workdir!r} has no checkpoints/ directory.")
    mngr = checkpoint.manager(directory, None, read_only=True)
    try:
        meta = checkpoint.read_meta(mngr)
        if meta is None:
            raise PredictError(f"checkpoint={workdir!r}: no checkpoint saved yet.")
        state = checkpoint.read_state(mngr)
    finally:
        mngr.close()
    spec = prefix_lib.PrefixSpec.from_json(meta["prefix_spec"])
    params = state["params"]
    if spec.tasks and meta["prefix_spec"].get("task_layout") != prefix_lib.TASK_LAYOUT:  # the earlier {task: tree}
        params = prefix_lib.stack_tasks([params[task] for task in spec.tasks])
    prefix = prefix_lib.materialize(params, spec)
    tasks = list(spec.tasks) or [DEFAULT_TASK]
    return Prefixes(tasks, prefix, {workdir: meta}, bool(spec.tasks))


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

def output_path(c: Any) -> str:
    """Where predictions go ("" = stdout) for `c` (`run_options.PredictOptions`), checked before anything is
    loaded: not the input itself, not a directory, and in a directory that exists (or can be made) and is
    writable."""
    out = c.output or ("" if c.input == "-" else str(Path(c.input).with_suffix(".predictions.jsonl")))
    if not out:
        return ""
    path = Path(out).expanduser()
    field = f"output={out!r}" if c.output else f"the output {out!r} (output= unset: next to the input)"
    if c.input != "-" and (path.resolve() == Path(c.input).expanduser().resolve() or (
            path.exists() and Path(c.input).exists() and os.path.samefile(path, c.input))):
        raise PredictError(f"{field} is the input file; the predictions would replace the inputs. Choose another "
                           "output.")
    if path.is_dir():
        raise PredictError(f"{field} is a directory; give a file path, e.g. {str(path / 'predictions.jsonl')!r}.")
    parent = path.absolute().parent
    while not parent.exists() and not parent.is_symlink():
        parent = parent.parent
    if not parent.is_dir():
        raise PredictError(f"{field} cannot be written: {str(parent)!r} is a file, not a directory.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PredictError(f"{field} cannot be written: {str(parent)!r} is not writable.")
    return out


def source_room(lm_config: Any, prefix: Any, max_new_tokens: int) -> int | None:
    """The most source tokens that fit the LM's position table with `prefix` and `max_new_tokens` generated
    tokens (None: no table, e.g. T5); a one-line error when the generated tokens alone do not fit."""
    limit = lm_config.max_positions
    if limit is None:
        return None
    prompt = 0 if prefix.prompt_embeds is None else int(prefix.prompt_embeds.shape[0])
    if lm_config.is_encoder_decoder:
        decoder = lm_config.text_positions(DECODER, max_new_tokens, prefix.length(DECODER)).needed
        room = limit - lm_config.text_positions(ENCODER, 0, prefix.length(ENCODER), prompt_len=prompt).needed
    else:
        decoder = lm_config.text_positions(DECODER, max_new_tokens, prefix.length(DECODER), infix=prefix.infix,
                                           prompt_len=prompt).needed
        room = limit - decoder
    if decoder >= limit or room < 1:
        raise PredictError(f"generate.max_new_tokens={max_new_tokens} with the prefix takes {decoder} of the LM's "
                           f"{limit} positions, leaving no room for a source; lower generate.max_new_tokens.")
    return room


def run(config: Any, stdin: io.TextIOBase | None = None, stdout: io.TextIOBase | None = None) -> dict:
    """Loads the LM once and the prefixes, decodes every input row, writes jsonl, returns the scores. `config`:
    predict.py's ml_collections config (configs/predict.py), read once into `run_options.PredictOptions`."""
    log_filters.install()
    c = run_options.predict_from_config(config)  # the only read of `config`: every field checked and typed
    if bool(c.prefixes) == bool(c.checkpoint):
        raise PredictError("set exactly one of prefixes= (exported prefix directories) or checkpoint= (a workdir).")
    gen_cfg = c.generate
    out_path = output_path(c)  # before anything is loaded or decoded

    loaded = load_exports(c.prefixes) if c.prefixes else load_checkpoint_prefixes(c.checkpoint)
    for where, meta in loaded.metas.items():
        arch = meta.get("architecture")
        if arch is not None:
            models.architecture(arch, f"the prefix in {where}: architecture")
    rows = read_rows(c.input, c.source_field, c.task_field, c.reference_field, c.id_field, loaded.by_task, stdin)
    if not rows:
        raise PredictError(f"input={c.input!r} has no rows.")
    task_index = {t: i for i, t in enumerate(loaded.tasks)}
    for row in rows:
        if not loaded.by_task:
            row["task"] = loaded.tasks[0]
        elif row["task"] not in task_index:
            raise PredictError(f"{row['where']}: task {row['task']!r} has no prefix; loaded: {loaded.tasks}.")

    # model.quantize: kernels quantized on the host as they are read; the float LM never goes to a device.
    lm = models.load_pretrained(c.model.name_or_path, c.model.param_dtype, quantize=c.model.quantize,
                                quantize_group_size=c.model.quantize_group_size,
                                quantize_embeddings=c.model.quantize_embeddings,
                                **_positions_flag(loaded.metas, c.model.positions_after_prefix))
    # The float weights' (what exports record); computed only when needed.
    lm_fingerprint = functools.cache(lambda: lm.float_fingerprint or fingerprint.lm_fingerprint(lm.params))
    for where, meta in loaded.metas.items():
        check_fits(meta, where, c.model.name_or_path, lm.config.architecture, lm_fingerprint)

    tokenizer = data.load_tokenizer(c.model.tokenizer or str(lm.model_dir))
    room = source_room(lm.config, loaded.prefix, gen_cfg.max_new_tokens)
    max_source = c.max_source_length if room is None else min(c.max_source_length, room)
    if max_source < c.max_source_length:
        log.info("max_source_length=%d: the LM's %d positions hold prefix + %d generated tokens + %d source tokens",
                 c.max_source_length, lm.config.max_positions, gen_cfg.max_new_tokens, max_source)
    examples = [data.Example(source=r["source"], target="") for r in rows]
    source_ids = data.tokenize(examples, tokenizer, max_source, 1, lm.config.is_encoder_decoder,
                               c.source_prefix).source_ids
    _log_truncated(rows, tokenizer, c.source_prefix, max_source, lm.config.is_encoder_decoder)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    known = lm_fingerprint() if c.model.quantize != "none" else None  # params are not the float weights
    generate = make_generate_fn(lm.model, gen_cfg, known)
    lm_params = jax.device_put(lm.params)
    predictions: list[str | None] = [None] * len(rows)
    progress = _progress(len(rows), c.progress)
    try:
        for indices in length_batches([len(s) for s in source_ids], c.batch_size):
            longest = max(len(source_ids[i]) for i in indices)
            width = max(longest, min(max(8, -(-longest // 8) * 8), max_source))  # few compiled shapes, all fit
            padded = indices + [indices[-1]] * (c.batch_size - len(indices))  # one compiled shape per width
            ids, mask = data.pad([source_ids[i] for i in padded], width, pad_id, left=False)
            prefix = prefix_bank.for_batch(loaded.prefix, np.asarray([task_index[rows[i]["task"]] for i in padded],
                                                                      np.int32))
            tokens = np.asarray(generate(lm_params, prefix, ids, mask))[:len(indices)]
            for i, text in zip(indices, tokenizer.batch_decode(tokens.tolist(), skip_special_tokens=True)):
                predictions[i] = text.strip()
            progress.update(len(indices))
    finally:
        progress.close()  # ends the bar's line, so an error prints on a line of its own

    _write(rows, predictions, out_path, stdout)
    scores = score(rows, predictions, c.metrics)
    return {"rows": len(rows), "tasks": loaded.tasks, "output": out_path or "stdout", "scores": scores}


def _log_truncated(rows: Sequence[Mapping[str, Any]], tokenizer: Any, source_prefix: str, limit: int,
                   encoder_decoder: bool) -> None:
    """Says how many sources were cut to `limit` tokens (the first one by its line)."""
    texts = [source_prefix + r["source"] for r in rows]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=encoder_decoder)["input_ids"]]
    cut = [i for i, n in enumerate(lengths) if n > limit]
    if cut:
        log.warning("%d of %d sources are longer than %d tokens and were truncated to it (max_source_length, or "
                    "what the LM's position table leaves); the first: %s (%d tokens)", len(cut), len(rows), limit,
                    rows[cut[0]]["where"], lengths[cut[0]])


def score(rows: Sequence[Mapping[str, Any]], predictions: Sequence[str], names: tuple[str, ...]) -> dict:
    """Metrics per task (and over all rows when there are several tasks), over rows that have references."""
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
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    # A fresh name in the target directory (O_EXCL: never an existing file or link), then an atomic rename.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(f.fileno(), 0o666 & ~umask)  # mkstemp's 0600 -> what a plain open() would have made
            f.writelines(lines())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    # XLA's CPU temporaries on huge pages (see there): the repository's predict.py restarts before JAX loads;
    # `python -m prefix_jax.predict` restarts here, JAX imported but not started (no backend, no threads).
    host_memory.reexec_with_huge_pages()
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
