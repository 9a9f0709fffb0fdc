"""Tiny random HF checkpoints saved locally (no network), and helpers to compare against them."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def save_tiny(model, directory: Path) -> Path:
    """`save_pretrained` a (tiny, random) transformers model as safetensors."""
    model.save_pretrained(directory)
    return directory


def max_abs_diff(ours, theirs, valid=None) -> float:
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    diff = np.abs(ours - theirs)
    if valid is not None:
        diff = diff[np.asarray(valid, bool)]
    return float(diff.max())
