"""Shared test set-up: CPU only, quiet logs, and markers for the slow/benchmark checks the default run skips."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")



def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long checks (training to convergence, multi-process); run with -m slow")
