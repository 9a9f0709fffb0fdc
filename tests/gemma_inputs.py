"""Inputs and PEFT helpers test_gemma shares with the old Llama tests (interim: to become a row of families.py)."""


from __future__ import annotations

import copy
import dataclasses
import functools
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hf_fixtures import left_pad, max_abs_diff, random_kv as _random_kv, save_tiny
from tolerances import F32_ATOL
from transformers.cache_utils import DynamicCache

from prefix_jax import prefix as prefix_lib
from prefix_jax import prefix_init, train_steps
from prefix_jax.data import pad
from prefix_jax.generate import GenerationConfig, make_generate_fn
from prefix_jax.models import DECODER, KV, NO_PREFIX, Prefix, llama, load_pretrained, masks, params_to_hf
from prefix_jax.hub import ModelNotFoundError
from prefix_jax.peft_compat import prefix_from_peft


B, S, T, P = 3, 9, 6, 4
VOCAB, SEP, EOS = 101, 1, 2


def random_batch(seed: int = 0) -> dict[str, np.ndarray]:
    """Right-padded, ragged sources and targets (pads are id 0)."""
    rng = np.random.default_rng(seed)
    smask = np.ones((B, S), np.int32)
    smask[1, 6:] = 0
    smask[2, 2:] = 0
    tmask = np.ones((B, T), np.int32)
    tmask[0, 3:] = 0
    tmask[2, 5:] = 0
    src = rng.integers(3, VOCAB, (B, S)).astype(np.int32) * smask
    tgt = rng.integers(3, VOCAB, (B, T)).astype(np.int32) * tmask
    return dict(source_ids=src, source_mask=smask, target_ids=tgt, target_mask=tmask)


def left_padded(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    ids, mask = left_pad(batch["source_ids"], batch["source_mask"])
    return dict(batch, source_ids=ids, source_mask=mask)


def jnp_batch(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v) for k, v in batch.items()}


def packed(batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """HF inputs: per example `[source real tokens, SEP, target real tokens]`, right-padded; and source lengths."""
    width = S + 1 + T
    ids, mask = torch.zeros(B, width, dtype=torch.long), torch.zeros(B, width, dtype=torch.long)
    starts = []
    for b in range(B):
        src = batch["source_ids"][b][batch["source_mask"][b] == 1]
        tgt = batch["target_ids"][b][batch["target_mask"][b] == 1]
        row = [*src, SEP, *tgt]
        ids[b, :len(row)], mask[b, :len(row)] = torch.tensor(row), 1
        starts.append(len(src))
    return ids, mask, starts


def target_logits(hf_logits: torch.Tensor, starts: list[int], offset: int = 0) -> np.ndarray:
    """HF logits at our target slots: target t of example b is HF position `offset + starts[b] + t`."""
    return np.stack([hf_logits[b, offset + s: offset + s + T].detach().numpy() for b, s in enumerate(starts)])


def hf_prefix_cache(k: torch.Tensor, v: torch.Tensor, rows: int = B) -> DynamicCache:
    """A prefix as HF takes it: a cache holding `[rows, N, P, K]` per layer (a fresh one per call)."""
    e = lambda x: x[None].expand(rows, -1, -1, -1).clone()
    return DynamicCache([(e(k[i]), e(v[i])) for i in range(k.shape[0])])


def with_prefix_mask(mask: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.ones(mask.shape[0], P, dtype=torch.long), mask], 1)



def peft_and_ours(hf, lm, projection: bool, seed: int):
    """A PEFT prefix-tuning model on `hf`, and our spec + params holding exactly its prefix parameters."""
    from peft import PrefixTuningConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(hf), PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=projection, encoder_hidden_size=24)).eval()
    encoder = peft_model.prompt_encoder["default"]
    geometry = lm.config.prefix_geometry()[DECODER]
    token_dim = geometry.num_heads * geometry.head_dim  # PEFT's virtual-token width for GQA (peft#1901)
    weight = lambda t: jnp.asarray(t.detach().numpy())
    if projection:
        spec = prefix_lib.PrefixSpec(P, (DECODER,), {DECODER: geometry}, token_dim, method="prefix", mlp_hidden=24)
        first, _, last = encoder.transform
        params = {DECODER: {"embedding": weight(encoder.embedding.weight),
                            "mlp_in": {"kernel": weight(first.weight).T, "bias": weight(first.bias)},
                            "mlp_out": {"kernel": weight(last.weight).T, "bias": weight(last.bias)}}}
    else:
        spec = prefix_lib.PrefixSpec(P, (DECODER,), {DECODER: geometry}, token_dim, method="prefix_direct")
        params = {DECODER: {"kv": weight(encoder.embedding.weight)}}
    return peft_model, spec, params


def peft_grads(peft_model, projection: bool) -> dict:
    """PEFT's prefix gradients in our param layout."""
    encoder = peft_model.prompt_encoder["default"]
    grad = lambda t: t.grad.numpy()
    if not projection:
        return {DECODER: {"kv": grad(encoder.embedding.weight)}}
    first, _, last = encoder.transform
    return {DECODER: {"embedding": grad(encoder.embedding.weight),
                      "mlp_in": {"kernel": grad(first.weight).T, "bias": grad(first.bias)},
                      "mlp_out": {"kernel": grad(last.weight).T, "bias": grad(last.bias)}}}




def until_eos(rows: np.ndarray) -> list[list[int]]:
    return [row[:row.index(EOS) + 1] if EOS in row else row for row in rows.tolist()]

