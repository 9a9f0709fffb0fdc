"""Datasets -> examples -> token ids -> fixed-shape batches, one process's share at a time.

Reading: `datasets.load_dataset` for the Hub, or local json/jsonl/csv files; table-to-text formats
are linearized the paper's way (`field : value | ...`, `s : r : o | ...`). Batches have static
shapes (no recompiles), are drawn by a seeded per-epoch permutation, and are addressed by step, so a
resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

FORMATS = ("fields", "e2e", "dart", "webnlg")


class DataError(ValueError):
    """A dataset could not be read or does not have the configured fields."""


@dataclasses.dataclass(frozen=True)
class Example:
    source: str
    target: str
    references: tuple[str, ...] = ()  # every reference of this source (evaluation)


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


def _group_references(pairs: Sequence[tuple[str, str]]) -> list[Example]:
    """One example per (source, reference) pair, each knowing all references of its source."""
    refs: dict[str, list[str]] = collections.defaultdict(list)
    for source, target in pairs:
        refs[source].append(target)
    return [Example(source, target, tuple(refs[source])) for source, target in pairs]


def read_e2e_csv(path: str | Path) -> list[Example]:
    """The E2E challenge csv (`mr,ref`; one row per reference)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"mr", "ref"} <= set(rows[0]):
        raise DataError(f"{path}: expected an E2E csv with columns mr,ref.")
    return _group_references([(linearize_e2e(r["mr"]), r["ref"].strip()) for r in rows])


def read_dart_json(path: str | Path) -> list[Example]:
    """A DART json file (a list of `{tripleset, annotations: [{text}]}`)."""
    records = json.loads(Path(path).read_text(encoding="utf-8"))
    pairs = []
    for record in records:
        source = linearize_triples(record["tripleset"])
        pairs.extend((source, a["text"].strip()) for a in record["annotations"])
    return _group_references(pairs)


def _hub_or_files(name: str | None, config_name: str | None, data_files: Mapping[str, str] | None, split: str):
    """A `datasets.Dataset` from the Hub or from local files, with clear errors for either."""
    import datasets

    if data_files:
        path = _local(data_files, split)
        builder = "csv" if path.suffix == ".csv" else "json"
        return datasets.load_dataset(builder, data_files={split: str(path)}, split=split)
    if not name:
        raise DataError("set data.name (a Hugging Face dataset id) or data.data_files (local files).")
    try:
        return datasets.load_dataset(name, config_name, split=split)
    except Exception as e:
        raise DataError(
            f"data.name={name!r} split {split!r} could not be loaded ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Offline? On a machine with internet run "
            f"`datasets.load_dataset({name!r}).save_to_disk(...)` or export the splits to jsonl, then set "
            "data.data_files={'train': ..., 'validation': ...} and data.source_field/target_field."
        ) from e


def read_examples(data: Any, split: str) -> list[Example]:
    """The examples of one split as the data config describes them (see configs/*.py `data`)."""
    fmt = data.format
    if fmt not in FORMATS:
        raise DataError(f"data.format={fmt!r} is not one of {FORMATS}.")
    files = dict(data.data_files or {})
    if fmt == "e2e" and files:
        return read_e2e_csv(_local(files, split))
    if fmt == "dart" and files and str(files.get(split, "")).endswith(".json"):
        return read_dart_json(_local(files, split))
    table = _hub_or_files(data.name, data.config_name, files, split)
    if fmt == "fields":
        missing = [f for f in (data.source_field, data.target_field) if f not in table.column_names]
        if missing:
            raise DataError(f"split {split!r} has no column(s) {missing}; it has {table.column_names}. Set "
                            "data.source_field / data.target_field.")
        return _group_references([(str(r[data.source_field]), str(r[data.target_field]).strip()) for r in table])
    return _table_to_text_from_hub(fmt, table, split)


def _local(files: Mapping[str, str], split: str) -> Path:
    if split not in files:
        raise DataError(f"data.data_files has no {split!r} entry (has {sorted(files)}).")
    path = Path(files[split])
    if not path.is_file():
        raise DataError(f"data.data_files.{split}={str(path)!r}: no such file.")
    return path


