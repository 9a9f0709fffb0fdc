"""Bad inputs stop with one line naming the file (and row) or the config field — data files, model
directories, tokenizers, paths and Hub access — and loading-script datasets fall back to their Parquet export."""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
from pathlib import Path
from typing import Callable

import ml_collections
import pytest

from prefix_jax import data
from prefix_jax import hub
from prefix_jax.models import load_pretrained

BUNDLED_TOKENIZER = Path(__file__).resolve().parent.parent / "data" / "gpt2-tokenizer"  # GPT-2's vocab + merges

E2E_MR = "name[Zizzi], eatType[pub]"


def data_config(files=None, fmt="fields", name="", config_name="", source="src", target="tgt", task=""):
    return ml_collections.ConfigDict(dict(name=name, config_name=config_name, data_files=files or {}, format=fmt,
                                          source_field=source, target_field=target, task_field=task))


def write(tmp: Path, filename: str, content: str | bytes) -> Path:
    path = tmp / filename
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def jsonl(*rows) -> str:
    return "\n".join(json.dumps(r) for r in rows) + "\n"


GOOD = {"src": "a source", "tgt": "a target"}

# (id, file name, content, data config kwargs, substrings the message must hold)
DATA_CASES = [
    ("jsonl-null-target", "t.jsonl", jsonl(GOOD, {"src": "x", "tgt": None}), {},
     ["line 2", "'tgt'", "data.target_field", "null"]),
    ("jsonl-missing-target", "t.jsonl", jsonl(GOOD, {"src": "x"}), {}, ["line 2", "'tgt'", "data.target_field"]),
    ("jsonl-int-target", "t.jsonl", jsonl({"src": "x", "tgt": 123}), {}, ["line 1", "'tgt'", "int", "123"]),
    ("jsonl-float-source", "t.jsonl", jsonl(GOOD, GOOD, {"src": 1.5, "tgt": "y"}), {},
     ["line 3", "data.source_field", "float"]),
    ("jsonl-bool-source", "t.jsonl", jsonl({"src": True, "tgt": "y"}), {}, ["line 1", "data.source_field", "bool"]),
    ("jsonl-list-target", "t.jsonl", jsonl({"src": "x", "tgt": ["a", "b"]}), {},
     ["line 1", "data.target_field", "list"]),
    ("jsonl-empty-source", "t.jsonl", jsonl(GOOD, {"src": "", "tgt": "y"}), {},
     ["line 2", "data.source_field", "empty"]),
    ("jsonl-blank-target", "t.jsonl", jsonl({"src": "x", "tgt": "   "}), {}, ["line 1", "data.target_field", "empty"]),
    ("jsonl-malformed-line", "t.jsonl", jsonl(GOOD) + '{"src": "x", "tgt": \n', {}, ["line 2", "not valid JSON"]),
    ("jsonl-not-an-object", "t.jsonl", jsonl(GOOD, ["x", "y"]), {}, ["line 2", "JSON object", "list"]),
    ("jsonl-empty-file", "t.jsonl", "", {}, ["t.jsonl", "empty"]),
    ("jsonl-whitespace-only", "t.jsonl", "\n \n", {}, ["t.jsonl", "empty"]),
    ("jsonl-not-utf8", "t.jsonl", jsonl(GOOD).encode() + '{"src": "caf\xe9", "tgt": "y"}\n'.encode("latin-1"), {},
     ["t.jsonl", "UTF-8", "line 2"]),
    ("jsonl-wrong-column", "t.jsonl", jsonl({"doc": "x", "tgt": "y"}), {}, ["'src'", "data.source_field", "doc"]),
    ("json-null-target", "t.json", json.dumps([GOOD, {"src": "x", "tgt": None}]), {}, ["t.json", "record 2", "null"]),
    ("json-truncated", "t.json", json.dumps([GOOD, GOOD])[:-5], {}, ["t.json", "not valid JSON", "line 1"]),
    ("json-not-a-list", "t.json", "42", {}, ["t.json", "list of JSON objects", "int"]),
    ("json-empty-list", "t.json", "[]", {}, ["t.json", "no rows"]),
    ("csv-empty-file", "t.csv", "", {}, ["t.csv", "empty"]),
    ("csv-header-only", "t.csv", "src,tgt\n", {}, ["t.csv", "no rows"]),
    ("csv-extra-field", "t.csv", "src,tgt\na,b\nc,d,e\n", {}, ["t.csv", "row 2", "more fields"]),
    ("csv-missing-field", "t.csv", "src,tgt\na\n", {}, ["t.csv", "row 1", "fewer fields"]),
    ("csv-empty-target", "t.csv", "src,tgt\na,b\nc,\n", {}, ["t.csv", "row 2", "data.target_field", "empty"]),
    ("csv-not-utf8", "t.csv", "src,tgt\n".encode() + "caf\xe9,b\n".encode("latin-1"), {}, ["t.csv", "UTF-8", "line 2"]),
    ("csv-nul-byte", "t.csv", "src,tgt\na\x00,b\n", {}, ["t.csv", "NUL byte", "line 2"]),
    ("csv-unterminated-quote", "t.csv", 'src,tgt\n"a,b\n', {}, ["t.csv", "row 1 (from line 2)", "not valid CSV"]),
    ("jsonl-utf16", "t.jsonl", jsonl(GOOD).encode("utf-16-le"), {}, ["t.jsonl", "NUL byte"]),
    ("txt-unsupported", "t.txt", "hello\n", {}, ["t.txt", "unsupported file type"]),
    ("parquet-corrupt", "t.parquet", b"PAR1 this is not parquet", {}, ["t.parquet", "Parquet"]),
    ("e2e-bad-mr", "e2e.csv", "mr,ref\n\"name[A], area[B]\",ok\nno slots,ok\n", {"fmt": "e2e"},
     ["e2e.csv", "row 2", "meaning representation"]),
    ("e2e-empty-ref", "e2e.csv", f"mr,ref\n\"{E2E_MR}\",\n", {"fmt": "e2e"}, ["e2e.csv", "row 1", "'ref'", "empty"]),
    ("e2e-wrong-columns", "e2e.jsonl", jsonl({"mr": E2E_MR}), {"fmt": "e2e"}, ["e2e.jsonl", "meaning_representation"]),
    ("dart-no-annotations", "dart.json", json.dumps([{"tripleset": [["a", "b", "c"]]}]), {"fmt": "dart"},
     ["dart.json", "record 1", "annotations"]),
    ("dart-bad-triple", "dart.json", json.dumps([{"tripleset": [["a", "b"]], "annotations": [{"text": "t"}]}]),
     {"fmt": "dart"}, ["dart.json", "record 1", "tripleset"]),
    ("dart-null-text", "dart.json", json.dumps([{"tripleset": [["a", "b", "c"]], "annotations": [{"text": None}]}]),
     {"fmt": "dart"}, ["dart.json", "record 1", "annotation 1", "null"]),
    ("csv-duplicate-column", "t.csv", "src,tgt,src\na,b,c\n", {}, ["t.csv", "'src'", "more than once"]),
    *[(f"task-{name}", "t.jsonl", jsonl({**GOOD, "task": "ok"}, {**GOOD, "task": task}), {"task": "task"},
       ["line 2", repr(task)[:40], "data.task_field", "export/<task>/"])
      for name, task in (("parent", "../../escape"), ("absolute", "/abs/path/of/another/export"), ("dot", "."),
                         ("dotdot", ".."), ("slash", "a/b"), ("backslash", "a\\b"), ("hidden", ".git"),
                         ("space", "a b"), ("newline", "a\nb"), ("long", "x" * 101))],
    ("task-empty", "t.jsonl", jsonl({**GOOD, "task": ""}), {"task": "task"}, ["line 1", "data.task_field", "empty"]),
    ("task-case", "t.jsonl", jsonl({**GOOD, "task": "Emails"}, {**GOOD, "task": "emails"}), {"task": "task"},
     ["line 2", "'emails'", "'Emails' (line 1)", "letter case"]),
    ("webnlg-input-not-list", "w.jsonl", jsonl({"input": "a | b | c", "target": "t"}), {"fmt": "webnlg"},
     ["w.jsonl", "line 1", "'input'"]),
]


