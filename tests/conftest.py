"""Shared test set-up: CPU only, quiet logs, one compilation cache per session, strict broadcasting, marker
for the slow checks the default run skips (each marked at its test), and the tiny checkpoints, tiny HF models
and trained run several files share."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Many tests compile the same program (each trainer.run, train.py subprocess or fresh jit of an equal step):
# XLA's persistent cache, empty at the start of each session, compiles each once. The first process to read
# this file (pytest itself; with -n, the controller, before it starts the workers) creates the cache and removes
# it at exit; xdist workers and subprocesses inherit it through the environment, so they share it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _XLA_CACHE = tempfile.mkdtemp(prefix="prefix_jax_tests_xla_")
    atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# The tiny checkpoints, likewise: built once per session into one directory every worker reads.
if "PREFIX_JAX_TEST_MODELS" not in os.environ:
    _MODELS = tempfile.mkdtemp(prefix="prefix_jax_tests_models_")
    atexit.register(shutil.rmtree, _MODELS, ignore_errors=True)
    os.environ["PREFIX_JAX_TEST_MODELS"] = _MODELS

# The tests' models are tiny: compiling, not running, is most of their time, and LLVM's optimisation passes are
# most of compiling (-35% CPU time at level 0). XLA CPU's MLIR fusion emitters cost more to compile than its
# older emitters for the same fusions (-36% CPU time again on the dropout, packing and split-attention tests,
# 112.8 -> 71.8 s). Both change how XLA's fused kernels become machine code, not which operations run, so every
# comparison holds as well. PREFIX_JAX_TEST_XLA_OPT=default keeps XLA's own settings everywhere; any other value
# is the optimisation level.
# The runs that stand for what a user runs (the README's commands, the real-weights demo) compile as users do:
# `helpers.users_env()` gives their subprocesses the XLA_FLAGS from before this file's additions.
os.environ.setdefault("PREFIX_JAX_TEST_USERS_XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
_XLA_OPT = os.environ.setdefault("PREFIX_JAX_TEST_XLA_OPT", "0")
if _XLA_OPT != "default" and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    _FAST_COMPILE = f"--xla_backend_optimization_level={_XLA_OPT} --xla_cpu_use_fusion_emitters=false"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()

import jax  # noqa: E402  (after the environment above)

# Broadcasting must be written out ([None], reshape): an implicit rank promotion is an error in tests.
jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long checks (training to convergence, multi-process); run with -m slow")
    config.addinivalue_line("markers", "longest: minutes alone; started first, so the other workers share the rest")


def pytest_collection_modifyitems(config, items):
    """The tests marked `longest` go first (longest-first scheduling): pytest-xdist hands tests out in this order,
    and one started last would leave the other workers idle while it runs alone."""
    items.sort(key=lambda item: item.get_closest_marker("longest") is None)  # stable: the rest keep their order


@pytest.fixture(scope="session")
def tiny_checkpoint():
    """`tiny_checkpoint(architecture)`: the random tiny checkpoint of `prefix_jax.tiny_checkpoints` (HF layout, bundled
    GPT-2 tokenizer), built at most once per test session, by whichever xdist worker asks first (the others wait
    on its lock, then reuse it). Shared: tests read it and never write into it."""
    from filelock import FileLock

    from prefix_jax.tiny_checkpoints import build_tiny_checkpoint

    root = Path(os.environ["PREFIX_JAX_TEST_MODELS"])

    def get(architecture: str) -> Path:
        with FileLock(str(root / f"tiny-{architecture}.lock")):
            return build_tiny_checkpoint(root / f"tiny-{architecture}", architecture)  # reuses a finished build

    return get


@pytest.fixture(scope="session")
def tiny_t5_dir(tiny_checkpoint) -> Path:
    return tiny_checkpoint("t5")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tiny_checkpoint) -> Path:
    return tiny_checkpoint("gpt2")


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_checkpoint) -> Path:
    return tiny_checkpoint("llama")


@pytest.fixture(scope="session")
def trained_t5_run(tiny_t5_dir, tmp_path_factory) -> tuple[Path, dict]:
    """A finished 6-step run of the tiny T5 (checkpoints at steps 3 and 6, export at 6) and its summary, trained once.

    Shared read-only by the tests that inspect a run's files or must leave a user's run untouched: a test
    that writes into a run copies it first.
    """
    from helpers import small_config

    from prefix_jax import trainer

    workdir = tmp_path_factory.mktemp("trained") / "run"
    return workdir, trainer.run(small_config(tiny_t5_dir, workdir))


@pytest.fixture(scope="session")
def trained_workdir(trained_t5_run) -> Path:
    """The workdir of `trained_t5_run`: the 'pre-existing' user data every bad input must leave untouched."""
    return trained_t5_run[0]


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """`tiny_hf(family, variant)`: (the random tiny HF model of `families.FAMILY[family].variants[variant]`, our
    `load_pretrained` of its saved files), built once per session. Tests may patch the HF model (monkeypatch undoes
    it) but never change its weights."""
    from families import FAMILY

    from prefix_jax.models import load_pretrained

    built = {}

    def get(family: str, variant: str):
        if (family, variant) not in built:
            directory = tmp_path_factory.mktemp(f"{family}-{variant}")
            hf = FAMILY[family].build(variant, directory)
            built[family, variant] = hf, load_pretrained(str(directory))
        return built[family, variant]

    return get


@pytest.fixture(scope="session")
def eos_steered(tmp_path_factory):
    """`eos_steered(family, variant)`: (a copy of the variant built with seed 3 whose EOS head row points along its
    mean last hidden state, so that `generate`'s hypotheses end at various steps; our load of it), built once."""
    import torch
    from families import FAMILY, HIDDEN, left_padded_generation_sources
    from hf_fixtures import save_tiny

    from prefix_jax.models import load_pretrained

    built = {}

    def get(family_name: str, variant: str):
        if (family_name, variant) not in built:
            family = FAMILY[family_name]
            hf = family.random(variant, seed=3)
            src, mask = left_padded_generation_sources(family.sizes.B, family.sizes.S, family.vocab)
            with torch.no_grad():
                out = hf(input_ids=src, attention_mask=mask, output_hidden_states=True)
                direction = out.hidden_states[-1].reshape(-1, HIDDEN).mean(0)
                hf.lm_head.weight[family.eos] = family.eos_steer * direction / direction.norm()  # tied: embedding too
            directory = save_tiny(hf, tmp_path_factory.mktemp(f"{family_name}-{variant}-eos"))
            built[family_name, variant] = hf, load_pretrained(str(directory))
        return built[family_name, variant]

    return get
