"""Datasets -> examples -> token ids -> fixed-shape batches, one process's share at a time.

Reading: `datasets.load_dataset` for the Hub (loading-script datasets from their Parquet export), or
local jsonl/json/csv/parquet files, every row's fields checked (one-line errors naming file, row and
field); table-to-text formats are linearized the paper's way (`field : value | ...`, `s : r : o | ...`).
Tokenizers are checked to exist and to round-trip text. Batches have static
shapes (no recompiles), are drawn by a seeded per-epoch permutation, and are addressed by step, so a
resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import difflib
import io
import json
import logging
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

FORMATS = ("fields", "e2e", "dart", "webnlg")


class DataError(ValueError):
    """A dataset could not be read or does not have the configured fields."""


@dataclasses.dataclass(frozen=True)
class Example:
    source: str
    target: str
    references: tuple[str, ...] = ()  # every reference of this source (evaluation)
    task: str = ""  # multi-task data (`data.task_field`): which prefix this example trains


# --- Linearization (the paper's formats) ---

_E2E_SLOT = re.compile(r"\s*([^\[\],]+?)\s*\[(.*?)\]\s*")


def linearize_e2e(mr: str) -> str:
    """`name[Alimentum], area[city centre]` -> `name : Alimentum | area : city centre`."""
    slots = _E2E_SLOT.findall(mr)
    if not slots:
        raise DataError(f"not an E2E meaning representation: {mr!r}")
    return " | ".join(f"{field} : {value}" for field, value in slots)


def linearize_triples(triples: Sequence[Sequence[str]]) -> str:
    """`[[s, r, o], ...]` -> `s : r : o | s : r : o`."""
    return " | ".join(" : ".join(part.strip() for part in triple) for triple in triples)


# --- Reading ---
#
# Every value is checked where it is read: a null, missing, non-string or empty text field is an error
# naming the file (or dataset split), the row and the field, never the string "None" or "123".


@dataclasses.dataclass
class Table:
    """Rows of one split: `origin` names where they come from (a config field and file, or a Hub dataset),
    each row carries its own location (`line 3`, `row 3`)."""

    origin: str
    columns: list[str]
    rows: Iterable[tuple[str, Mapping[str, Any]]]


def text_field(record: Mapping[str, Any], key: str, where: str, field: str) -> str:
    """`record[key]` if it is non-empty text; otherwise an error naming the row and the config field."""
    if key not in record:
        raise DataError(f"{where}: has no field {key!r} ({field}); add it to every row or set {field}.")
    value = record[key]
    if value is None:
        raise DataError(f"{where}: field {key!r} ({field}) is null; fill it in or drop the row.")
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} ({field}) is {_a(type(value).__name__)} ({str(value)[:40]!r}), "
                        "not text; write it as a string in the file or drop the row.")
    if not value.strip():
        raise DataError(f"{where}: field {key!r} ({field}) is empty; fill it in or drop the row.")
    return value


def _a(noun: str) -> str:
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"


def _group_references(pairs: Sequence[tuple[str, str]], tasks: Sequence[str] | None = None) -> list[Example]:
    """One example per (source, reference) pair, each knowing all references of its source (within its task)."""
    tasks = tasks if tasks is not None else [""] * len(pairs)
    refs: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
    for (source, target), task in zip(pairs, tasks):
        refs[task, source].append(target)
    return [Example(source, target, tuple(refs[task, source]), task) for (source, target), task in zip(pairs, tasks)]


def decode_text(raw: bytes, origin: str) -> str:
    """UTF-8 text (a BOM dropped), or an error naming `origin` and the line of the first bad byte."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{origin}: not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}); re-save the file "
                        "as UTF-8.") from None
    if "\x00" in text:
        line = text[:text.index("\x00")].count("\n") + 1
        raise DataError(f"{origin}: has a NUL byte on line {line}, so it is not a text file (binary, or UTF-16?); "
                        "re-save it as UTF-8 text.")
    return text


def json_lines(text: str, origin: str) -> list[tuple[str, Mapping[str, Any]]]:
    rows = []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{origin} line {number}: not valid JSON (column {e.colno}: {e.msg}); JSON Lines "
                            "needs one complete object per line.") from None
        if not isinstance(record, dict):
            raise DataError(f"{origin} line {number}: expected a JSON object {{\"field\": ...}}, got "
                            f"{_a(type(record).__name__)}.")
        rows.append((f"line {number}", record))
    return rows


def _json_document(text: str, origin: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{origin}: not valid JSON (line {e.lineno} column {e.colno}: {e.msg}); fix the file "
                        "(or give JSON Lines, one object per line, as .jsonl).") from None


