"""`model.quantize` in the product: a run on a quantized tiny Llama trains, evaluates, decodes, checkpoints only the
prefix and records the float LM's fingerprint; predict.py decodes its export on the quantized LM as the run did;
8 simulated devices (fsdp, tensor) give the one-device quantized losses; bad settings through train.py are one
error line, exit 2, every file untouched; a changed mode blocks a resume."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import REPO, cpu_env, losses, run_cli, tree_digest
from tolerances import F32_REORDERED_RTOL

from prefix_jax import checkpoint, fingerprint, predict, trainer
from prefix_jax.metrics_file import read_metrics
from prefix_jax.models import load_pretrained


def quantized_config(model_dir, workdir, mode="int8"):
    from configs import llama_offline

    c = llama_offline.get_config()
    c.model.name_or_path, c.model.create_tiny, c.model.quantize = str(model_dir), "", mode
    c.data.max_train_examples, c.data.max_eval_examples = 16, 4
    c.data.max_source_length, c.data.max_target_length = 32, 16
    c.prefix.length, c.prefix.mlp_hidden = 4, 16
    c.eval.max_generate, c.generate.max_new_tokens = 4, 4
    c.train.workdir, c.train.steps, c.train.batch_size, c.train.log_every = str(workdir), 8, 4, 1
    c.optim.learning_rate, c.optim.warmup_steps = 5e-2, 1
    return c


@pytest.fixture(scope="module")
def int8_run(tiny_llama_dir, tmp_path_factory):
    """(config, workdir, summary) of a finished 8-step int8 run of the tiny Llama; read-only for the tests."""
    run = tmp_path_factory.mktemp("int8") / "run"
    config = quantized_config(tiny_llama_dir, run)
    return config, run, trainer.run(config)


def test_an_int8_run_trains_evaluates_decodes_and_checkpoints_no_lm_weight(tiny_llama_dir, int8_run):
    config, run, summary = int8_run
    loss = losses(run)
    assert sorted(loss) == list(range(1, 9)) and loss[8] < 0.95 * loss[1], loss  # 11.47 -> 10.40
    assert np.isfinite(summary["eval_loss"]) and "bleu" in summary
    assert list(run.glob("predictions_validation_8.jsonl"))

    lm = load_pretrained(str(tiny_llama_dir), config.model.param_dtype)  # the float (bfloat16) LM, unquantized
    lm_bytes = sum(x.nbytes for x in jax.tree.leaves(lm.params))
    mngr = checkpoint.manager(run / "checkpoints", read_only=True)
    meta = checkpoint.read_meta(mngr)
    restored = checkpoint.read_state(mngr, 8)
    mngr.close()
    assert set(restored["params"]) == {"decoder"}  # the prefix only
    disk_bytes = sum(p.stat().st_size for p in (run / "checkpoints").rglob("*") if p.is_file())
    assert disk_bytes < lm_bytes / 10
    # The float checkpoint's fingerprint: the prefix fits the float LM it was trained on (quantized).
    assert meta["lm_fingerprint"] == fingerprint.lm_fingerprint(lm.params)
    assert meta["resume"]["model.quantize"] == "int8"

    before = tree_digest(run)
    for other in ("none", "int4"):
        with pytest.raises(checkpoint.CheckpointMismatchError, match=r"model\.quantize"):
            trainer.run(quantized_config(tiny_llama_dir, run, other))
    assert tree_digest(run) == before


def test_predict_decodes_an_int8_runs_export_on_the_int8_lm_as_the_run_did(tiny_llama_dir, int8_run, tmp_path,
                                                                         monkeypatch):
    """predict.py with model.quantize=int8 accepts the export (it records the float LM's fingerprint), writes every
    row, and decodes the run's evaluation sources to the run's own predictions (same LM, same greedy decoding)."""
    from configs.predict import get_config

    config, run, _ = int8_run
    evaluated = [json.loads(line) for line in (run / "predictions_validation_8.jsonl").read_text().splitlines()]
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text("".join(json.dumps({"source": row["source"]}) + "\n" for row in evaluated))
    c = get_config()
    c.model.name_or_path, c.model.quantize = str(tiny_llama_dir), "int8"
    c.model.param_dtype = config.model.param_dtype
    c.prefixes, c.input, c.output = str(run / "export"), str(inputs), str(tmp_path / "out.jsonl")
    c.batch_size, c.max_source_length, c.generate.max_new_tokens, c.progress = 4, 32, 4, False
    decoded_with = []  # the dtypes of the LM leaves each generate call got
    make_generate_fn = predict.make_generate_fn

    def spying(*args, **kwargs):
        fn = make_generate_fn(*args, **kwargs)
        return lambda lm_params, *rest: decoded_with.append({x.dtype for x in jax.tree.leaves(lm_params)}) or fn(
            lm_params, *rest)
    monkeypatch.setattr(predict, "make_generate_fn", spying)
    summary = predict.run(c)
    predicted = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert summary["rows"] == len(evaluated) == len(predicted) >= 2
    assert [r["prediction"] for r in predicted] == [r["prediction"] for r in evaluated]
    assert decoded_with and all(np.dtype("int8") in dtypes for dtypes in decoded_with)  # decoded on int8 values


@pytest.mark.parametrize("overrides,field", [
    (["--config.model.quantize=int3"], "model.quantize='int3'"),
    pytest.param(["--config.model.quantize=int4", "--config.model.quantize_group_size=48"],
                 "model.quantize_group_size=48", marks=pytest.mark.slow),  # fails after the LM loads
    # An LM whose layout cannot be quantized so: the file's own blocks asked of a safetensors checkpoint. (A float
    # dtype is all train.py can load, model.param_dtype; a non-float kernel is refused in test_quantize.py.)
    pytest.param(["--config.model.quantize=gguf"], "model.quantize='gguf'", marks=pytest.mark.slow),
])
def test_a_bad_quantize_setting_through_train_py_is_one_error_line_and_touches_nothing(
        overrides, field, tiny_llama_dir, int8_run, tmp_path):
    """Pointed at a finished run's workdir: one `error:` line naming the field, exit 2, no traceback, the run's
    files, the model directory and the data byte-identical."""
    _, run, _ = int8_run
    watched = [run, tiny_llama_dir, REPO / "data/e2e"]
    before = [tree_digest(p) for p in watched]
    out = run_cli("--config", str(REPO / "configs/llama_offline.py"), f"--config.model.name_or_path={tiny_llama_dir}",
                  "--config.model.create_tiny=", f"--config.train.workdir={run}", *overrides)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and len(errors) == 1 and field in errors[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert [tree_digest(p) for p in watched] == before


# --- 8 simulated devices -----------------------------------------------------------------------------------------


def _train_py(model_dir, workdir, devices: int, *flags: str) -> list[dict]:
    """metrics.jsonl of a short train.py run of the tiny Llama on `devices` simulated CPU devices."""
    args = [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs/llama_offline.py"),
            f"--config.model.name_or_path={model_dir}", "--config.model.create_tiny=", f"--config.train.workdir={workdir}",
            "--config.train.steps=3", "--config.train.batch_size=8", "--config.train.log_every=1",
            "--config.train.eval_every=3", "--config.optim.warmup_steps=1", "--config.data.max_train_examples=64",
            "--config.data.max_eval_examples=8", "--config.eval.max_generate=8", "--config.generate.max_new_tokens=4",
            "--config.data.max_source_length=32", "--config.data.max_target_length=16", "--config.prefix.length=4",
            "--config.prefix.mlp_hidden=16", *flags]
    out = subprocess.run(args, env=cpu_env(devices), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return read_metrics(workdir), out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_lm_sharded_over_8_devices_gives_the_one_device_losses(mode, tiny_llama_dir, tmp_path):
    """fsdp (1, 8, 1) and tensor parallelism (2, 1, 4: the 4 heads over `model`): the losses, eval loss and greedy
    predictions equal one device's, and the quantized integer kernels are what is split over the devices."""
    quantize = [f"--config.model.quantize={mode}", "--config.model.quantize_group_size=32",
                "--config.model.param_dtype=float32"]  # float32 kernels: the rtol of a reordered float32 sum
    one, _ = _train_py(tiny_llama_dir, tmp_path / "one", 1, *quantize)
    one_preds = (tmp_path / "one" / "predictions_validation_3.jsonl").read_text()
    for name, shape, strategy in (("fsdp", "(1, 8, 1)", "fsdp"), ("tensor", "(2, 1, 4)", "tensor")):
        workdir = tmp_path / name
        rows, log = _train_py(tiny_llama_dir, workdir, 8, *quantize, f"--config.mesh.shape={shape}",
                              f"--config.mesh.lm_partitioning={strategy}")
        for key in ("loss", "eval_loss"):
            got, want = [r[key] for r in rows if key in r], [r[key] for r in one if key in r]
            assert len(got) == len(want) > 0, key
            np.testing.assert_allclose(got, want, rtol=F32_REORDERED_RTOL, err_msg=f"{mode} {name} {key}")
        assert (workdir / "predictions_validation_3.jsonl").read_text() == one_preds, (mode, name)
        assert f"LM quantized on load ({mode}" in log
        split = _split_integer_leaves(tiny_llama_dir, tmp_path / "split", shape, strategy, quantize)
        assert split["integer_leaves"] >= 7 and split["split"] >= 4, (name, split)  # q/k/v/o, gate/up/down per stack


# Run in a child with 8 devices: how many of the run's LM leaves are integer (quantized values), and how many of
# those are split over the devices (each device holding a part, not the whole).
_SPLIT_SCRIPT = """
import json, sys
import jax, numpy as np
from configs import llama_offline
from prefix_jax import run_options, run_setup
model_dir, workdir, shape, strategy, mode, group = sys.argv[1:]
c = llama_offline.get_config()
c.model.name_or_path, c.model.create_tiny, c.train.workdir = model_dir, "", workdir
c.model.quantize, c.model.quantize_group_size = mode, int(group)
c.mesh.shape, c.mesh.lm_partitioning, c.train.batch_size = eval(shape), strategy, 8
c.data.max_train_examples, c.data.max_eval_examples = 16, 4
lm = run_setup.build(run_options.from_config(c)).lm
ints = [x for x in jax.tree.leaves(lm.params) if np.issubdtype(x.dtype, np.integer) or "int" in str(x.dtype)]
split = [x for x in ints if all(s.data.size < x.size for s in x.addressable_shards)]
print(json.dumps({"integer_leaves": len(ints), "split": len(split)}))
"""


def _split_integer_leaves(model_dir, workdir, shape: str, strategy: str, quantize: list[str]) -> dict:
    mode, group = (flag.split("=")[1] for flag in quantize[:2])
    out = subprocess.run([sys.executable, "-c", _SPLIT_SCRIPT, str(model_dir), str(workdir), shape, strategy, mode,
                          group], env=cpu_env(8, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- no float copy of the quantized kernels in the compiled step -------------------------------------------------


def _step_temp_bytes(model_dir, workdir, mode: str, remat: str, embeddings: bool = False) -> int:
    """Temporaries of the compiled train step of the run's own (float32) LM, quantized as `mode` (`embeddings`:
    `model.quantize_embeddings`)."""
    from prefix_jax import optim, run_options, run_setup, train_steps
    from prefix_jax import prefix as prefix_lib

    c = quantized_config(model_dir, workdir, mode)
    c.model.param_dtype, c.model.remat, c.train.batch_size = "float32", remat, 8
    c.model.quantize_embeddings = embeddings
    plan = run_setup.build(run_options.from_config(c))
    params = prefix_lib.init_params(plan.spec, jax.random.key(1))
    tx, schedule = optim.make_optimizer(params, learning_rate=5e-3, total_steps=10)
    step = train_steps.jit_train_step(plan.lm.model, plan.spec, tx, schedule)
    state = train_steps.init_state(params, tx, jax.random.key(2))
    batch = jax.device_put(plan.train.train_batch(0))
    return int(step.lower(state, plan.lm.params, batch).compile().memory_analysis().temp_size_in_bytes)


# remat=none: without the quantized dot's own rematerialization (`quantize._dequantizing_dot_general`), the layer
# scan's backward kept each layer's dequantized float kernels as residuals (the transpose of x @ W needs W): the
# temporaries grew by the float32 size of every quantized kernel (measured: exactly that).
@pytest.mark.slow
@pytest.mark.parametrize("remat", ["minimal", "full", "none"])
def test_the_quantized_step_holds_no_float_copy_of_the_kernels(remat, tiny_llama_dir, tmp_path):
    """compile().memory_analysis(): the int8 step's temporaries are no larger than the float32 step's (a float
    copy of the kernels would add 295 kB here, their float32 size). The Dense kernels alone (the vocabulary
    matrices float, `model.quantize_embeddings=False`): their head's blocks are the next test's."""
    float32 = _step_temp_bytes(tiny_llama_dir, tmp_path / "f", "none", remat)
    int8 = _step_temp_bytes(tiny_llama_dir, tmp_path / "q", "int8", remat)
    assert int8 <= float32 + 1024, (remat, int8 - float32)


@pytest.mark.slow
def test_the_quantized_step_holds_no_float_copy_of_the_vocab_matrices(tiny_llama_dir, tmp_path):
    """With the embedding table and the LM head quantized (int8, a scale per row), the step's temporaries grow
    by the head's few dequantized blocks (`quantized_vocab.logits`), under half of one float32 vocabulary matrix
    (here 50k x 64: 12.9 MB); dequantizing the whole head at once adds one whole matrix."""
    from prefix_jax import models, quantize

    kernels_only = _step_temp_bytes(tiny_llama_dir, tmp_path / "k", "int8", "none")
    with_vocab = _step_temp_bytes(tiny_llama_dir, tmp_path / "v", "int8", "none", embeddings=True)
    lm = models.load_pretrained(str(tiny_llama_dir), quantize="int8")
    tables = quantize.vocab_matrices(models.load_pretrained(str(tiny_llama_dir)).params)
    leaves = dict(quantize._with_aux_leaves(lm.params))
    assert set(tables) <= set(leaves)  # the run's own loader quantizes them by default
    matrix_bytes = max(4 * int(np.prod(leaves[name].shape)) for name in tables)
    print(f"vocabulary matrices quantized: temporaries +{with_vocab - kernels_only} bytes; a float32 matrix "
          f"{matrix_bytes}")
    assert with_vocab - kernels_only < matrix_bytes / 2, (with_vocab - kernels_only, matrix_bytes)


@pytest.mark.slow  # 17 s (the 70B model traced abstractly); test_run_options.py's default row loads and checks it
def test_the_70b_int8_configs_memory_arithmetic_holds(tmp_path):
    """configs/llama70b_int8.py's docstring figures, recomputed from the model's own parameter shapes (abstract:
    nothing is allocated): 2.10 B embedding + head, 68.45 B of Dense kernels, 70.6 GB at int8 (kernels and the
    vocabulary matrices 1 B, the norms bfloat16; 72.7 GB with the vocabulary matrices bfloat16), 4.4 GB a chip
    over fsdp 16, an 88.3 M-parameter prefix. The config passes the checks."""
    import transformers

    from configs import llama70b_int8
    from prefix_jax import models, run_options, run_setup
    from prefix_jax import prefix as prefix_lib
    from prefix_jax.partitioning import path_name
    from prefix_jax.tiny_checkpoints import _dummy_batch

    config = llama70b_int8.get_config()
    config.train.workdir = str(tmp_path / "run")
    options = run_options.from_config(config)  # every field valid, the combination checked
    assert (options.model.quantize, options.model.quantize_embeddings, options.model.param_dtype,
            options.mesh.lm_partitioning) == ("int8", True, "bfloat16", "fsdp")
    hf = transformers.LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                  num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False)
    arch = models.architecture("llama")
    cfg = arch.Config.from_hf(hf, {"lm_head.weight"})
    shapes = jax.eval_shape(lambda: arch.Model(cfg).init(jax.random.key(0), _dummy_batch()))["params"]
    sizes = {path_name(p): int(np.prod(x.shape)) for p, x in jax.tree_util.tree_flatten_with_path(shapes)[0]}
    kernels = sum(n for name, n in sizes.items() if name.endswith("kernel") and "lm_head" not in name)
    rest = sum(sizes.values()) - kernels
    norms = 161 * 8192
    vocab = rest - norms
    assert round(kernels / 1e9, 2) == 68.45 and round(vocab / 1e9, 2) == 2.10
    int8_gb = (kernels + vocab + 2 * norms) / 1e9
    assert round(int8_gb, 1) == 70.6 and round(int8_gb / 16, 1) == 4.4 and round(2 * (kernels + rest) / 1e9, 1) == 141.1
    assert round((kernels + 2 * rest) / 1e9, 1) == 72.7  # quantize_embeddings=False
    spec = run_setup.prefix_spec(options.prefix, cfg, [])
    prefix = jax.eval_shape(lambda: prefix_lib.init_params(spec, jax.random.key(0)))
    assert round(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(prefix)) / 1e6, 1) == 88.3
