"""predict: one LM, several exported prefixes, mixed tasks in one input file -> jsonl + scores; bad inputs are
one-line errors naming the file/row or both models."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from prefix_jax import prefix as prefix_lib
from prefix_jax import predict
from prefix_jax.models import load_pretrained

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["name : Alimentum | area : city centre", "name : Aromi | eatType : coffee shop",
           "name : Bibimbap House | food : Chinese | priceRange : cheap", "name : Blue Spice",
           "name : Cotto | near : The Portland Arms | customer rating : high", "name : Zizzi | area : riverside"]


@pytest.fixture(scope="module")
def setup(tiny_gpt2_dir, tmp_path_factory):
    """A tiny GPT-2 (bundled tokenizer) and two exported prefixes of different lengths trained on it."""
    root = tmp_path_factory.mktemp("predict")
    model_dir = tiny_gpt2_dir
    lm = load_pretrained(str(model_dir))
    exports = {}
    for task, length, seed in (("e2e", 3, 0), ("dart", 6, 1)):
        spec = prefix_lib.PrefixSpec(length=length, placements=("decoder",), geometry=lm.config.prefix_geometry(),
                                     hidden_size=lm.config.hidden_size, method="prefix_direct")
        params = jax.tree.map(lambda x: x * 3.0, prefix_lib.init_params(spec, jax.random.key(seed)))
        meta = {"base_model": str(model_dir), "architecture": "gpt2", "model_config": {"positions_after_prefix": True}}
        exports[task] = prefix_lib.export(params, spec, root / task, meta)
    rows = [{"id": f"r{i}", "task": ("e2e", "dart")[i % 2], "source": s, "target": s.split(" : ")[1].split(" |")[0]}
            for i, s in enumerate(SOURCES)]
    inputs = root / "inputs.jsonl"
    inputs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model_dir, exports, inputs, rows, root


def _config(model_dir, prefixes, inputs, output, **changes):
    from configs.predict import get_config

    c = get_config()
    c.model.name_or_path = str(model_dir)
    c.prefixes = prefixes
    c.input = str(inputs)
    c.output = str(output)
    c.batch_size = 4
    c.generate.max_new_tokens = 8
    c.progress = False
    for key, value in changes.items():
        node = c
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return c


def _read(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_mixed_tasks_equal_one_prefix_at_a_time_and_are_scored(setup):
    model_dir, exports, inputs, rows, root = setup
    both = f"e2e={exports['e2e']},dart={exports['dart']}"
    summary = predict.run(_config(model_dir, both, inputs, root / "mixed.jsonl"))
    mixed = _read(root / "mixed.jsonl")
    assert [r["id"] for r in mixed] == [r["id"] for r in rows]  # input order, ids kept
    assert [r["task"] for r in mixed] == [r["task"] for r in rows]
    assert all(set(r) == {"id", "task", "source", "prediction", "references"} for r in mixed)
    assert set(summary["scores"]) == {"e2e", "dart", "all"} and "bleu" in summary["scores"]["all"]

    # Each task alone (its own rows, its own prefix) gives the same predictions.
    for task in ("e2e", "dart"):
        alone_in = root / f"{task}.jsonl"
        alone_in.write_text("".join(json.dumps(r) + "\n" for r in rows if r["task"] == task))
        predict.run(_config(model_dir, str(exports[task]), alone_in, root / f"{task}.out.jsonl"))
        alone = {r["id"]: r["prediction"] for r in _read(root / f"{task}.out.jsonl")}
        assert {r["id"]: r["prediction"] for r in mixed if r["task"] == task} == alone
    # The prefixes steer: the two tasks' prefixes give different outputs for the same sources.
    swapped_in = root / "swapped.jsonl"
    swapped_in.write_text("".join(json.dumps({**r, "task": "dart" if r["task"] == "e2e" else "e2e"}) + "\n"
                                  for r in rows))
    predict.run(_config(model_dir, both, swapped_in, root / "swapped.out.jsonl"))
    assert [r["prediction"] for r in _read(root / "swapped.out.jsonl")] != [r["prediction"] for r in mixed]


def test_csv_and_txt_inputs(setup):
    model_dir, exports, _, rows, root = setup
    csv_in = root / "in.csv"
    csv_in.write_text("source,task\n" + "".join(f"\"{r['source']}\",{r['task']}\n" for r in rows[:3]))
    both = f"e2e={exports['e2e']},dart={exports['dart']}"
    summary = predict.run(_config(model_dir, both, csv_in, root / "csv.out.jsonl"))
    assert summary["rows"] == 3 and summary["scores"] == {}
    txt_in = root / "in.txt"
    txt_in.write_text("\n".join(SOURCES[:2]) + "\n")
    predict.run(_config(model_dir, str(exports["e2e"]), txt_in, root / "txt.out.jsonl"))
    assert [r["source"] for r in _read(root / "txt.out.jsonl")] == SOURCES[:2]


@pytest.mark.parametrize("case,match", [
    ("unknown_task", r"in.jsonl' line 1: task 'webnlg' has no prefix; loaded: \['e2e', 'dart'\]"),
    ("missing_column", r"in.jsonl' line 1: has no field 'task' \(task_field\)"),
    ("missing_source", r"in.jsonl' line 1: has no field 'source' \(source_field\)"),
    ("wrong_base_model", r"trained on base model 'someone/other-gpt2' \(gpt2\), but model.name_or_path is"),
    ("wrong_architecture", r"trained on base model .* \(t5\), but model.name_or_path is .* \(gpt2\)"),
    ("bad_option", r"generate.top_k=3 only applies when sampling"),
])
def test_bad_inputs_are_one_line_errors(setup, case, match, tmp_path):
    model_dir, exports, _, rows, _ = setup
    prefixes = f"e2e={exports['e2e']},dart={exports['dart']}"
    record = {"source": "x", "task": "e2e"}
    changes = {}
    if case == "unknown_task":
        record["task"] = "webnlg"
    elif case == "missing_column":
        record.pop("task")
    elif case == "missing_source":
        record = {"text": "x", "task": "e2e"}
    elif case in ("wrong_base_model", "wrong_architecture"):
        other = tmp_path / "other"
        other.mkdir()
        for name in ("prefix.json", "prefix.safetensors"):
            (other / name).write_bytes((Path(exports["e2e"]) / name).read_bytes())
        meta = json.loads((other / "prefix.json").read_text())
        if case == "wrong_base_model":
            meta["base_model"] = "someone/other-gpt2"
        else:
            meta["architecture"] = "t5"
        (other / "prefix.json").write_text(json.dumps(meta))
        prefixes = str(other)
    else:
        changes["generate.top_k"] = 3
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=match) as err:
        predict.run(_config(model_dir, prefixes, inputs, tmp_path / "out.jsonl", **changes))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.slow  # a predict.py subprocess; the in-process tests above cover what it runs
def test_command_line_reads_stdin_and_exits_2_on_errors(setup, tmp_path):
    model_dir, exports, _, _, _ = setup
    cmd = [sys.executable, str(ROOT / "predict.py"), "--config", str(ROOT / "configs" / "predict.py"),
           f"--config.model.name_or_path={model_dir}", f"--config.prefixes={exports['e2e']}",
           "--config.generate.max_new_tokens=4", "--config.progress=False", "--config.batch_size=2"]
    env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    ok = subprocess.run(cmd, input="\n".join(SOURCES[:3]), capture_output=True, text=True, cwd=tmp_path, env=env,
                        timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    out = [json.loads(line) for line in ok.stdout.splitlines()]
    assert [r["source"] for r in out] == SOURCES[:3] and all(r["task"] == "default" for r in out)
    bad = subprocess.run(cmd + ["--config.input=missing.jsonl"], capture_output=True, text=True, cwd=tmp_path,
                         env=env, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == "error: input='missing.jsonl' is not a file."


def test_checkpoint_workdir_decodes_like_its_export(setup, tmp_path):
    """checkpoint=WORKDIR materializes the latest checkpoint's prefix: same predictions as its export."""
    from prefix_jax import checkpoint

    model_dir, _, _, rows, _ = setup
    lm = load_pretrained(str(model_dir))
    spec = prefix_lib.PrefixSpec(length=4, placements=("decoder",), geometry=lm.config.prefix_geometry(),
                                 hidden_size=lm.config.hidden_size, mlp_hidden=16)  # with its MLP
    params = prefix_lib.init_params(spec, jax.random.key(3))
    meta = {"base_model": str(model_dir), "architecture": "gpt2", "prefix_spec": spec.to_json(),
            "model_config": {"positions_after_prefix": True}}
    mngr = checkpoint.manager(tmp_path / "run" / "checkpoints")
    checkpoint.save(mngr, 7, {"step": np.int32(7), "params": params}, meta)
    mngr.wait_until_finished()
    export = prefix_lib.export(params, spec, tmp_path / "export", meta)
    inputs = tmp_path / "in.txt"
    inputs.write_text("\n".join(SOURCES[:3]) + "\n")
    c = _config(model_dir, "", inputs, tmp_path / "ckpt.jsonl")
    c.checkpoint = str(tmp_path / "run")
    predict.run(c)
    predict.run(_config(model_dir, str(export), inputs, tmp_path / "export.jsonl"))
    assert _read(tmp_path / "ckpt.jsonl") == _read(tmp_path / "export.jsonl")