def _json_records(text: str, origin: str) -> list[tuple[str, Mapping[str, Any]]]:
    """A .json file: a list of objects, or JSON Lines (what `datasets`' json loader also accepts)."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # more than one document: JSON Lines in a .json file
            return json_lines(text, origin)
        return _json_document(text, origin)  # raises, naming line and column
    if isinstance(document, dict):  # a single object: one row
        return [("record 1", document)]
    if not isinstance(document, list):
        raise DataError(f"{origin}: expected a list of JSON objects, got {_a(type(document).__name__)}.")
    for number, record in enumerate(document, 1):
        if not isinstance(record, dict):
            raise DataError(f"{origin} record {number}: expected a JSON object {{\"field\": ...}}, got "
                            f"{_a(type(record).__name__)}.")
    return [(f"record {number}", record) for number, record in enumerate(document, 1)]


def csv_records(text: str, origin: str) -> tuple[list[str], list[tuple[str, Mapping[str, Any]]]]:
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    rows = []
    try:
        columns = list(reader.fieldnames or [])
        if not columns or not any(c.strip() for c in columns):
            raise DataError(f"{origin}: has no header row; the first line must name the columns.")
        twice = sorted({c for c in columns if columns.count(c) > 1})
        if twice:
            raise DataError(f"{origin}: the header names column {twice[0]!r} more than once (only the last would be "
                            "read); rename or drop the extra column.")
        for number, record in enumerate(reader, 1):
            where = f"row {number} (line {reader.line_num})"
            if None in record:
                raise DataError(f"{origin} {where}: has more fields than the header's {len(columns)}; quote "
                                "values that contain commas.")
            if any(v is None for v in record.values()):
                raise DataError(f"{origin} {where}: has fewer fields than the header's {len(columns)}; fill in the "
                                "missing cells (an unclosed quote also swallows the rest of the file).")
            rows.append((where, record))
    except csv.Error as e:
        raise DataError(f"{origin} row {len(rows) + 1} (from line {reader.line_num + 1}): not valid CSV ({e}); check "
                        "the quoting there.") from None
    return columns, rows


def _parquet_records(path: Path, origin: str) -> tuple[list[str], list[tuple[str, Mapping[str, Any]]]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:
        raise DataError(f"{origin}: not a readable Parquet file ({type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}).") from None
    return table.column_names, [(f"row {n}", r) for n, r in enumerate(table.to_pylist(), 1)]


LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def read_local_table(path: Path, origin: str) -> Table:
    """Rows of a local .jsonl / .json / .csv / .parquet file, each with its line or row number."""
    suffix = path.suffix.lower()
    if suffix not in LOCAL_SUFFIXES:
        raise DataError(f"{origin}: unsupported file type {suffix or '(none)'!r}; use one of {LOCAL_SUFFIXES}.")
    if path.stat().st_size == 0:
        raise DataError(f"{origin}: the file is empty.")
    if suffix == ".parquet":
        columns, rows = _parquet_records(path, origin)
    else:
        text = decode_text(path.read_bytes(), origin)
        if not text.strip():
            raise DataError(f"{origin}: the file is empty.")
        if suffix == ".csv":
            columns, rows = csv_records(text, origin)
        else:
            rows = json_lines(text, origin) if suffix == ".jsonl" else _json_records(text, origin)
            columns = list(rows[0][1]) if rows else []
    if not rows:
        raise DataError(f"{origin}: has no rows.")
    return Table(origin, columns, rows)


def _local(files: Mapping[str, str], split: str) -> tuple[Path, str]:
    """The file of `split` and how to name it in errors (`data.data_files.train='x.jsonl'`)."""
    if split not in files:
        raise DataError(f"data.data_files has no {split!r} entry (has {sorted(files)}).")
    path = Path(str(files[split])).expanduser()
    origin = f"data.data_files.{split}={str(files[split])!r}"
    if path.is_dir():
        raise DataError(f"{origin}: is a directory; give the file ({', '.join(LOCAL_SUFFIXES)}).")
    if path.exists() and not path.is_file():
        raise DataError(f"{origin}: is not a regular file (a named pipe, socket or device); a split is read more than "
                        "once, so write the data to a file first.")
    if not path.is_file():
        raise DataError(f"{origin}: no such file.")
    return path, origin


def read_e2e_csv(path: str | Path, origin: str | None = None) -> list[Example]:
    """The E2E challenge csv (`mr,ref`; one row per reference)."""
    return _e2e_examples(read_local_table(Path(path), origin or str(path)))


def _e2e_examples(table: Table) -> list[Example]:
    if not {"mr", "ref"} <= set(table.columns):
        raise DataError(f"{table.origin}: expected an E2E csv with columns mr,ref; it has {table.columns}.")
    pairs = []
    for where, r in table.rows:
        where = f"{table.origin} {where}"
        pairs.append((_e2e_source(text_field(r, "mr", where, "data.format='e2e'"), where),
                      text_field(r, "ref", where, "data.format='e2e'").strip()))
    return _group_references(pairs)


def _e2e_source(mr: str, where: str) -> str:
    try:
        return linearize_e2e(mr)
    except DataError as e:
        raise DataError(f"{where}: {e}; expected `field[value], field[value], ...`.") from None


def _triples(triples: Any, where: str, field: str) -> str:
    """Linearized `[[s, r, o], ...]`, after checking it is a non-empty list of string triples."""
    if (not isinstance(triples, list) or not triples
            or not all(isinstance(t, (list, tuple)) and len(t) == 3 and all(isinstance(x, str) for x in t)
                       for t in triples)):
        raise DataError(f"{where}: field {field!r} must be a non-empty list of [subject, relation, object] "
                        f"strings; it is {str(triples)[:60]!r}.")
    return linearize_triples(triples)


def read_dart_json(path: str | Path, origin: str | None = None) -> list[Example]:
    """A DART json file (a list of `{tripleset, annotations: [{text}]}`)."""
    origin = origin or str(path)
    path = Path(path)
    if path.stat().st_size == 0:
        raise DataError(f"{origin}: the file is empty.")
    records = _json_document(decode_text(path.read_bytes(), origin), origin)
    if not isinstance(records, list) or not records:
        raise DataError(f"{origin}: expected a non-empty JSON list of DART records {{tripleset, annotations}}.")
    pairs = []
    for number, record in enumerate(records, 1):
        where = f"{origin} record {number}"
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object {{tripleset, annotations}}.")
        source = _triples(record.get("tripleset"), where, "tripleset")
        annotations = record.get("annotations")
        if not isinstance(annotations, list) or not annotations or not all(isinstance(a, dict) for a in annotations):
            raise DataError(f"{where}: field 'annotations' must be a non-empty list of {{\"text\": ...}} objects.")
        pairs.extend((source, text_field(a, "text", f"{where} annotation {i}", "data.format='dart'").strip())
                     for i, a in enumerate(annotations, 1))
    return _group_references(pairs)


# --- The Hub (and local dataset directories) ---

PARQUET_REVISION = "refs/convert/parquet"


def _script_refused(e: BaseException) -> bool:
    """`datasets` >= 4 refuses loading scripts (GEM/e2e_nlg, GEM/web_nlg, GEM/dart, EdinburghNLP/xsum)."""
    return "scripts are no longer supported" in str(e).lower()


def _hub_origin(name: str, config_name: str | None, split: str) -> str:
    return f"data.name={name!r}" + (f" (data.config_name={config_name!r})" if config_name else "") + \
        f" split {split!r}"


def _hub_dataset(name: str, config_name: str | None, split: str) -> Any:
    """A `datasets.Dataset` of a Hub id or a local dataset directory; loading-script datasets from their
    Parquet export."""
    import datasets

    from prefix_jax import hub

    origin = _hub_origin(name, config_name, split)
    local = Path(name).expanduser()
    if not local.is_dir():
        if local.exists():
            raise DataError(f"data.name={name!r} is a file; set data.data_files.train (and .validation) to local files "
                            "and data.name to ''.")
        if hub.looks_local(name):
            raise DataError(f"data.name={name!r}: no such directory (a path is never looked up on the Hub); for "
                            "local files set data.data_files.train / .validation instead.")
        hub.bound_hub_timeouts()
    is_local = local.is_dir()
    source = str(local) if is_local else name
    try:
        if not is_local and not datasets.config.HF_HUB_OFFLINE:
            _reach_hub(name)  # one request that fails fast; `load_dataset` retries each request for minutes
        return datasets.load_dataset(source, config_name or None, split=split)
    except Exception as e:
        if _script_refused(e):
            return parquet_export(name, config_name, split)
        if is_local:
            raise DataError(f"{origin}: the local dataset directory could not be loaded ({hub.describe(e)}); it must "
                            "hold data files `datasets` can read (or a Parquet export: SUBSET/SPLIT/*.parquet), or "
                            "set data.data_files.train / .validation to the files.") from e
        if not hub.unreachable(e):  # the Hub answered: a wrong id, subset or split
            raise DataError(f"{origin} could not be loaded ({hub.describe(e)}); check data.name, data.config_name and "
                            "data.train_split / data.eval_split.") from e
        raise DataError(
            f"{origin} could not be loaded ({hub.hub_error_hint(e)}). Offline? On a machine with internet export each "
            f"split (`datasets.load_dataset({name!r}, split='train').to_json('train.jsonl')`), copy the files here "
            "and set data.data_files.train / data.data_files.validation (and data.source_field / data.target_field)."
        ) from e


def _reach_hub(name: str) -> None:
    import datasets
    from huggingface_hub import HfApi

    from prefix_jax import hub

    HfApi(endpoint=datasets.config.HF_ENDPOINT).dataset_info(name, timeout=hub.hub_timeout_s())


def _parquet_export_location(name: str) -> tuple[Any, str, str]:
    """(fsspec filesystem, root to list, prefix of file urls) of a dataset's Parquet export: the Hub's
    `refs/convert/parquet` revision, or a local directory laid out the same way."""
    from urllib.parse import quote

    local = Path(name).expanduser()
    if local.is_dir():
        import fsspec

        return fsspec.filesystem("file"), str(local), str(local)
    from huggingface_hub import HfFileSystem

    root = f"datasets/{name}@{quote(PARQUET_REVISION, safe='')}"
    return HfFileSystem(), root, f"hf://{root}"


def _subdirs(fs: Any, path: str) -> list[str]:
    return sorted(entry["name"].rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=True)
                  if entry["type"] == "directory")


def parquet_export(name: str, config_name: str | None, split: str) -> Any:
    """A split of a loading-script dataset from its Parquet export (`{config}/{split}/NNNN.parquet`, or
    `{config}/partial-{split}/` when the Hub converted only part of a large split); columns as the script
    defined them."""
    import datasets

    from prefix_jax import hub

    origin = _hub_origin(name, config_name, split)
    try:
        fs, root, url = _parquet_export_location(name)
        configs = _subdirs(fs, root)
        config = config_name or (configs[0] if len(configs) == 1 else "default" if "default" in configs else "")
        if config not in configs:
            raise DataError(f"{origin}: a loading-script dataset whose Parquet export ({PARQUET_REVISION}) has the "
                            f"subsets {configs}; set data.config_name to one of them.")
        splits = _subdirs(fs, f"{root}/{config}")
        folder = split if split in splits else f"partial-{split}" if f"partial-{split}" in splits else ""
        if not folder:
            raise DataError(f"{origin}: the Parquet export ({PARQUET_REVISION}) of subset {config!r} has the splits "
                            f"{splits}; set data.train_split / data.eval_split to one of them.")
        if folder != split:
            logging.getLogger(__name__).warning("%s: the Hub converted only part of this split (%s/%s).", origin,
                                                config, folder)
        files = sorted(entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(f"{root}/{config}/{folder}",
                                                                              detail=False)
                       if entry.endswith(".parquet"))
        if not files:
            raise DataError(f"{origin}: {config}/{folder} of the Parquet export ({PARQUET_REVISION}) holds no "
                            ".parquet files.")
        urls = [f"{url}/{config}/{folder}/{f}" for f in files]
        return datasets.load_dataset("parquet", data_files={split: urls}, split=split)
    except DataError:
        raise
    except Exception as e:
        raise DataError(
            f"{origin} is a loading-script dataset (which datasets>=4 cannot run) and its Parquet export "
            f"({PARQUET_REVISION}) could not be read ({hub.hub_error_hint(e)}). Export the splits to jsonl on a "
            "machine with internet and set data.data_files={'train': ..., 'validation': ...}."
        ) from e


def hub_table(name: str, config_name: str | None, split: str) -> Table:
    """Rows of a split of a Hub dataset (or local dataset directory), numbered from 1."""
    if not name:
        raise DataError("set data.name (a Hugging Face dataset id) or data.data_files (local files).")
    dataset = _hub_dataset(name, config_name, split)
    return _as_table(dataset, _hub_origin(name, config_name, split))


def _as_table(dataset: Any, origin: str) -> Table:
    return Table(origin, list(dataset.column_names), ((f"row {n}", r) for n, r in enumerate(dataset, 1)))


def read_examples(data: Any, split: str) -> list[Example]:
    """The examples of one split as the data config (or `run_options.DataOptions`) describes them."""
    fmt = data.format
    if fmt not in FORMATS:
        raise DataError(f"data.format={fmt!r} is not one of {FORMATS}.")
    files = {split: path for split, path in dict(data.data_files or {}).items() if path}  # '' = unset
    if files:
        path, origin = _local(files, split)
        if fmt == "dart" and path.suffix.lower() == ".json":
            examples = read_dart_json(path, origin)
        else:
            table = read_local_table(path, origin)
            if fmt == "e2e" and {"mr", "ref"} <= set(table.columns):
                examples = _e2e_examples(table)
            else:
                examples = _examples_of(fmt, table, data)
    else:
        table = hub_table(data.name, data.config_name, split)
        examples = _examples_of(fmt, table, data)
    if not examples:
        raise DataError(f"{origin if files else _hub_origin(data.name, data.config_name, split)}: has no rows.")
    return examples


def _examples_of(fmt: str, table: Table, data: Any) -> list[Example]:
    if fmt != "fields":
        return _table_to_text_from_hub(fmt, table, "")
    fields = {data.source_field: "data.source_field", data.target_field: "data.target_field"}
    missing = [f"{key!r} ({field})" for key, field in fields.items() if key not in table.columns]
    if missing:
        raise DataError(f"{table.origin}: has no column {', '.join(missing)}; it has {table.columns}. Set "
                        "data.source_field / data.target_field.")
    task_field = getattr(data, "task_field", "")  # a ConfigDict or run_options.DataOptions
    if task_field and task_field not in table.columns:
        raise DataError(f"{table.origin}: has no column {task_field!r} (data.task_field); it has {table.columns}.")
    rows = list(table.rows)
    tasks = _task_names(table.origin, rows, task_field) if task_field else None
    return _group_references([
        (text_field(r, data.source_field, f"{table.origin} {where}", "data.source_field"),
         text_field(r, data.target_field, f"{table.origin} {where}", "data.target_field").strip())
        for where, r in rows], tasks)


# A task name becomes a directory (`export/<task>/`): a portable file name, never a path.
TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def check_task_name(name: str, where: str) -> None:
    """Refuses a task name that is not a plain directory name (`..`, `a/b`, `/abs`, empty, odd characters)."""
    if not TASK_NAME.fullmatch(name):
        raise DataError(f"{where}: task name {name[:60]!r} (data.task_field) becomes the directory export/<task>/, so "
                        "it must be 1-100 letters, digits, '_', '-' or '.', starting with a letter or digit; "
                        "rename the task.")


def _task_names(origin: str, rows: Sequence[tuple[str, Mapping[str, Any]]], task_field: str) -> list[str]:
    """Each row's task, checked as a directory name and distinct from the others after case folding (two
    tasks `Foo` and `foo` would share one directory on a case-insensitive filesystem)."""
    tasks, first_seen = [], {}
    for where, r in rows:
        at = f"{origin} {where}"
        name = text_field(r, task_field, at, "data.task_field").strip()
        check_task_name(name, at)
        other = first_seen.setdefault(name.casefold(), (name, where))
        if other[0] != name:
            raise DataError(f"{at}: task {name!r} (data.task_field) differs from task {other[0]!r} ({other[1]}) only "
                            "in letter case, and both would share one export directory on a case-insensitive "
                            "filesystem; spell them the same or rename one.")
        tasks.append(name)
    return tasks


def _table_to_text_from_hub(fmt: str, table: Any, split: str) -> list[Example]:
    """Hub layouts of E2E (`e2e_nlg`, `GEM/e2e_nlg`), DART (`dart`, `GEM/dart`), WebNLG (`GEM/web_nlg`)."""
    if not isinstance(table, Table):
        table = _as_table(table, f"split {split!r}")
    cols = set(table.columns)
    need = {"e2e": [{"meaning_representation", "human_reference"}, {"meaning_representation", "target"}],
            "dart": [{"tripleset", "annotations"}, {"tripleset", "target"}],
            "webnlg": [{"input", "target"}]}[fmt]
    if not any(n <= cols for n in need):
        raise DataError(f"{table.origin}: data.format={fmt!r} expects the columns "
                        f"{' or '.join(str(sorted(n)) for n in need)}; it has {sorted(cols)}.")
    field = f"data.format={fmt!r}"
    pairs: list[tuple[str, str]] = []
    for where, r in table.rows:
        where = f"{table.origin} {where}"
        if fmt == "e2e":
            source = _e2e_source(text_field(r, "meaning_representation", where, field), where)
            targets = [text_field(r, "human_reference" if "human_reference" in cols else "target", where, field)]
        elif fmt == "dart":
            source = _triples(r.get("tripleset"), where, "tripleset")
            if "annotations" in cols:
                texts = (r.get("annotations") or {}).get("text") if isinstance(r.get("annotations"), dict) else None
                if not isinstance(texts, list) or not texts:
                    raise DataError(f"{where}: field 'annotations' ({field}) has no 'text' list.")
                targets = [text_field({"text": t}, "text", f"{where} annotation {i}", field)
                           for i, t in enumerate(texts, 1)]
            else:
                targets = [text_field(r, "target", where, field)]
        else:  # webnlg: GEM/web_nlg gives `input` as ["s | r | o", ...]
            triples = r.get("input")
            if not isinstance(triples, list) or not triples or not all(isinstance(t, str) for t in triples):
                raise DataError(f"{where}: field 'input' ({field}) must be a non-empty list of 's | r | o' strings; "
                                f"it is {str(triples)[:60]!r}.")
            source = linearize_triples([t.split(" | ") for t in triples])
            targets = [text_field(r, "target", where, field)]
        pairs.extend((source, t.strip()) for t in targets)
    return _group_references(pairs)


# --- Tokenization ---


@dataclasses.dataclass
class TokenizedSplit:
    """Token ids of a split; ragged until batched."""

    source_ids: list[list[int]]
    target_ids: list[list[int]]
    examples: list[Example]
    task_ids: list[int] | None = None  # multi-task: each example's prefix index (batches carry it)

    def __len__(self) -> int:
        return len(self.source_ids)


# Files from which `transformers` can build a tokenizer; without any of them it silently builds an empty
# one (T5: every word `<unk>`; GPT-2: every text empty).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "vocab.txt", "spiece.model",
                   "tokenizer.model", "sentencepiece.bpe.model", "spm.model")
TOKENIZER_FIELD = "model.tokenizer, or model.name_or_path when model.tokenizer is empty"
_PROBE = "The quick brown fox jumps over the lazy dog 42."


def load_tokenizer(path_or_name: str, field: str = TOKENIZER_FIELD) -> Any:
    """`transformers.AutoTokenizer` for a model directory or Hub id (or the tokenizer a GGUF file describes),
    checked to tokenize text sensibly."""
    from transformers import AutoTokenizer

    from prefix_jax import hub
    from prefix_jax.models import gguf_checkpoint

    fix = ("save the model's tokenizer there (`AutoTokenizer.from_pretrained(ORIGINAL).save_pretrained(DIR)`) or "
           "set model.tokenizer to a directory or Hub id that has one.")
    try:
        gguf_file = gguf_checkpoint.resolve(str(path_or_name), field)
        if gguf_file is not None:  # the tokenizer the GGUF file describes
            tokenizer = gguf_checkpoint.load_tokenizer(gguf_file)
            check_tokenizer(tokenizer, f"the tokenizer in {gguf_file} [{field}]", fix)
            return tokenizer
        directory = hub.resolve_tokenizer_dir(str(path_or_name), field)
    except hub.ModelNotFoundError as e:
        raise DataError(str(e)) from None
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise DataError(f"{directory} has no tokenizer files ({', '.join(TOKENIZER_FILES[:5])}, ...) [{field}]; "
                        f"{fix}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except Exception as e:
        raise DataError(f"{directory}: no tokenizer could be loaded ({hub.describe(e)}) [{field}]; {fix}") from e
    check_tokenizer(tokenizer, f"the tokenizer in {directory} [{field}]", fix)
    return tokenizer


def check_tokenizer(tokenizer: Any, what: str, fix: str) -> None:
    """Refuses a tokenizer that cannot round-trip a plain English sentence (an empty or all-`<unk>` one)."""
    size = len(tokenizer)
    if size < 16:
        raise DataError(f"{what} has only {size} tokens; its vocabulary files are missing or broken: {fix}")
    ids = list(tokenizer(_PROBE, add_special_tokens=False)["input_ids"])
    if not ids:
        raise DataError(f"{what} turns {_PROBE!r} into no tokens at all; its vocabulary files are missing or broken: "
                        f"{fix}")
    unk = tokenizer.unk_token_id
    if unk is not None and all(i == unk for i in ids):
        raise DataError(f"{what} turns {_PROBE!r} into unknown tokens only; its vocabulary files are missing or "
                        f"broken: {fix}")
    letters = lambda text: "".join(ch for ch in text.lower() if ch.isalnum())
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    if difflib.SequenceMatcher(None, letters(_PROBE), letters(decoded)).ratio() < 0.5:
        raise DataError(f"{what} decodes {_PROBE!r} back as {decoded[:60]!r}; its vocabulary files are missing or "
                        f"broken: {fix}")


def tokenize(examples: Sequence[Example], tokenizer: Any, max_source_length: int, max_target_length: int,
             encoder_decoder: bool, source_prefix: str = "", target_prefix: str = "", name: str = "") -> TokenizedSplit:
    """Source and target ids, truncated (with `name`, how many were cut is logged). Encoder-decoders get the
    tokenizer's special tokens (T5: `</s>`, BART: `<s> ... </s>`); decoder-only targets end with EOS (the
    separator is added by the model)."""
    sources = [source_prefix + e.source for e in examples]
    targets = [target_prefix + e.target for e in examples]
    if encoder_decoder:
        src_full = tokenizer(sources)["input_ids"]
        tgt_full = tokenizer(targets)["input_ids"]
        src = _truncated(tokenizer, sources, src_full, max_source_length)
        tgt = _truncated(tokenizer, targets, tgt_full, max_target_length)
    else:
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no eos token; decoder-only targets need one to end generation.")
        src_full = tokenizer(sources, add_special_tokens=False)["input_ids"]
        tgt_full = [ids + [tokenizer.eos_token_id] for ids in tokenizer(targets, add_special_tokens=False)["input_ids"]]
        src = [ids[:max_source_length] for ids in src_full]
        tgt = [_cut(ids, max_target_length) for ids in tgt_full]
    if name:
        for what, full, limit, field in (("sources", src_full, max_source_length, "data.max_source_length"),
                                         ("targets", tgt_full, max_target_length, "data.max_target_length")):
            cut = sum(len(ids) > limit for ids in full)
            if cut:
                logging.getLogger("prefix_jax").warning(
                    "%s: %d of %d %s are longer than %s=%d tokens and were truncated (the longest has %d)", name, cut,
                    len(full), what, field, limit, max(len(ids) for ids in full))
    return TokenizedSplit(list(src), list(tgt), list(examples))


def _cut(ids: Sequence[int], limit: int) -> list[int]:
    """`ids` cut to `limit` tokens, keeping the last one (the EOS the sequence ends with)."""
    ids = list(ids)
    return ids if len(ids) <= limit else ids[:limit - 1] + ids[-1:]


def _truncated(tokenizer: Any, texts: Sequence[str], full: Sequence[list[int]], limit: int) -> list[list[int]]:
    """`full` with the rows longer than `limit` tokenized again by the tokenizer's own truncation (which keeps
    its special tokens)."""
    long = [i for i, ids in enumerate(full) if len(ids) > limit]
    out = [list(ids) for ids in full]
    if long:
        cut = tokenizer([texts[i] for i in long], truncation=True, max_length=limit)["input_ids"]
        for i, ids in zip(long, cut):
            out[i] = list(ids)
    return out


# --- Batching ---


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def padded_lengths(split: TokenizedSplit, max_source_length: int, max_target_length: int) -> tuple[int, int]:
    """Static batch widths: the longest sequence rounded up to a multiple of 8, capped by the maxima."""
    longest_source = max((len(s) for s in split.source_ids), default=1)
    longest_target = max((len(t) for t in split.target_ids), default=1)
    return (min(max_source_length, _round_up(longest_source, 8)), min(max_target_length, _round_up(longest_target, 8)))


def pad(rows: Sequence[Sequence[int]], width: int, pad_id: int, left: bool) -> tuple[np.ndarray, np.ndarray]:
    """Ragged ids -> `[N, width]` ids and 0/1 mask, padded on the left or the right."""
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        row = list(row)[:width]
        sl = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, sl] = row
        mask[i, sl] = 1
    return ids, mask


def pack_rows(lengths: Sequence[int], order: Sequence[int], width: int) -> list[list[int]]:
    """Example indices packed into rows of at most `width` tokens, in `order`: each example joins the current
    row when it fits, else starts the next one (deterministic; the order within and across rows is kept)."""
    rows: list[list[int]] = []
    used = width
    for i in order:
        if lengths[i] > width:
            raise DataError(f"an example of {lengths[i]} tokens does not fit data.pack_width={width}; raise it.")
        if used + lengths[i] > width:
            rows.append([])
            used = 0
        rows[-1].append(int(i))
        used += lengths[i]
    return rows


def packed_batch(split: TokenizedSplit, rows: Sequence[Sequence[int]], width: int, separator_id: int,
                 pad_id: int) -> dict[str, np.ndarray]:
    """Packed decoder-only rows: each example's `[x; SEP; y[:-1]]` after the previous one (`ids`), which example
    each slot holds (`segment_ids`: 1, 2, ...; 0 padding), and what each slot predicts (`target_ids`, counted
    where `target_mask` is 1: the target side of each example, as in unpacked batches)."""
    shape = (len(rows), width)
    ids, segment_ids = np.full(shape, pad_id, np.int32), np.zeros(shape, np.int32)
    target_ids, target_mask = np.full(shape, pad_id, np.int32), np.zeros(shape, np.int32)
    for r, indices in enumerate(rows):
        start = 0
        for segment, i in enumerate(indices, start=1):
            source, target = list(split.source_ids[i]), list(split.target_ids[i])
            sequence = source + [separator_id] + target[:-1]
            end = start + len(sequence)
            ids[r, start:end], segment_ids[r, start:end] = sequence, segment
            target_ids[r, start + len(source):end], target_mask[r, start + len(source):end] = target, 1
            start = end
    return {"ids": ids, "segment_ids": segment_ids, "target_ids": target_ids, "target_mask": target_mask}


@dataclasses.dataclass
class Batcher:
    """Fixed-shape batches of a tokenized split, addressed by step (train) or enumerated (eval).

    Each process materializes only its own rows of the global batch.
    """

    split: TokenizedSplit
    global_batch_size: int
    source_width: int
    target_width: int
    pad_id: int
    left_pad_source: bool
    seed: int = 0
    process_index: int = 0
    process_count: int = 1
    pack_width: int = 0  # > 0: training batches are `global_batch_size` packed rows of this many tokens
    separator_id: int = 0  # packed rows: the token that starts each target (the model's separator)

    def __post_init__(self) -> None:
        if self.global_batch_size % self.process_count:
            raise DataError(f"train.batch_size={self.global_batch_size} must be a multiple of the number of "
                            f"processes ({self.process_count}).")
        self._packed_epochs: dict[int, list[list[int]]] = {}
        self._rows_per_epoch: int | None = None

    def packed_epoch(self, epoch: int) -> list[list[int]]:
        """The rows (example indices) of `epoch`'s shuffled examples packed `pack_width` tokens at a time."""
        if epoch not in self._packed_epochs:
            lengths = [len(s) + len(t) for s, t in zip(self.split.source_ids, self.split.target_ids)]
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.split))
            self._packed_epochs = {epoch: pack_rows(lengths, order, self.pack_width)}  # one epoch kept
        return self._packed_epochs[epoch]

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.process_count

    @property
    def steps_per_epoch(self) -> int:
        """Whole global batches per epoch (packed: of the first epoch's rows; later epochs, shuffled otherwise,
        pack into about as many: a shortfall is filled with empty rows, an excess dropped like a partial batch)."""
        if self.pack_width and self._rows_per_epoch is None:
            self._rows_per_epoch = len(self.packed_epoch(0))
        units = self._rows_per_epoch if self.pack_width else len(self.split)
        return units // self.global_batch_size

    def position(self, step: int) -> dict[str, int]:
        """Where in the data step `step` reads: epoch and batch within the epoch."""
        return {"epoch": step // self.steps_per_epoch, "batch": step % self.steps_per_epoch}

    def _rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        local = np.array_split(indices, self.process_count)[self.process_index]
        src_ids, src_mask = pad([self.split.source_ids[i] for i in local], self.source_width, self.pad_id,
                                self.left_pad_source)
        tgt_ids, tgt_mask = pad([self.split.target_ids[i] for i in local], self.target_width, self.pad_id, False)
        batch = {"source_ids": src_ids, "source_mask": src_mask, "target_ids": tgt_ids, "target_mask": tgt_mask}
        if self.split.task_ids is not None:
            batch["task_ids"] = np.asarray([self.split.task_ids[i] for i in local], np.int32)
        return batch

    def train_batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of the global batch of `step` (epochs reshuffle with seed (seed, epoch))."""
        if self.steps_per_epoch == 0:
            raise DataError(f"the training split has {len(self.split)} examples, fewer than one batch of "
                            f"train.batch_size={self.global_batch_size}.")
        pos = self.position(step)
        start = pos["batch"] * self.global_batch_size
        if self.pack_width:
            rows = self.packed_epoch(pos["epoch"])[start:start + self.global_batch_size]
            rows += [[]] * (self.global_batch_size - len(rows))
            local = [rows[i] for i in np.array_split(np.arange(len(rows)), self.process_count)[self.process_index]]
            return packed_batch(self.split, local, self.pack_width, self.separator_id, self.pad_id)
        order = np.random.default_rng([self.seed, pos["epoch"]]).permutation(len(self.split))
        return self._rows(order[start:start + self.global_batch_size])

    def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
        """Every example once, in order; the last batch is filled with fully masked rows."""
        n = len(self.split)
        for start in range(0, n, self.global_batch_size):
            indices = np.arange(start, min(start + self.global_batch_size, n))
            batch = self._rows(indices)
            short = self.local_batch_size - batch["source_ids"].shape[0]
            if short:
                batch = {k: np.concatenate([v, np.zeros((short, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}
            yield batch