def assert_one_line(error: BaseException, *needles: str) -> str:
    message = str(error)
    assert "\n" not in message and message.strip() == message, repr(message)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


@pytest.mark.parametrize("case", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data_file_is_one_line_naming_file_row_and_field(tmp_path, case):
    _, filename, content, kwargs, needles = case
    path = write(tmp_path, filename, content)
    config = data_config({"train": str(path)}, **kwargs)
    with pytest.raises(data.DataError) as info:
        data.read_examples(config, "train")
    assert_one_line(info.value, "data.data_files.train", *needles)


def test_a_fifo_as_data_file_is_named_as_such(tmp_path):
    os.mkfifo(tmp_path / "t.jsonl")
    with pytest.raises(data.DataError) as info:
        data.read_examples(data_config({"train": str(tmp_path / "t.jsonl")}), "train")
    assert_one_line(info.value, "data.data_files.train", "named pipe")


def test_truncation_is_logged_per_split(caplog, tiny_t5_dir):
    tokenizer = data.load_tokenizer(str(tiny_t5_dir))
    examples = [data.Example("a " * 100, "b"), data.Example("a", "b " * 50), data.Example("a", "b")]
    for encoder_decoder in (False, True):
        caplog.clear()
        with caplog.at_level("WARNING", logger="prefix_jax"):
            split = data.tokenize(examples, tokenizer, 16, 8, encoder_decoder, name="split 'train'")
        assert [len(s) for s in split.source_ids][0] == 16 and max(len(t) for t in split.target_ids) == 8
        if encoder_decoder:  # the tokenizer's own truncation, special tokens kept
            assert split.source_ids == tokenizer([e.source for e in examples], truncation=True, max_length=16)[
                "input_ids"]
        assert "split 'train': 1 of 3 sources are longer than data.max_source_length=16" in caplog.text
        assert "split 'train': 1 of 3 targets are longer than data.max_target_length=8" in caplog.text


def test_good_rows_are_read_exactly(tmp_path):
    """The control for the table above: the same readers accept well-formed files of each type."""
    rows = [{"src": "one", "tgt": " uno "}, {"src": "two", "tgt": "dos"}]
    separated = data.read_examples(data_config({"train": str(write(tmp_path, "u.jsonl", jsonl(
        {"src": "a\u2028b", "tgt": "c"}, {"src": "d", "tgt": "e"}).replace("\\u2028", "\u2028")))}), "train")
    assert [e.source for e in separated] == ["a\u2028b", "d"]  # a raw U+2028 inside a JSON string is not a new line
    for name, content in [("a.jsonl", jsonl(*rows)), ("a.json", json.dumps(rows)), ("b.json", jsonl(*rows)),
                          ("a.csv", "src,tgt\none, uno \ntwo,dos\n")]:
        examples = data.read_examples(data_config({"train": str(write(tmp_path, name, content))}), "train")
        assert [(e.source, e.target) for e in examples] == [("one", "uno"), ("two", "dos")], name


def test_paths_and_splits_are_named(tmp_path, monkeypatch):
    with pytest.raises(data.DataError) as info:
        data.read_examples(data_config({"train": str(tmp_path / "nope.jsonl")}), "train")
    assert_one_line(info.value, "data.data_files.train", "no such file")
    with pytest.raises(data.DataError) as info:
        data.read_examples(data_config({"train": str(tmp_path)}), "train")
    assert_one_line(info.value, "data.data_files.train", "is a directory")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "datasets").mkdir()
    for name in ["./my_data", "/no/such/dataset", "~/no_such_dataset_dir", "datasets/mine", "a/b/c"]:
        with pytest.raises(data.DataError) as info:  # HF_HUB_OFFLINE is not what stops these: no Hub call at all
            data.read_examples(data_config(name=name), "train")
        assert_one_line(info.value, "data.name", "no such directory")
    (tmp_path / "empty_dataset").mkdir()
    with pytest.raises(data.DataError) as info:
        data.read_examples(data_config(name=str(tmp_path / "empty_dataset")), "train")
    assert_one_line(info.value, "data.name", "local dataset directory could not be loaded", "data.data_files.train")