@pytest.mark.slow
def test_encoder_decoder_mixed_tasks_equal_separate_runs(tiny_t5_dir, tmp_path):
    """The same on the offline T5 (all three placements, prefixes of lengths 2 and 5)."""
    model_dir = tiny_t5_dir
    lm = load_pretrained(str(model_dir))
    exports = {}
    for task, length, seed in (("a", 2, 0), ("b", 5, 1)):
        spec = prefix_lib.PrefixSpec(length=length, placements=("encoder", "decoder", "cross"),
                                     geometry=lm.config.prefix_geometry(), hidden_size=lm.config.hidden_size,
                                     method="prefix_direct")
        params = jax.tree.map(lambda x: x * 3.0, prefix_lib.init_params(spec, jax.random.key(seed)))
        exports[task] = prefix_lib.export(params, spec, tmp_path / task, {"base_model": str(model_dir),
                                                                            "architecture": "t5"})
    rows = [{"id": i, "task": "ab"[i % 2], "source": s} for i, s in enumerate(SOURCES[:4])]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    predict.run(_config(model_dir, f"a={exports['a']},b={exports['b']}", tmp_path / "in.jsonl", tmp_path / "m.jsonl",
                        **{"generate.num_beams": 2}))
    mixed = _read(tmp_path / "m.jsonl")
    for task in "ab":
        (tmp_path / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["task"] == task))
        predict.run(_config(model_dir, str(exports[task]), tmp_path / f"{task}.jsonl", tmp_path / f"{task}.out",
                            **{"generate.num_beams": 2}))
        assert [r["prediction"] for r in mixed if r["task"] == task] == \
            [r["prediction"] for r in _read(tmp_path / f"{task}.out")]
    assert len({r["prediction"] for r in mixed}) > 1


