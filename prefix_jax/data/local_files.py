"""Local .jsonl / .json / .csv / .parquet files as `Table` rows: UTF-8 checked, every row numbered, every
malformed line a one-line error naming the file and the line."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Mapping

from prefix_jax.data.records import DataError, Table, with_article


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
                            f"{with_article(type(record).__name__)}.")
        rows.append((f"line {number}", record))
    return rows


def json_document(text: str, origin: str) -> Any:
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
        return json_document(text, origin)  # raises, naming line and column
    if isinstance(document, dict):  # a single object: one row
        return [("record 1", document)]
    if not isinstance(document, list):
        raise DataError(f"{origin}: expected a list of JSON objects, got {with_article(type(document).__name__)}.")
    for number, record in enumerate(document, 1):
        if not isinstance(record, dict):
            raise DataError(f"{origin} record {number}: expected a JSON object {{\"field\": ...}}, got "
                            f"{with_article(type(record).__name__)}.")
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


def local_split_file(files: Mapping[str, str], split: str) -> tuple[Path, str]:
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