# --- Model directories ---


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    """A tiny GPT-2 saved by `save_pretrained`, with the bundled GPT-2 tokenizer beside it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    directory = tmp_path_factory.mktemp("gpt2")
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(directory)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(BUNDLED_TOKENIZER / name, directory / name)
    return directory


def copy_model(src: Path, tmp: Path) -> Path:
    dst = tmp / "model"
    shutil.copytree(src, dst)
    return dst


def shard(model: Path, drop_second: bool = False) -> None:
    """Rewrites model.safetensors as two shards + index; optionally loses the second shard."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(model / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for filename, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, str(model / filename))
    (model / "model.safetensors").unlink()
    (model / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, keys in halves.items() for k in keys}}))
    if drop_second:
        (model / "model-00002-of-00002.safetensors").unlink()


def edit_config(model: Path, **changes) -> None:
    config = json.loads((model / "config.json").read_text())
    config.update(changes)
    for key, value in list(config.items()):
        if value is None:
            del config[key]
    (model / "config.json").write_text(json.dumps(config))


def truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


# (id, how to break a copy of the good model dir, substrings the message must hold)
MODEL_CASES: list[tuple[str, Callable[[Path], None], list[str]]] = [
    ("config-not-json", lambda m: write(m, "config.json", '{"model_type": "gpt2", '),
     ["config.json", "not valid JSON"]),
    ("config-not-object", lambda m: write(m, "config.json", "[1, 2]"), ["config.json", "JSON object"]),
    ("config-no-model-type", lambda m: edit_config(m, model_type=None), ["config.json", "model_type"]),
    ("config-unknown-model-type", lambda m: edit_config(m, model_type="no_such_arch"),
     ["config.json", "'no_such_arch'", "not supported"]),
    ("config-unsupported-model-type", lambda m: edit_config(m, model_type="bert"), ["config.json", "'bert'"]),
    ("config-not-utf8", lambda m: write(m, "config.json", b'{"model_type": "gpt2\xff"}'), ["config.json", "UTF-8"]),
    ("config-missing", lambda m: (m / "config.json").unlink(), ["model.name_or_path", "config.json"]),
    ("safetensors-truncated-header", lambda m: truncate(m / "model.safetensors", 20),
     ["model.safetensors", "truncated or corrupt"]),
    ("safetensors-truncated-data", lambda m: truncate(m / "model.safetensors",
                                                      (m / "model.safetensors").stat().st_size - 100),
     ["model.safetensors", "truncated or corrupt"]),
    ("safetensors-garbage", lambda m: write(m, "model.safetensors", b"\x00" * 64), ["model.safetensors", "corrupt"]),
    ("safetensors-empty", lambda m: write(m, "model.safetensors", b""), ["model.safetensors", "corrupt"]),
    ("shard-missing", lambda m: shard(m, drop_second=True),
     ["model.safetensors.index.json", "model-00002-of-00002.safetensors", "missing"]),
    ("shard-index-not-json", lambda m: (shard(m), write(m, "model.safetensors.index.json", "{")),
     ["model.safetensors.index.json", "not valid JSON"]),
    ("shard-index-no-weight-map", lambda m: (shard(m), write(m, "model.safetensors.index.json", "{}")),
     ["model.safetensors.index.json", "weight_map"]),
    ("shard-truncated", lambda m: (shard(m), truncate(m / "model-00001-of-00002.safetensors", 30)),
     ["model-00001-of-00002.safetensors", "truncated or corrupt"]),
    ("no-weights", lambda m: (m / "model.safetensors").unlink(), ["model.safetensors"]),
    ("pickle-only", lambda m: (m / "model.safetensors").rename(m / "pytorch_model.bin"),
     ["pytorch_model.bin", "unpickling"]),
    ("tensor-shape-contradicts-config", lambda m: edit_config(m, n_embd=32), ["config.json"]),
]


