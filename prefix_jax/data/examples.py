"""The examples of a split as the data config describes them: local files or a Hub dataset, in a format."""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from prefix_jax.data.hub_datasets import hub_origin, hub_table
from prefix_jax.data.local_files import local_split_file, read_local_table
from prefix_jax.data.records import DataError, Example, Table, group_references, text_field
from prefix_jax.data.table_to_text import e2e_examples, read_dart_json, table_to_text_examples


FORMATS = ("fields", "e2e", "dart", "webnlg")


def read_examples(data: Any, split: str) -> list[Example]:
    """The examples of one split as the data config (or `run_options.DataOptions`) describes them."""
    fmt = data.format
    if fmt not in FORMATS:
        raise DataError(f"data.format={fmt!r} is not one of {FORMATS}.")
    files = {split: path for split, path in dict(data.data_files or {}).items() if path}  # '' = unset
    if files:
        path, origin = local_split_file(files, split)
        if fmt == "dart" and path.suffix.lower() == ".json":
            examples = read_dart_json(path, origin)
        else:
            table = read_local_table(path, origin)
            if fmt == "e2e" and {"mr", "ref"} <= set(table.columns):
                examples = e2e_examples(table)
            else:
                examples = _examples_of(fmt, table, data)
    else:
        table = hub_table(data.name, data.config_name, split)
        examples = _examples_of(fmt, table, data)
    if not examples:
        raise DataError(f"{origin if files else hub_origin(data.name, data.config_name, split)}: has no rows.")
    return examples


def _examples_of(fmt: str, table: Table, data: Any) -> list[Example]:
    if fmt != "fields":
        return table_to_text_examples(fmt, table, "")
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
    return group_references([
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
