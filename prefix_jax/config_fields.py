"""How a config field is declared once: `option(default, doc, check, resume)` on a frozen dataclass field.

The typed option groups (`run_options`, `generate.GenerationConfig`) declare each field with `option`; from
those declarations come the ml_collections defaults every config starts from (`config_dict`), the per-field
checks (`check_values`) and the fields whose change blocks a resume (`resume_fields`). Nothing here knows a
particular field.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from typing import Any, Callable, Mapping

import ml_collections

# A field's check: (field name, value) -> None when valid, else the one-line message naming field and fix.
Check = Callable[[str, Any], "str | None"]

REPLAY = "replay"  # a change makes a resume inexact: refused unless train.resume_anyway
LAYOUT = "layout"  # a change alters the optimizer state's layout: a resume is impossible


class ConfigError(ValueError):
    """A config value is invalid; the message names the field and the fix."""


def option(default: Any, doc: str, check: Check | None = None, resume: str = "") -> Any:
    """A dataclass field declared once: its `default`, a one-line `doc`, its `check` and whether a change
    blocks a resume (`REPLAY`, `LAYOUT` or "")."""
    metadata = {"doc": doc, "check": check, "resume": resume}
    if isinstance(default, Mapping):
        frozen = dict(default)
        return dataclasses.field(default_factory=lambda: dict(frozen), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def valid_if(test: Callable[[Any], bool], valid: str) -> Check:
    """A check from a test of the value and what a valid value is."""
    return lambda field, v: None if test(v) else f"{field}={v!r} is invalid: it must be {valid}."


def integer(low: int, note: str = "", high: int | None = None) -> Check:
    """An integer >= `low` (and < `high`); `note` says what a special value means."""
    if high is not None:
        return valid_if(lambda v: is_int(v) and low <= v < high, f"an integer in [{low}, {note or high})")
    return valid_if(lambda v: is_int(v) and v >= low, f"an integer >= {low}" + (f" ({note})" if note else ""))


def number(low: float | None = None, *, above: bool = False, below_one: bool = False, note: str = "") -> Check:
    """A finite number (>= `low`, or > `low` with `above`; in [0, 1) with `below_one`)."""
    if below_one:
        return valid_if(lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)")
    if low is None:
        return valid_if(is_number, "a finite number")
    test = (lambda v: is_number(v) and v > low) if above else (lambda v: is_number(v) and v >= low)
    return valid_if(test, f"a finite number {'>' if above else '>='} {low:g}" + (f" ({note})" if note else ""))


def one_of(*choices: Any, valid: str = "") -> Check:
    return valid_if(lambda v: v in choices, valid or f"one of {', '.join(repr(c) for c in choices)}")


def fields_of(cls: type) -> list[dataclasses.Field]:
    return list(dataclasses.fields(cls))


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]


def _optional_type(annotation: Any) -> type | None:
    """`int` for `int | None` (ml_collections needs the type of a field whose default is None)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if len(args) == 1 else None


def _nested(f: dataclasses.Field) -> type | None:
    """The option group a field holds (predict's `model`, `generate`), declared by a default instance of it."""
    return type(f.default) if dataclasses.is_dataclass(f.default) else None


def config_dict(cls: type) -> ml_collections.ConfigDict:
    """The group's declared defaults as a ConfigDict (what `--config.group.field=...` overrides)."""
    hints = typing.get_type_hints(cls)
    group = ml_collections.ConfigDict()
    for f in fields_of(cls):
        value = _default(f)
        if _nested(f) is not None:
            value = config_dict(_nested(f))
        elif value is None:
            value = ml_collections.FieldReference(None, field_type=_optional_type(hints[f.name]))
        elif isinstance(value, dict):
            value = ml_collections.ConfigDict(value)
        group[f.name] = value
    return group


def _name(group: str, field: str) -> str:
    return f"{group}.{field}" if group else field


def check_values(values: Any, cls: type, group: str) -> None:
    """Raises `ConfigError` for the first of `values`' fields (a mapping or an instance of `cls`) that fails its
    declared check. A field `values` lacks is skipped (`typed` reports it)."""
    mapping = isinstance(values, Mapping) or hasattr(values, "keys")
    for f in fields_of(cls):
        if mapping and f.name not in values:
            continue
        value = values[f.name] if mapping else getattr(values, f.name)
        if _nested(f) is not None:
            check_values(value, _nested(f), _name(group, f.name))
        elif f.metadata.get("check") is not None:
            problem = f.metadata["check"](_name(group, f.name), value)
            if problem:
                raise ConfigError(problem)


def _plain(value: Any) -> Any:
    """Nested ConfigDicts as dicts and sequences as tuples: values a frozen dataclass can hold."""
    if hasattr(value, "items"):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return value


def typed(values: Any, cls: type, group: str, kind: str, defaults_file: str) -> Any:
    """An instance of `cls` from the ConfigDict `values`: every declared field present and no other (a typo in a
    config file would otherwise be ignored); nested option groups typed too. Values are not checked here."""
    names = [f.name for f in fields_of(cls)]
    missing = [n for n in names if n not in values]
    if missing:
        raise ConfigError(f"the config has no field {_name(group, missing[0])}; start it from {defaults_file}.")
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"config field {_name(group, unknown[0])} is not a {kind} option "
                          "(prefix_jax/run_options.py); remove it from the config file.")
    return cls(**{f.name: typed(values[f.name], _nested(f), _name(group, f.name), kind, defaults_file)
                  if _nested(f) is not None else _plain(values[f.name]) for f in fields_of(cls)})


def resume_fields(cls: type, group: str, kind: str | None = None) -> tuple[str, ...]:
    """`group.field` of each field whose change blocks a resume (of `kind` only, when given)."""
    return tuple(f"{group}.{f.name}" for f in fields_of(cls)
                 if f.metadata.get("resume") and (kind is None or f.metadata["resume"] == kind))


def docs(cls: type, group: str) -> dict[str, str]:
    """`group.field` -> its one-line doc."""
    return {f"{group}.{f.name}": f.metadata.get("doc", "") for f in fields_of(cls)}
