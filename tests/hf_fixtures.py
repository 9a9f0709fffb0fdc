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


def random_kv(geometry, seed: int, length: int):
    """A random prefix of `length` slots for `geometry`: ours (`KV` of jax arrays) and the same as torch tensors."""
    import jax.numpy as jnp
    import torch

    from prefix_jax.models import KV

    g = torch.Generator().manual_seed(seed)
    shape = (geometry.num_layers, geometry.num_heads, length, geometry.head_dim)
    k, v = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    return KV(jnp.asarray(k.numpy()), jnp.asarray(v.numpy())), (k, v)


def hf_decoder_cache(k, v, batch: int):
    """A decoder self-attention prefix as HF (and PEFT) feed an encoder-decoder: `past_key_values` of
    length P per layer (`[batch, H, P, K]`), and an empty cross-attention cache to be filled."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    e = lambda x: x[None].expand(batch, -1, -1, -1).clone()
    cache = EncoderDecoderCache(tuple((e(k[i]), e(v[i]), e(k[i]), e(v[i])) for i in range(k.shape[0])))
    cache.cross_attention_cache = DynamicCache()
    for layer in cache.is_updated:
        cache.is_updated[layer] = False
    return cache