# --- Trust: predict never destroys its input, checks its output before decoding, names lines ---


def _digest(*paths: Path) -> list[bytes]:
    return [Path(p).read_bytes() for p in paths]


@pytest.fixture
def no_lm(monkeypatch):
    """Loading the LM fails the test: what is checked here must be refused before it."""
    from prefix_jax import models

    def refuse(*args, **kwargs):
        raise AssertionError("the LM was loaded before the bad option was refused")

    monkeypatch.setattr(models, "load_pretrained", refuse)


def test_output_equal_to_the_input_is_refused_and_the_input_kept(setup, tmp_path, monkeypatch, no_lm):
    model_dir, exports, inputs, _, _ = setup
    mine = tmp_path / "in.jsonl"
    mine.write_bytes(inputs.read_bytes())
    (tmp_path / "link.jsonl").symlink_to(mine)
    os.link(mine, tmp_path / "hard.jsonl")
    monkeypatch.chdir(tmp_path)
    both = f"e2e={exports['e2e']},dart={exports['dart']}"
    for output in (mine, "./in.jsonl", tmp_path / "sub" / ".." / "in.jsonl", tmp_path / "link.jsonl",
                   tmp_path / "hard.jsonl"):
        before = _digest(mine)
        with pytest.raises(predict.PredictError, match="is the input file") as err:
            predict.run(_config(model_dir, both, mine, output))
        assert "\n" not in str(err.value) and _digest(mine) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hard.jsonl", "in.jsonl", "link.jsonl"]


