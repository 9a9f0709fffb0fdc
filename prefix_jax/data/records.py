"""What every reader produces: `Table` rows (each with its location), checked text fields, and `Example`s."""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Iterable, Mapping, Sequence


class DataError(ValueError):
    """A dataset could not be read or does not have the configured fields."""


@dataclasses.dataclass(frozen=True)
class Example:
    source: str
    target: str
    references: tuple[str, ...] = ()  # every reference of this source (evaluation)
    task: str = ""  # multi-task data (`data.task_field`): which prefix this example trains


@dataclasses.dataclass
class Table:
    """Rows of one split: `origin` names where they come from (a config field and file, or a Hub dataset),
    each row carries its own location (`line 3`, `row 3`)."""

    origin: str
    columns: list[str]
    rows: Iterable[tuple[str, Mapping[str, Any]]]


def as_table(dataset: Any, origin: str) -> Table:
    return Table(origin, list(dataset.column_names), ((f"row {n}", r) for n, r in enumerate(dataset, 1)))


def text_field(record: Mapping[str, Any], key: str, where: str, field: str) -> str:
    """`record[key]` if it is non-empty text; otherwise an error naming the row and the config field."""
    if key not in record:
        raise DataError(f"{where}: has no field {key!r} ({field}); add it to every row or set {field}.")
    value = record[key]
    if value is None:
        raise DataError(f"{where}: field {key!r} ({field}) is null; fill it in or drop the row.")
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} ({field}) is {with_article(type(value).__name__)} "
                        f"({str(value)[:40]!r}), not text; write it as a string in the file or drop the row.")
    if not value.strip():
        raise DataError(f"{where}: field {key!r} ({field}) is empty; fill it in or drop the row.")
    return value


def with_article(noun: str) -> str:
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"


def group_references(pairs: Sequence[tuple[str, str]], tasks: Sequence[str] | None = None) -> list[Example]:
    """One example per (source, reference) pair, each knowing all references of its source (within its task)."""
    tasks = tasks if tasks is not None else [""] * len(pairs)
    refs: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
    for (source, target), task in zip(pairs, tasks):
        refs[task, source].append(target)
    return [Example(source, target, tuple(refs[task, source]), task) for (source, target), task in zip(pairs, tasks)]
