"""The Python API checks what it is given: a prefix meets only the LM it was trained on (weights, architecture,
shapes), a bank's rows are in range or known names. Each test here fails when its check is taken out (planted
bugs, recorded in the commit messages)."""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import small_config

from prefix_jax import fingerprint, prefix_bank
from prefix_jax import prefix as prefix_lib
from prefix_jax.generate import GenerationConfig, make_generate_fn
from prefix_jax.models import DECODER, load_pretrained
from prefix_jax.tiny_checkpoints import build_tiny_checkpoint

SOURCE = jnp.asarray([[5, 6, 7, 8]], jnp.int32)
MASK = jnp.ones_like(SOURCE)


def export_for(lm, directory: Path, placements=(DECODER,), length: int = 3) -> Path:
    """A random direct prefix for `lm`, exported as a training run exports it (base model, fingerprint, arch)."""
    geometry = lm.config.prefix_geometry()
    spec = prefix_lib.PrefixSpec(length=length, placements=placements, geometry=geometry,
                                 hidden_size=lm.config.hidden_size, method="prefix_direct")
    params = prefix_lib.init_params(spec, jax.random.PRNGKey(0))
    meta = {"base_model": lm.name_or_path, "lm_fingerprint": fingerprint.lm_fingerprint(lm.params),
            "architecture": lm.config.architecture}
    return prefix_lib.export(params, spec, directory, meta)


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir):
    return load_pretrained(str(tiny_gpt2_dir))


@pytest.fixture(scope="module")
def gpt2_export(gpt2, tmp_path_factory) -> Path:
    return export_for(gpt2, tmp_path_factory.mktemp("gpt2_export"))


def test_a_t5_prefix_of_gpt2_shapes_is_refused_by_generate_and_load_export(gpt2, tiny_t5_dir, tmp_path):
    """The tiny T5's decoder and the tiny GPT-2 share [2 layers, 4 heads, P, 16], as T5-base and GPT-2 small share
    [12, 12, P, 64]: without the check the T5 prefix decodes on GPT-2 without a word."""
    t5 = load_pretrained(str(tiny_t5_dir))
    assert t5.config.prefix_geometry()[DECODER] == gpt2.config.prefix_geometry()[DECODER]
    directory = export_for(t5, tmp_path / "t5_export")
    prefix, _ = prefix_lib.load_export(directory)
    generate = make_generate_fn(gpt2, GenerationConfig(max_new_tokens=3))
    with pytest.raises(fingerprint.PrefixMismatchError, match=r"trained on .*t5.*given to .*gpt2") as error:
        generate(gpt2.params, prefix, SOURCE, MASK)
    assert str(tiny_t5_dir) in str(error.value) and str(gpt2.name_or_path) in str(error.value)
    with pytest.raises(fingerprint.PrefixMismatchError, match="a prefix only fits the LM it was trained on"):
        prefix_lib.load_export(directory, lm=gpt2)


def test_a_prefix_of_another_gpt2_is_refused_and_a_copy_of_the_same_weights_is_not(gpt2, gpt2_export, tiny_gpt2_dir,
                                                                                   tmp_path):
    other = load_pretrained(str(build_tiny_checkpoint(tmp_path / "other-gpt2", "gpt2", seed=1)))  # a "fine-tune"
    prefix, _ = prefix_lib.load_export(gpt2_export)
    with pytest.raises(fingerprint.PrefixMismatchError, match="other weights") as error:
        make_generate_fn(other, GenerationConfig(max_new_tokens=3))(other.params, prefix, SOURCE, MASK)
    assert "other-gpt2" in str(error.value) and str(tiny_gpt2_dir) in str(error.value)
    with pytest.raises(fingerprint.PrefixMismatchError, match="other weights"):
        prefix_lib.load_export(gpt2_export, lm=other)
    # The same weights at another path (a local copy of a Hub model, `./DIR` vs `DIR`) fit.
    copy = load_pretrained(str(shutil.copytree(tiny_gpt2_dir, tmp_path / "copy")))
    prefix, _ = prefix_lib.load_export(gpt2_export, lm=copy)
    tokens = make_generate_fn(copy, GenerationConfig(max_new_tokens=3))(jax.device_put(copy.params), prefix, SOURCE,
                                                                        MASK)
    assert tokens.shape == (1, 3)


def test_a_prefix_of_other_shapes_is_a_clear_error_not_an_einsum_error(gpt2, tiny_llama_dir, tmp_path):
    llama = load_pretrained(str(tiny_llama_dir))  # 2 K/V heads; GPT-2 has 4
    prefix, _ = prefix_lib.load_export(export_for(llama, tmp_path / "llama_export"))
    bare = prefix.replace(trained_on=None)  # e.g. built in memory: only its shapes can be checked
    with pytest.raises(fingerprint.PrefixMismatchError, match=r"shape \[2, 2, 3, 16\].*needs \[2, 4, P, 16\]"):
        make_generate_fn(gpt2.model, GenerationConfig(max_new_tokens=3))(gpt2.params, bare, SOURCE, MASK)
    t5_style = prefix_lib.load_export(export_for(gpt2, tmp_path / "x"))[0].replace(trained_on=None)
    t5_style = t5_style.replace(kv={"encoder": t5_style.kv[DECODER]})
    with pytest.raises(fingerprint.PrefixMismatchError, match="'encoder' placement"):
        make_generate_fn(gpt2.model, GenerationConfig(max_new_tokens=3))(gpt2.params, t5_style, SOURCE, MASK)