def test_output_that_is_a_directory_or_under_a_file_is_refused_before_loading(setup, tmp_path, no_lm):
    model_dir, exports, inputs, _, _ = setup
    (tmp_path / "outdir").mkdir()
    (tmp_path / "afile").write_text("user data")
    for output, match in ((tmp_path / "outdir", "is a directory"),
                          (tmp_path / "afile" / "out.jsonl", "is a file, not a directory"),
                          (tmp_path / "afile" / "deeper" / "out.jsonl", "is a file, not a directory")):
        with pytest.raises(predict.PredictError, match=match):
            predict.run(_config(model_dir, str(exports["e2e"]), inputs, output))
    assert list((tmp_path / "outdir").iterdir()) == [] and (tmp_path / "afile").read_text() == "user data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "outdir"]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".txt", "-"])
def test_non_utf8_input_names_the_file_and_line(setup, tmp_path, suffix, no_lm):
    model_dir, exports, _, _, _ = setup
    good = {".jsonl": '{"source": "a"}\n', ".csv": "source\na\n", ".txt": "a\n", "-": "a\n"}[suffix]
    raw = good.encode() + b"\n" + ('{"source": "caf\xe9"}\n' if suffix == ".jsonl" else "caf\xe9\n").encode("latin-1")
    path = tmp_path / f"in{suffix}"
    path.write_bytes(raw)
    line = 3 if suffix in (".jsonl", ".txt", "-") else 4
    stdin = io.TextIOWrapper(io.BytesIO(raw)) if suffix == "-" else None
    with pytest.raises(ValueError, match=f"{'stdin' if suffix == '-' else 'in' + suffix}.*not UTF-8.*line {line}"):
        predict.run(_config(model_dir, str(exports["e2e"]), "-" if suffix == "-" else path, tmp_path / "o.jsonl"),
                    stdin=stdin)


def test_errors_name_the_line_and_a_bom_csv_reads(setup, tmp_path, no_lm):
    model_dir, exports, _, _, _ = setup
    both = f"e2e={exports['e2e']},dart={exports['dart']}"
    bad = tmp_path / "in.jsonl"
    bad.write_text('{"source": "a", "task": "e2e"}\n\n\n{"source": "b", "task": "nope"}\n')
    with pytest.raises(predict.PredictError, match=r"in.jsonl' line 4: task 'nope' has no prefix"):
        predict.run(_config(model_dir, both, bad, tmp_path / "o.jsonl"))
    bad.write_text('{"source": "a", "task": "e2e"}\n\n{"source": \n')
    with pytest.raises(ValueError, match=r"in.jsonl' line 3: not valid JSON"):
        predict.run(_config(model_dir, both, bad, tmp_path / "o.jsonl"))
    bom = tmp_path / "bom.csv"
    bom.write_bytes("\ufeffsource,task\na,e2e\n,dart\n".encode())  # train.py reads such files; so does predict
    with pytest.raises(ValueError, match=r"bom.csv' row 2 \(line 3\): field 'source' \(source_field\) is empty"):
        predict.run(_config(model_dir, both, bom, tmp_path / "o.jsonl"))


def test_a_planted_temp_link_is_not_written_through_and_no_temp_is_left(setup, tmp_path):
    model_dir, exports, inputs, rows, _ = setup
    victim = tmp_path / "victim.txt"
    victim.write_text("someone else's file")
    out = tmp_path / "out.jsonl"
    (tmp_path / "out.jsonl.tmp").symlink_to(victim)  # the fixed temp name the writer used to open
    predict.run(_config(model_dir, f"e2e={exports['e2e']},dart={exports['dart']}", inputs, out))
    assert victim.read_text() == "someone else's file"
    assert [r["id"] for r in _read(out)] == [r["id"] for r in rows]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "out.jsonl.tmp", "victim.txt"]
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_copy_of_the_lm_elsewhere_fits_by_its_fingerprint(setup, tmp_path, monkeypatch):
    """The stored fingerprint, not the path, decides: the same weights at another path (or spelled `./DIR`) fit;
    other weights at the trained-on path do not."""
    import shutil

    from prefix_jax import fingerprint as fingerprint_lib

    model_dir, exports, inputs, _, _ = setup
    meta = json.loads((Path(exports["e2e"]) / "prefix.json").read_text())
    export = tmp_path / "export"
    export.mkdir()
    (export / "prefix.safetensors").write_bytes((Path(exports["e2e"]) / "prefix.safetensors").read_bytes())
    fingerprint = fingerprint_lib.lm_fingerprint(load_pretrained(str(model_dir)).params)
    (export / "prefix.json").write_text(json.dumps({**meta, "lm_fingerprint": fingerprint}))
    shutil.copytree(model_dir, tmp_path / "copy")
    monkeypatch.chdir(tmp_path)
    predict.run(_config("./copy", str(export), inputs, tmp_path / "copy.jsonl"))
    predict.run(_config(model_dir, str(export), inputs, tmp_path / "orig.jsonl"))
    assert _read(tmp_path / "copy.jsonl") == _read(tmp_path / "orig.jsonl")
    (export / "prefix.json").write_text(json.dumps({**meta, "lm_fingerprint": "0" * 32}))
    with pytest.raises(predict.PredictError, match="whose weights differ"):
        predict.run(_config(model_dir, str(export), inputs, tmp_path / "x.jsonl"))


