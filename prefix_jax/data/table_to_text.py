"""Table-to-text formats (E2E, DART, WebNLG), linearized the paper's way: `field : value | ...`, `s : r : o | ...`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

from prefix_jax.data.local_files import decode_text, json_document, read_local_table
from prefix_jax.data.records import DataError, Example, Table, as_table, group_references, text_field


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


def read_e2e_csv(path: str | Path, origin: str | None = None) -> list[Example]:
    """The E2E challenge csv (`mr,ref`; one row per reference)."""
    return e2e_examples(read_local_table(Path(path), origin or str(path)))


def e2e_examples(table: Table) -> list[Example]:
    if not {"mr", "ref"} <= set(table.columns):
        raise DataError(f"{table.origin}: expected an E2E csv with columns mr,ref; it has {table.columns}.")
    pairs = []
    for where, r in table.rows:
        where = f"{table.origin} {where}"
        pairs.append((_e2e_source(text_field(r, "mr", where, "data.format='e2e'"), where),
                      text_field(r, "ref", where, "data.format='e2e'").strip()))
    return group_references(pairs)


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
    records = json_document(decode_text(path.read_bytes(), origin), origin)
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
    return group_references(pairs)


def table_to_text_examples(fmt: str, table: Any, split: str) -> list[Example]:
    """Hub layouts of E2E (`e2e_nlg`, `GEM/e2e_nlg`), DART (`dart`, `GEM/dart`), WebNLG (`GEM/web_nlg`)."""
    if not isinstance(table, Table):
        table = as_table(table, f"split {split!r}")
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
    return group_references(pairs)