def test_a_bank_refuses_rows_out_of_range_and_takes_names(gpt2, gpt2_export):
    one, _ = prefix_lib.load_export(gpt2_export)
    two = one.replace(kv={DECODER: one.kv[DECODER]._replace(key=-one.kv[DECODER].key)})
    bank = prefix_bank.stack({"e2e": one, "dart": two})
    assert bank.names == ("e2e", "dart") and bank.trained_on == one.trained_on
    for bad, match in ((2, "index 2 is out of range; the bank holds 2"), (-1, "index -1 is out of range"),
                       ("webnlg", "no prefix named 'webnlg'; the bank's names are \\['e2e', 'dart'\\]")):
        with pytest.raises(prefix_bank.PrefixBankError, match=match):
            prefix_bank.for_rows(bank, [0, bad])
    with pytest.raises(prefix_bank.PrefixBankError, match="has no names"):
        prefix_bank.for_rows(prefix_bank.stack([one, two]), ["e2e"])
    by_name = prefix_bank.for_rows(bank, ["dart", "e2e"])
    by_index = prefix_bank.for_rows(bank, np.asarray([1, 0]))
    np.testing.assert_array_equal(by_name.kv[DECODER].rows, by_index.kv[DECODER].rows)
    generate = make_generate_fn(gpt2, GenerationConfig(max_new_tokens=4))
    source, mask = jnp.concatenate([SOURCE, SOURCE]), jnp.concatenate([MASK, MASK])
    mixed = np.asarray(generate(gpt2.params, by_name, source, mask))
    np.testing.assert_array_equal(mixed[0], np.asarray(generate(gpt2.params, two, SOURCE, MASK))[0])
    np.testing.assert_array_equal(mixed[1], np.asarray(generate(gpt2.params, one, SOURCE, MASK))[0])


def test_a_bank_of_prefixes_for_different_lms_is_refused(gpt2, gpt2_export, tiny_t5_dir, tmp_path):
    t5_prefix, _ = prefix_lib.load_export(export_for(load_pretrained(str(tiny_t5_dir)), tmp_path / "t5"))
    with pytest.raises(prefix_bank.PrefixBankError, match="trained on different LMs"):
        prefix_bank.stack({"gpt2": prefix_lib.load_export(gpt2_export)[0], "t5": t5_prefix})


def test_eval_only_never_overwrites_the_training_runs_predictions(tiny_t5_dir, trained_t5_run, tmp_path, caplog):
    """The eval-only command on the training run's own split and step writes beside its predictions, not over them
    (it wrote `predictions_<step>.jsonl`, the training run's file), and a second eval-only run beside the first."""
    shutil.copytree(trained_t5_run[0], tmp_path / "run")
    trained = tmp_path / "run" / "predictions_validation_6.jsonl"
    before = trained.read_bytes()
    config = small_config(tiny_t5_dir, tmp_path / "run", eval_only=True)
    config.eval.max_generate = 1
    for _ in range(2):
        from prefix_jax import trainer

        with caplog.at_level("INFO", logger="prefix_jax"):
            assert trainer.run(config)["generated"] == 1
    assert "evaluating step 6 on the 'validation' split" in caplog.text  # not a bar frozen without a word
    assert "predictions_validation_6_eval_only.2.jsonl" in caplog.text
    assert trained.read_bytes() == before and len(before.splitlines()) > 1
    written = sorted(p.name for p in (tmp_path / "run").glob("predictions_*"))
    assert written == ["predictions_validation_6.jsonl", "predictions_validation_6_eval_only.2.jsonl",
                       "predictions_validation_6_eval_only.jsonl"]


REPO = Path(__file__).resolve().parent.parent


def _run(*args: str):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PREFIX_JAX_HUGE_PAGES": "0"}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("flag", ["--help", "-h", "--helpfull"])
def test_train_py_help_exits_0_and_says_how_to_use_it(flag):
    out = _run("train.py", flag)
    assert out.returncode == 0, out.stderr
    for needed in ("usage: python train.py --config CONFIG_FILE", "--config.train.steps=200", "configs/default.py",
                   "Exit status", "75 "):
        assert needed in out.stdout
    if flag == "--helpfull":
        assert "--config.prefix.length=10" in out.stdout and "--config.optim.learning_rate=5e-05" in out.stdout


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_predict_py_help_exits_0_and_says_how_to_use_it(flag):
    out = _run("predict.py", flag)
    assert out.returncode == 0, out.stderr
    for needed in ("usage: python predict.py", "--config.prefixes=", "configs/predict.py", "Exit status"):
        assert needed in out.stdout


def test_a_pod_config_on_one_host_is_one_error_line(tmp_path):
    out = _run("train.py", "--config", "configs/flan_t5_xxl_xsum.py", f"--config.train.workdir={tmp_path / 'run'}")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error: mesh.coordinator_address='auto' found no cluster")
    assert not (tmp_path / "run").exists()