@pytest.mark.parametrize("case", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_bad_model_dir_is_one_line_naming_the_file(gpt2_dir, tmp_path, case):
    _, breakage, needles = case
    model = copy_model(gpt2_dir, tmp_path)
    breakage(model)
    with pytest.raises(ValueError) as info:
        load_pretrained(str(model))
    assert isinstance(info.value, hub.ModelNotFoundError), type(info.value)
    assert_one_line(info.value, *needles)


@pytest.mark.parametrize("case", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_the_sharded_loader_train_py_uses_keeps_the_same_promise(gpt2_dir, tmp_path, case):
    """train.py loads through `sharded_load` (straight into shards), not `load_pretrained`: same files, same
    one-line errors."""
    from prefix_jax import sharding
    from prefix_jax.models import sharded_load

    _, breakage, needles = case
    model = copy_model(gpt2_dir, tmp_path)
    breakage(model)
    with pytest.raises(ValueError) as info:
        sharded_load.load_sharded(str(model), sharding.make_mesh())
    assert isinstance(info.value, hub.ModelNotFoundError), type(info.value)
    assert_one_line(info.value, *needles)


def test_good_model_dir_and_sharded_copy_load_the_same(gpt2_dir, tmp_path):
    """The control for the table above (and: the sharded layout the table breaks is read right)."""
    import numpy as np

    whole = load_pretrained(str(gpt2_dir))
    model = copy_model(gpt2_dir, tmp_path)
    shard(model)
    sharded = load_pretrained(str(model))
    import jax

    assert jax.tree.all(jax.tree.map(np.array_equal, whole.params, sharded.params))


def test_local_looking_model_paths_never_reach_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "weights.safetensors").write_bytes(b"x")
    called = []
    monkeypatch.setattr(hub, "download", lambda *a, **k: called.append(a))
    for name in ["./mymodel", "../mymodel", "/abs/mymodel", "~/mymodel", "runs/mymodel", "a/b/c", "my model",
                 "mymodel/"]:
        with pytest.raises(hub.ModelNotFoundError) as info:
            hub.resolve_model_dir(name)
        assert_one_line(info.value, "model.name_or_path", repr(name), "no such directory")
    with pytest.raises(hub.ModelNotFoundError) as info:
        hub.resolve_model_dir("weights.safetensors")
    assert_one_line(info.value, "is a file")
    assert called == []
    # Hub ids (a dot in the name included) do go to the Hub.
    for name in ["gpt2", "google-t5/t5-base", "EleutherAI/pythia-1.4b"]:
        assert not hub.looks_local(name), name


# --- Tokenizers ---


def test_model_dir_without_tokenizer_files_is_refused(gpt2_dir, tmp_path):
    """`save_pretrained` of a model alone: transformers would build an empty tokenizer (GPT-2: every text empty)."""
    model = copy_model(gpt2_dir, tmp_path)
    for name in ("vocab.json", "merges.txt"):
        (model / name).unlink()
    load_pretrained(str(model))  # the model itself is fine
    with pytest.raises(data.DataError) as info:
        data.load_tokenizer(str(model))
    assert_one_line(info.value, "model.tokenizer", "model.name_or_path", "no tokenizer files", str(model))


def test_t5_dir_without_tokenizer_files_is_refused(tmp_path):
    """T5's garbage tokenizer maps every word to `<unk>`; refused before it is built."""
    from transformers import T5Config

    T5Config(vocab_size=64, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2).save_pretrained(tmp_path)
    with pytest.raises(data.DataError) as info:
        data.load_tokenizer(str(tmp_path))
    assert_one_line(info.value, "model.tokenizer", "no tokenizer files")


def test_broken_tokenizer_files_fail_the_sanity_check(gpt2_dir, tmp_path):
    """Tokenizer files present but useless (a config without vocabulary): the probe text does not round-trip."""
    model = copy_model(gpt2_dir, tmp_path)
    for name in ("vocab.json", "merges.txt"):
        (model / name).unlink()
    write(model, "tokenizer_config.json", json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    with pytest.raises(data.DataError) as info:
        data.load_tokenizer(str(model))
    assert_one_line(info.value, "model.tokenizer", str(model))


def test_good_tokenizer_passes_and_missing_paths_are_named(gpt2_dir, tmp_path, monkeypatch):
    tokenizer = data.load_tokenizer(str(gpt2_dir))
    assert tokenizer.decode(tokenizer("Hello world")["input_ids"]) == "Hello world"
    # No false alarms: a byte-level tokenizer without vocabulary files, an uncased WordPiece one.
    import transformers

    transformers.ByT5Tokenizer().save_pretrained(tmp_path / "byt5")
    byt5 = data.load_tokenizer(str(tmp_path / "byt5"))
    assert byt5.decode(byt5("Hello", add_special_tokens=False)["input_ids"]) == "Hello"
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz0123456789.",
              *("##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789")]
    transformers.BertTokenizer(vocab={p: i for i, p in enumerate(pieces)}).save_pretrained(tmp_path / "bert")
    uncased = data.load_tokenizer(str(tmp_path / "bert"))
    assert uncased.decode(uncased("The Fox 42.", add_special_tokens=False)["input_ids"]) == "the fox 42."
    monkeypatch.chdir(tmp_path)
    with pytest.raises(data.DataError) as info:
        data.load_tokenizer("./no_tokenizer_here", field="model.tokenizer")
    assert_one_line(info.value, "model.tokenizer", "no such directory")


# --- Loading-script datasets: the Parquet export ---


def write_export(root: Path, config: str, split_dirs: dict[str, list[dict]]) -> None:
    """Parquet files laid out as the Hub's `refs/convert/parquet` revision lays them out:
    `{config}/{split}/0000.parquet` (with the `datasets` feature metadata the export carries)."""
    import datasets

    for split_dir, rows in split_dirs.items():
        (root / config / split_dir).mkdir(parents=True)
        datasets.Dataset.from_list(rows).to_parquet(str(root / config / split_dir / "0000.parquet"))


def e2e_rows(n: int, tag: str) -> list[dict]:
    return [{"gem_id": f"{tag}-{i}", "meaning_representation": f"name[Place {i}], eatType[pub]",
             "target": f"Place {i} is a pub.", "references": []} for i in range(n)]


def test_loading_script_dataset_falls_back_to_parquet_export(tmp_path):
    import datasets

    repo = tmp_path / "e2e_nlg"  # as GEM/e2e_nlg: a loading script `e2e_nlg.py` on the main branch
    repo.mkdir()
    (repo / "e2e_nlg.py").write_text("import datasets\n# a loading script: datasets>=4 refuses to run it\n")
    with pytest.raises(RuntimeError, match="scripts are no longer supported"):
        datasets.load_dataset(str(repo), split="train")  # the refusal the fallback keys on
    write_export(repo, "e2e_nlg", {"train": e2e_rows(3, "train"), "validation": e2e_rows(2, "val"),
                                   "partial-test": e2e_rows(1, "test")})
    train = data.read_examples(data_config(name=str(repo), fmt="e2e"), "train")
    assert [(e.source, e.target) for e in train] == [
        (f"name : Place {i} | eatType : pub", f"Place {i} is a pub.") for i in range(3)]
    assert len(data.read_examples(data_config(name=str(repo), fmt="e2e"), "validation")) == 2
    assert len(data.read_examples(data_config(name=str(repo), fmt="e2e"), "test")) == 1  # partial-test
    with pytest.raises(data.DataError) as info:
        data.read_examples(data_config(name=str(repo), fmt="e2e"), "dev")
    assert_one_line(info.value, "data.name", "'dev'", "refs/convert/parquet", "train", "validation")


def test_hub_parquet_export_address():
    """For a Hub id the same listing runs on the `refs/convert/parquet` revision (nothing is fetched here)."""
    from huggingface_hub.utils import parse_hf_uri

    _, root, url = data.parquet_export_location("GEM/e2e_nlg")
    uri = parse_hf_uri(f"{url}/e2e_nlg/train/0000.parquet")
    assert (uri.type, uri.id, uri.revision, uri.path_in_repo) == (
        "dataset", "GEM/e2e_nlg", "refs/convert/parquet", "e2e_nlg/train/0000.parquet")
    assert url == f"hf://{root}"


def test_parquet_export_with_several_subsets_needs_config_name(tmp_path):
    repo = tmp_path / "web_nlg"  # as GEM/web_nlg: subsets `en` and `ru`
    repo.mkdir()
    (repo / "web_nlg.py").write_text("# loading script\n")
    row = lambda lang: {"input": ["Aarhus | country | Denmark"], "target": f"{lang}: Aarhus is in Denmark."}
    write_export(repo, "en", {"train": [row("en")]})
    write_export(repo, "ru", {"train": [row("ru")]})
    with pytest.raises(data.DataError) as info:
        data.read_examples(data_config(name=str(repo), fmt="webnlg"), "train")
    assert_one_line(info.value, "data.config_name", "'en'", "'ru'")
    (example,) = data.read_examples(data_config(name=str(repo), config_name="ru", fmt="webnlg"), "train")
    assert example.source == "Aarhus : country : Denmark" and example.target == "ru: Aarhus is in Denmark."


def test_rows_of_a_hub_layout_are_checked_too(tmp_path):
    """A null target in the (Parquet) export of a dataset is named by its row, not trained on as 'None'."""
    repo = tmp_path / "e2e_nlg"
    repo.mkdir()
    (repo / "e2e_nlg.py").write_text("# loading script\n")
    rows = e2e_rows(3, "train")
    rows[1]["target"] = None
    write_export(repo, "e2e_nlg", {"train": rows})
    with pytest.raises(data.DataError) as info:
        data.read_examples(data_config(name=str(repo), fmt="e2e"), "train")
    assert_one_line(info.value, "data.name", "row 2", "'target'", "null")


# --- Hub access times out ---


@pytest.fixture
def black_hole(monkeypatch):
    """A Hub endpoint that accepts connections and never answers (a firewall dropping packets)."""
    import datasets
    from huggingface_hub import constants

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 1)
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 1)
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", endpoint)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    yield
    server.close()


def error_within(seconds: float, fn: Callable[[], object]) -> BaseException:
    """The exception `fn` raises, failing the test if it takes longer than `seconds` (a hang)."""
    outcome: list = []

    def target() -> None:
        try:
            fn()
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            outcome.append(e)

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(seconds)
    assert outcome, f"still waiting for the Hub after {seconds} s"
    assert outcome[0] is not None, "expected an error"
    return outcome[0]


def test_unreachable_hub_times_out_with_a_clear_error(black_hole, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    error = error_within(30, lambda: hub.resolve_model_dir("someone/some-model"))
    assert isinstance(error, hub.ModelNotFoundError)
    assert_one_line(error, "model.name_or_path", "no answer within 1 s", "--local-dir", "HF_HUB_ETAG_TIMEOUT")
    error = error_within(30, lambda: data.load_tokenizer("someone/some-tokenizer", field="model.tokenizer"))
    assert isinstance(error, data.DataError)
    assert_one_line(error, "model.tokenizer", "no answer within 1 s")
    error = error_within(30, lambda: data.read_examples(data_config(name="someone/some-dataset"), "train"))
    assert isinstance(error, data.DataError)
    assert_one_line(error, "data.name", "no answer within 1 s", "data.data_files")