def _table_to_text_from_hub(fmt: str, table: Any, split: str) -> list[Example]:
    """Hub layouts of E2E (`e2e_nlg`, `GEM/e2e_nlg`), DART (`dart`, `GEM/dart`), WebNLG (`GEM/web_nlg`)."""
    cols = set(table.column_names)
    pairs: list[tuple[str, str]] = []
    for r in table:
        if fmt == "e2e":
            source = linearize_e2e(r["meaning_representation"])
            targets = [r["human_reference"]] if "human_reference" in cols else [r["target"]]
        elif fmt == "dart":
            source = linearize_triples(r["tripleset"])
            targets = r["annotations"]["text"] if "annotations" in cols else [r["target"]]
        else:  # webnlg: GEM/web_nlg gives `input` as ["s | r | o", ...]
            if "input" not in cols:
                raise DataError(f"data.format='webnlg' expects GEM/web_nlg's columns; split {split!r} has "
                                f"{sorted(cols)}.")
            source = linearize_triples([t.split(" | ") for t in r["input"]])
            targets = [r["target"]]
        pairs.extend((source, t.strip()) for t in targets)
    return _group_references(pairs)


# --- Tokenization ---


@dataclasses.dataclass
class TokenizedSplit:
    """Token ids of a split; ragged until batched."""

    source_ids: list[list[int]]
    target_ids: list[list[int]]
    examples: list[Example]

    def __len__(self) -> int:
        return len(self.source_ids)


def load_tokenizer(path_or_name: str) -> Any:
    """`transformers.AutoTokenizer` for a model directory or Hub id."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path_or_name)
    except Exception as e:
        raise DataError(f"no tokenizer could be loaded from {path_or_name!r} ({type(e).__name__}); the model "
                        "directory must hold tokenizer files, or set model.tokenizer to a directory that does.") from e


def tokenize(examples: Sequence[Example], tokenizer: Any, max_source_length: int, max_target_length: int,
             encoder_decoder: bool, source_prefix: str = "", target_prefix: str = "") -> TokenizedSplit:
    """Source and target ids, truncated. Encoder-decoders get the tokenizer's special tokens (T5: `</s>`,
    BART: `<s> ... </s>`); decoder-only targets end with EOS (the separator is added by the model)."""
    sources = [source_prefix + e.source for e in examples]
    targets = [target_prefix + e.target for e in examples]
    if encoder_decoder:
        src = tokenizer(sources, truncation=True, max_length=max_source_length)["input_ids"]
        tgt = tokenizer(targets, truncation=True, max_length=max_target_length)["input_ids"]
    else:
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no eos token; decoder-only targets need one to end generation.")
        src = [ids[:max_source_length] for ids in
               tokenizer(sources, add_special_tokens=False)["input_ids"]]
        tgt = [ids[:max_target_length - 1] + [tokenizer.eos_token_id] for ids in
               tokenizer(targets, add_special_tokens=False)["input_ids"]]
    return TokenizedSplit(list(src), list(tgt), list(examples))


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

    def __post_init__(self) -> None:
        if self.global_batch_size % self.process_count:
            raise DataError(f"train.batch_size={self.global_batch_size} must be a multiple of the number of "
                            f"processes ({self.process_count}).")

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.process_count

    @property
    def steps_per_epoch(self) -> int:
        return len(self.split) // self.global_batch_size

    def position(self, step: int) -> dict[str, int]:
        """Where in the data step `step` reads: epoch and batch within the epoch."""
        return {"epoch": step // self.steps_per_epoch, "batch": step % self.steps_per_epoch}

    def _rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        local = np.array_split(indices, self.process_count)[self.process_index]
        src_ids, src_mask = pad([self.split.source_ids[i] for i in local], self.source_width, self.pad_id,
                                self.left_pad_source)
        tgt_ids, tgt_mask = pad([self.split.target_ids[i] for i in local], self.target_width, self.pad_id, False)
        return {"source_ids": src_ids, "source_mask": src_mask, "target_ids": tgt_ids, "target_mask": tgt_mask}

    def train_batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of the global batch of `step` (epochs reshuffle with seed (seed, epoch))."""
        if self.steps_per_epoch == 0:
            raise DataError(f"the training split has {len(self.split)} examples, fewer than one batch of "
                            f"train.batch_size={self.global_batch_size}.")
        pos = self.position(step)
        order = np.random.default_rng([self.seed, pos["epoch"]]).permutation(len(self.split))
        start = pos["batch"] * self.global_batch_size
        return self._rows(order[start:start + self.global_batch_size])

    def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
        """Every example once, in order; the last batch is filled with fully masked rows."""
        n = len(self.split)
        for start in range(0, n, self.global_batch_size):
            indices = np.arange(start, min(start + self.global_batch_size, n))
            batch = self._rows(indices)
            short = self.local_batch_size - batch["source_ids"].shape[0]
            if short:
                batch = {k: np.concatenate([v, np.zeros((short, v.shape[1]), v.dtype)]) for k, v in batch.items()}
            yield batch
