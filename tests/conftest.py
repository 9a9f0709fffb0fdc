"""Shared test set-up: CPU only, quiet logs, and markers for the slow/benchmark checks the default run skips."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")



def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long checks (training to convergence, multi-process); run with -m slow")


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory) -> Path:
    """A random tiny T5 checkpoint (HF layout, bundled GPT-2 tokenizer), built once per test session."""
    from prefix_jax.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("models") / "tiny-t5", "t5")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    """A random tiny GPT-2 checkpoint, built once per test session."""
    from prefix_jax.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("models") / "tiny-gpt2", "gpt2")
