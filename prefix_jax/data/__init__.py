"""Datasets -> examples -> token ids -> fixed-shape batches, one process's share at a time.

One module per job:
  records        `Example`, `Table` (rows with their locations), checked text fields, `DataError`
  local_files    local .jsonl / .json / .csv / .parquet files, every row's fields checked (one-line errors
                 naming file, row and field)
  table_to_text  E2E / DART / WebNLG linearized the paper's way (`field : value | ...`, `s : r : o | ...`)
  hub_datasets   `datasets.load_dataset` for the Hub (loading-script datasets from their Parquet export)
  examples       `read_examples`: a split as the data config describes it (files or Hub, format, tasks)
  tokenizers     tokenizers checked to exist and to round-trip text
  token_ids      tokenize, pad, pack
  buckets        length buckets: the few widths eval and decoding batches are padded to
  batcher        `Batcher`: static-shape batches by step (a resumed run sees exactly the batches an
                 uninterrupted run would have seen)

Callers use `from prefix_jax import data` and the names below (`data.read_examples`, `data.Batcher`, ...).
"""

from __future__ import annotations

from prefix_jax.data.batcher import Batcher
from prefix_jax.data.examples import read_examples
from prefix_jax.data.hub_datasets import parquet_export_location
from prefix_jax.data.local_files import csv_records, decode_text, json_lines
from prefix_jax.data.records import DataError, Example, text_field
from prefix_jax.data.table_to_text import (linearize_e2e, linearize_triples, read_dart_json, read_e2e_csv,
                                           table_to_text_examples)
from prefix_jax.data.token_ids import (TokenizedSplit, pack_rows, packed_batch, packed_encoder_decoder_batch, pad,
                                      padded_lengths, tokenize)
from prefix_jax.data.tokenizers import load_tokenizer

__all__ = [
    "Batcher", "DataError", "Example", "TokenizedSplit", "csv_records", "decode_text", "json_lines",
    "linearize_e2e", "linearize_triples", "load_tokenizer", "pack_rows", "packed_batch",
    "packed_encoder_decoder_batch", "pad", "padded_lengths",
    "parquet_export_location", "read_dart_json", "read_e2e_csv", "read_examples", "table_to_text_examples",
    "text_field", "tokenize",
]
