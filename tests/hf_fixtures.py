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


def save_state_dict(model, directory: Path, drop: str | None = None) -> Path:
    """Writes config + safetensors by hand (one copy of each shared tensor), optionally dropping a tensor.

    For checkpoints `save_pretrained` cannot write: an untied head, or a deliberately broken file.
    """
    from safetensors.torch import save_file

    model.config.save_pretrained(directory)
    seen, state = set(), {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen or (drop is not None and drop in name):
            continue
        seen.add(tensor.data_ptr())
        state[name] = tensor.contiguous()
    save_file(state, str(Path(directory) / "model.safetensors"))
    return Path(directory)


def left_pad(ids, mask) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded rows -> the same real tokens moved to the right end (left padding)."""
    ids, mask = np.asarray(ids), np.asarray(mask)
    out_ids, out_mask = np.zeros_like(ids), np.zeros_like(mask)
    for b in range(ids.shape[0]):
        n = int(mask[b].sum())
        out_ids[b, ids.shape[1] - n:] = ids[b, :n]
        out_mask[b, ids.shape[1] - n:] = 1
    return out_ids, out_mask
