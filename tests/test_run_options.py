"""A run's config is read in one place: `run_options.from_config` holds every field, and nothing reads the
config after it (the run goes on with the config's groups deleted)."""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path

import pytest

from prefix_jax import run_options, run_setup, trainer
from prefix_jax.config_checks import ConfigError

REPO = Path(__file__).resolve().parent.parent
NOT_RUNS = ("__init__", "default", "predict")  # default has no model; predict.py's config is not a run's
TRAIN_CONFIGS = sorted(p.stem for p in (REPO / "configs").glob("*.py") if p.stem not in NOT_RUNS)


@pytest.mark.parametrize("name", TRAIN_CONFIGS)
def test_every_field_of_every_config_lands_in_its_option(name, tmp_path):
    config = importlib.import_module(f"configs.{name}").get_config()
    config.train.workdir = str(tmp_path / "run")
    options = run_options.from_config(config)
    for group in ("model", "prefix", "data", "train", "eval", "generate", "optim", "mesh"):
        typed = dataclasses.asdict(getattr(options, group))
        assert json.loads(json.dumps(typed)) == json.loads(json.dumps(config[group].to_dict())), group
    assert options.config == config.to_dict()
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.train.steps = 1  # type: ignore[misc]


def test_a_field_no_option_holds_is_an_error_not_ignored(tmp_path):
    config = importlib.import_module("configs.t5_offline").get_config()
    config.train.workdir = str(tmp_path / "run")
    config.train.stpes = 100  # a typo in a config file: read by nothing
    with pytest.raises(ConfigError, match=r"train\.stpes"):
        run_options.from_config(config)
    del config.train["stpes"]
    del config.optim["b2"]  # a trimmed config
    with pytest.raises(ConfigError, match=r"optim\.b2"):
        run_options.from_config(config)


def test_the_run_never_reads_the_config_after_from_config(tiny_gpt2_dir, tmp_path, monkeypatch):
    config = importlib.import_module("configs.gpt2_e2e_offline").get_config()
    config.model.name_or_path, config.model.create_tiny = str(tiny_gpt2_dir), ""
    config.data.max_source_length, config.data.max_target_length = 32, 16
    config.data.max_train_examples, config.data.max_eval_examples = 8, 4
    config.prefix.length, config.prefix.mlp_hidden = 2, 8
    config.data.eval_split, config.eval.generate, config.optim.warmup_steps = "", False, 0
    config.train.workdir, config.train.batch_size, config.train.steps = str(tmp_path / "run"), 4, 2
    recorded = config.to_dict()
    read_once = run_options.from_config

    def read_then_empty(c):
        options = read_once(c)
        for group in list(c.keys()):
            del c[group]  # any later read of the config raises
        return options

    monkeypatch.setattr(run_options, "from_config", read_then_empty)
    summary = trainer.run(config)
    assert summary["final_step"] == 2 and not list(config.keys())
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == json.loads(json.dumps(recorded))


def test_build_only_loads_the_offline_demo_model_it_is_given(tmp_path):
    """`build` never creates the tiny demo checkpoint; `prepare_offline_demo` is the step that does."""
    config = importlib.import_module("configs.t5_offline").get_config()
    config.model.name_or_path, config.train.workdir = str(tmp_path / "tiny-t5"), str(tmp_path / "run")
    options = run_options.from_config(config)
    with pytest.raises(ValueError, match="model.name_or_path"):
        run_setup.build(options)
    assert not (tmp_path / "tiny-t5").exists()


def test_each_field_is_declared_once_and_the_defaults_checks_and_resume_keys_come_from_it(tmp_path):
    """configs/default.py's values are the declared defaults; each declared check rejects a bad value with one line
    naming the field; the resume keys a checkpoint records are the fields declared to block a resume."""
    from configs import default
    from prefix_jax import config_fields
    from prefix_jax.generate import GenerationConfig

    config = default.get_config()
    config.model.name_or_path, config.train.workdir = "m", str(tmp_path / "run")
    options = run_options.from_config(config)
    for name, cls in run_options.GROUPS.items():
        declared = dataclasses.replace(cls(), name_or_path="m") if name == "model" else \
            dataclasses.replace(cls(), workdir=str(tmp_path / "run")) if name == "train" else cls()
        assert getattr(options, name) == declared, name
        for field in dataclasses.fields(cls):
            assert field.metadata["doc"], f"{name}.{field.name} has no doc"
    assert options.generate == GenerationConfig()
    assert run_options.default_predict_config().to_dict()["generate"] == config.generate.to_dict()

    for key, bad in (("train.seed", -1), ("model.quantize", "int3"), ("optim.b2", 1.0), ("generate.top_p", 0.0),
                     ("data.max_target_length", 1), ("eval.metrics", ("nope",)), ("optim.frozen", ("(",))):
        group, field = key.split(".")
        values = {**config[group].to_dict(), field: bad}
        with pytest.raises(ConfigError, match=rf"^{key}[ =][^\n]+$"):
            config_fields.check_values(values, run_options.GROUPS[group], group)

    assert set(run_options.RESUME_FIELDS) == {
        "model.param_dtype", "model.compute_dtype", "model.quantize", "model.quantize_group_size",
        "model.quantize_embeddings", "data.pack_width", "train.batch_size", "train.steps",
        "train.seed", "train.label_smoothing", "train.grad_accum_steps", "optim.learning_rate", "optim.warmup_steps",
        "optim.weight_decay", "optim.max_grad_norm", "optim.b1", "optim.b2", "optim.eps", "optim.frozen"}
    assert set(run_options.LAYOUT_FIELDS) == {"optim.frozen", "optim.max_grad_norm"}
    assert set(options.resume_values()) == set(run_options.RESUME_FIELDS)
