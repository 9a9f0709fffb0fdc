"""BART beyond the shared contract (test_architectures.py): where decoder and encoder tokens sit after a prefix
(`positions_after_prefix`), every placement against HF attention patched as the paper's code does, export names,
its optional tensors and refused variants."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch
from families import FAMILY, bart_config
from hf_fixtures import hf_decoder_cache as _hf_decoder_cache, max_abs_diff, random_kv as _random_kv, save_state_dict
from tolerances import F32_ATOL

from prefix_jax.models import CROSS, DECODER, ENCODER, KV, Prefix, bart, load_pretrained, params_to_hf

BART = FAMILY["bart"]
B, S, T, P = dataclasses.astuple(BART.sizes)
random_kv = functools.partial(_random_kv, length=P)
hf_decoder_cache = functools.partial(_hf_decoder_cache, batch=B)
VOCAB = BART.vocab

@pytest.fixture
def scaled(tiny_hf):
    """scale_embedding=True, GELU, 3 decoder layers (an odd count, different from the encoder's)."""
    return tiny_hf("bart", "scaled")

@pytest.fixture
def plain(tiny_hf):
    """scale_embedding=False (bart-base/large), ReLU, 8 decoder heads: head geometry differs per stack."""
    return tiny_hf("bart", "plain")

def with_config(lm, **changes):
    """The same weights under a changed config (e.g. positions_after_prefix)."""
    return bart.Model(dataclasses.replace(lm.config, **changes))

def random_batch(seed: int = 0):
    """Right-padded sources and targets; HF's decoder inputs are our shifted targets and shifted mask."""
    x = BART.batch(seed)
    return BART.hf_inputs(x), x.ours(), x.valid

def all_placements(lm, seed: int) -> dict[str, tuple[KV, tuple[torch.Tensor, torch.Tensor]]]:
    geometry = lm.config.prefix_geometry()
    return {p: random_kv(geometry[p], seed + i) for i, p in enumerate((ENCODER, DECODER, CROSS))}

class FixedPositions(torch.nn.Module):
    """Replaces a BartLearnedPositionalEmbedding: tokens at `start, start + 1, ...` whatever the cache holds."""

    def __init__(self, table: torch.nn.Module, start: int):
        super().__init__()
        self.table, self.start = table, start

    def forward(self, input_ids, cache_length=0, position_ids=None):
        positions = self.start + torch.arange(input_ids.shape[1]) + self.table.offset
        return self.table.weight[positions][None]

class PrefixedAttention(torch.nn.Module):
    """HF BartAttention, but keys/values get a prefix after projection and the mask visible prefix slots.

    What the paper's code does (and adapters' prefix tuning) for the placements HF cannot take as input.
    """

    def __init__(self, attn: torch.nn.Module, k: torch.Tensor, v: torch.Tensor):
        super().__init__()
        self.attn, self.pk, self.pv = attn, k, v

    def forward(self, hidden_states, key_value_states=None, cache=None, attention_mask=None, **kwargs):
        a = self.attn
        batch, q_len = hidden_states.shape[:2]
        heads = lambda x: x.view(batch, -1, a.num_heads, a.head_dim).transpose(1, 2)
        source = hidden_states if key_value_states is None else key_value_states
        q, k, v = heads(a.q_proj(hidden_states)), heads(a.k_proj(source)), heads(a.v_proj(source))
        k = torch.cat([self.pk[None].expand(batch, -1, -1, -1), k], dim=2)
        v = torch.cat([self.pv[None].expand(batch, -1, -1, -1), v], dim=2)
        scores = (q @ k.transpose(2, 3)) * a.scaling
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                attention_mask = torch.where(attention_mask, 0.0, torch.finfo(scores.dtype).min)
            attention_mask = attention_mask[..., -(k.shape[2] - P):].expand(batch, 1, q_len, -1)
            scores = scores + torch.cat([torch.zeros(batch, 1, q_len, P), attention_mask], dim=-1)
        out = torch.softmax(scores, dim=-1) @ v
        return a.out_proj(out.transpose(1, 2).reshape(batch, q_len, -1)), None

def patch_hf(monkeypatch, hf, placed: dict, encoder_start: int | None = None, decoder_start: int | None = None):
    """Gives `hf` prefixes in the placements of `placed` (torch K/V `[L, H, P, K]`) and fixed position starts."""
    for placement, (k, v) in placed.items():
        stack = hf.model.encoder if placement == ENCODER else hf.model.decoder
        name = "encoder_attn" if placement == CROSS else "self_attn"
        for i, layer in enumerate(stack.layers):
            monkeypatch.setattr(layer, name, PrefixedAttention(getattr(layer, name), k[i], v[i]))
    for stack, start in ((hf.model.encoder, encoder_start), (hf.model.decoder, decoder_start)):
        if start is not None:
            monkeypatch.setattr(stack, "embed_positions", FixedPositions(stack.embed_positions, start))

def hf_logits(hf, **kw) -> np.ndarray:
    with torch.no_grad():
        return hf(**kw).logits.numpy()

def test_decoder_prefix_with_positions_from_zero_matches_hf_told_so(scaled, monkeypatch):
    """The paper's placement: decoder tokens from position 0 whatever the prefix (our default). HF does it once its
    decoder's positions are fixed to start at 0; HF's own cache convention (tokens at P..) is the shared contract's
    `positions_after_prefix=True` case."""
    hf, lm = scaled
    hf_in, batch, valid = random_batch(1)
    kv, (k, v) = random_kv(lm.config.prefix_geometry()[DECODER], 2)
    prefix = Prefix(kv={DECODER: kv})
    mask = torch.cat([torch.ones(B, P, dtype=torch.long), hf_in["decoder_attention_mask"]], dim=1)
    after = with_config(lm, positions_after_prefix=True).apply({"params": lm.params}, batch, prefix)
    monkeypatch.setattr(hf.model.decoder, "embed_positions", FixedPositions(hf.model.decoder.embed_positions, 0))
    ref0 = hf_logits(hf, **{**hf_in, "decoder_attention_mask": mask}, past_key_values=hf_decoder_cache(k, v))
    from_zero = lm.model.apply({"params": lm.params}, batch, prefix)
    assert not lm.config.positions_after_prefix
    assert max_abs_diff(from_zero, ref0, valid) < F32_ATOL
    assert max_abs_diff(from_zero, after, valid) > 1e-2
    assert max_abs_diff(lm.model.apply({"params": lm.params}, batch), ref0, valid) > 1e-2  # the prefix acts

@pytest.mark.parametrize("after", [False, True])
def test_all_placements_match_patched_hf(scaled, monkeypatch, after):
    """Encoder, decoder and cross prefixes together against HF attention patched as the paper's code does."""
    hf, lm = scaled
    hf_in, batch, valid = random_batch(5)
    placed = all_placements(lm, 6)
    start = P if after else 0
    patch_hf(monkeypatch, hf, {p: kv_t for p, (_, kv_t) in placed.items()}, start, start)
    ref = hf_logits(hf, **hf_in)
    prefix = Prefix(kv={p: kv for p, (kv, _) in placed.items()})
    ours = with_config(lm, positions_after_prefix=after).apply({"params": lm.params}, batch, prefix)
    assert max_abs_diff(ours, ref, valid) < F32_ATOL
    only_decoder = lm.model.apply({"params": lm.params}, batch, Prefix(kv={DECODER: placed[DECODER][0]}))
    assert max_abs_diff(only_decoder, ref, valid) > 1e-2  # encoder and cross prefixes really act

def test_encoder_positions_follow_the_flag(plain, monkeypatch):
    """Encoder prefix alone: tokens from 0 (paper) or from P (HF's cache convention), per the flag."""
    hf, lm = plain
    hf_in, batch, valid = random_batch(6)
    kv, kv_t = random_kv(lm.config.prefix_geometry()[ENCODER], 7)
    prefix = Prefix(kv={ENCODER: kv})
    outs = {after: with_config(lm, positions_after_prefix=after).apply({"params": lm.params}, batch, prefix)
            for after in (False, True)}
    patch_hf(monkeypatch, hf, {ENCODER: kv_t})
    assert max_abs_diff(outs[False], hf_logits(hf, **hf_in), valid) < F32_ATOL
    patch_hf(monkeypatch, hf, {}, encoder_start=P)
    assert max_abs_diff(outs[True], hf_logits(hf, **hf_in), valid) < F32_ATOL

def test_params_round_trip_to_hf_names(plain):
    _, lm = plain
    from safetensors.numpy import load_file

    saved = load_file(lm.model_dir / "model.safetensors")
    ours = params_to_hf(lm.params, lm.config)
    assert set(ours) == set(saved)
    for name, x in saved.items():
        np.testing.assert_array_equal(ours[name], x, err_msg=name)

def test_missing_final_logits_bias_is_zeros(plain, tmp_path):
    hf, _ = plain
    lm = load_pretrained(str(save_state_dict(hf, tmp_path, drop="final_logits_bias")))
    np.testing.assert_array_equal(lm.params["final_logits_bias"], np.zeros(VOCAB, np.float32))

@pytest.mark.parametrize("field, value", [("normalize_before", True), ("add_final_layer_norm", True),
                                          ("extra_pos_embeddings", 0), ("tie_word_embeddings", False)])
def test_unsupported_variants_are_rejected(field, value):
    with pytest.raises(ValueError, match=field):
        bart.Config.from_hf(bart_config(**{field: value}), set())

def test_prefix_plus_text_longer_than_position_table_is_a_clear_error(scaled):
    _, lm = scaled
    _, batch, _ = random_batch()
    kv, _ = random_kv(lm.config.prefix_geometry()[ENCODER], 0)
    model = with_config(lm, positions_after_prefix=True, max_position_embeddings=S + P - 1)
    with pytest.raises(ValueError, match="encoder needs 16 positions"):
        model.apply({"params": lm.params}, batch, Prefix(kv={ENCODER: kv}))