def test_sources_longer_than_the_position_table_are_truncated_and_logged(setup, tmp_path, caplog):
    model_dir, exports, _, _, _ = setup
    long = " ".join(["name : Alimentum"] * 200)  # ~800 tokens; the tiny GPT-2 has 256 positions
    inputs = tmp_path / "in.txt"
    inputs.write_text(f"{SOURCES[0]}\n{long}\n")
    caplog.set_level("INFO", logger="prefix_jax")
    predict.run(_config(model_dir, str(exports["e2e"]), inputs, tmp_path / "o.jsonl"))  # max_source_length=512
    assert len(_read(tmp_path / "o.jsonl")) == 2
    assert "1 of 2 sources are longer than 245 tokens" in caplog.text and "line 2" in caplog.text
    with pytest.raises(predict.PredictError, match="generate.max_new_tokens=300"):
        predict.run(_config(model_dir, str(exports["e2e"]), inputs, tmp_path / "o.jsonl",
                            **{"generate.max_new_tokens": 300}))


def test_a_multi_task_checkpoint_decodes_each_row_with_its_task(setup, tmp_path, monkeypatch):
    """checkpoint=WORKDIR of a multi-task run (given as a relative path): each row's task picks its prefix, as
    with the run's exports; a task the run did not train is refused."""
    from prefix_jax import checkpoint

    model_dir, _, _, rows, _ = setup
    lm = load_pretrained(str(model_dir))
    spec = prefix_lib.PrefixSpec(length=3, placements=("decoder",), geometry=lm.config.prefix_geometry(),
                                 hidden_size=lm.config.hidden_size, method="prefix_direct", tasks=("dart", "e2e"))
    params = jax.tree.map(lambda x: x * 3.0, prefix_lib.init_params(spec, jax.random.key(5)))
    meta = {"base_model": str(model_dir), "architecture": "gpt2", "prefix_spec": spec.to_json(),
            "model_config": {"positions_after_prefix": True}}
    mngr = checkpoint.manager(tmp_path / "run" / "checkpoints")
    checkpoint.save(mngr, 2, {"step": np.int32(2), "params": params}, meta)
    mngr.wait_until_finished()
    mngr.close()
    exports = {t: prefix_lib.export(prefix_lib.task_params(params, spec, t), prefix_lib.single_task(spec),
                                    tmp_path / "export" / t, meta) for t in spec.tasks}
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(tmp_path)
    c = _config(model_dir, "", inputs, tmp_path / "ckpt.jsonl")
    c.checkpoint = "run"  # relative: Orbax alone would refuse it
    summary = predict.run(c)
    assert summary["tasks"] == ["dart", "e2e"]
    predict.run(_config(model_dir, f"e2e={exports['e2e']},dart={exports['dart']}", inputs, tmp_path / "exp.jsonl"))
    from_checkpoint = _read(tmp_path / "ckpt.jsonl")
    assert [r["task"] for r in from_checkpoint] == [r["task"] for r in rows]
    assert from_checkpoint == _read(tmp_path / "exp.jsonl")
    inputs.write_text(json.dumps({"source": "x", "task": "webnlg"}) + "\n")
    with pytest.raises(predict.PredictError, match=r"line 1: task 'webnlg' has no prefix; loaded: \['dart', 'e2e'\]"):
        predict.run(c)
