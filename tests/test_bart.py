"""BART parity with transformers and PEFT, with and without a prefix in every placement."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_fixtures import hf_decoder_cache as _hf_decoder_cache, left_pad, max_abs_diff, random_kv as _random_kv, save_state_dict, save_tiny
from tolerances import F32_ATOL
from transformers import BartConfig, BartForConditionalGeneration

from prefix_jax.models import CROSS, DECODER, ENCODER, KV, Prefix, bart, load_pretrained, params_to_hf
from prefix_jax.hub import ModelNotFoundError
from prefix_jax.peft_compat import prefix_from_peft

B, S, T, P = 3, 11, 7, 5
random_kv = functools.partial(_random_kv, length=P)
hf_decoder_cache = functools.partial(_hf_decoder_cache, batch=B)
VOCAB, D = 99, 32


def tiny_config(**kw) -> BartConfig:
    base = dict(vocab_size=VOCAB, d_model=D, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)
    return BartConfig(**{**base, **kw})


def _tiny_model(seed: int, **kw) -> BartForConditionalGeneration:
    torch.manual_seed(seed)
    hf = BartForConditionalGeneration(tiny_config(**kw)).eval()
    with torch.no_grad():  # HF's init is 0.02 / zeros: make embeddings, norms and the logits bias matter
        for name, p in hf.named_parameters():
            if "layer_norm" in name or "layernorm" in name or "embed" in name or "shared" in name:
                p.add_(torch.randn_like(p) * 0.3)
        hf.final_logits_bias.normal_()
    return hf


@pytest.fixture(scope="module")
def scaled(tmp_path_factory):
    """scale_embedding=True, GELU, 3 decoder layers (an odd count, different from the encoder's)."""
    hf = _tiny_model(0, scale_embedding=True, decoder_layers=3)
    return hf, load_pretrained(str(save_tiny(hf, tmp_path_factory.mktemp("bart_scaled"))))


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """scale_embedding=False (bart-base/large), ReLU, 8 decoder heads: head geometry differs per stack."""
    hf = _tiny_model(1, scale_embedding=False, activation_function="relu", decoder_attention_heads=8)
    return hf, load_pretrained(str(save_tiny(hf, tmp_path_factory.mktemp("bart_plain"))))


def with_config(lm, **changes):
    """The same weights under a changed config (e.g. positions_after_prefix)."""
    return bart.Model(dataclasses.replace(lm.config, **changes))


def random_batch(seed: int = 0):
    """Right-padded sources and targets; HF's decoder inputs are our shifted targets and shifted mask."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, VOCAB, (B, S), generator=g)
    smask = torch.ones(B, S, dtype=torch.long)
    smask[1, 7:] = 0
    smask[2, 3:] = 0
    tgt = torch.randint(3, VOCAB, (B, T), generator=g)
    tmask = torch.ones(B, T, dtype=torch.long)
    tmask[0, 4:] = 0
    dec = torch.cat([torch.full((B, 1), 2), tgt[:, :-1]], dim=1)
    dmask = torch.cat([torch.ones(B, 1, dtype=torch.long), tmask[:, :-1]], dim=1)
    ours = dict(source_ids=jnp.asarray(src.numpy()), source_mask=jnp.asarray(smask.numpy()),
                target_ids=jnp.asarray(tgt.numpy()), target_mask=jnp.asarray(tmask.numpy()))
    hf = dict(input_ids=src, attention_mask=smask, decoder_input_ids=dec, decoder_attention_mask=dmask)
    return hf, ours, tmask.numpy()


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


@pytest.mark.parametrize("variant", ["scaled", "plain"])
def test_logits_match_transformers_with_padding(variant, request):
    hf, lm = request.getfixturevalue(variant)
    hf_in, batch, valid = random_batch()
    ours = lm.model.apply({"params": lm.params}, batch)
    assert lm.config.scale_embedding == (variant == "scaled")
    assert lm.config.decoder_layers == (3 if variant == "scaled" else 2)
    np.testing.assert_array_equal(lm.params["final_logits_bias"], hf.final_logits_bias[0].numpy())
    assert max_abs_diff(ours, hf_logits(hf, **hf_in), valid) < F32_ATOL


def test_decoder_prefix_matches_hf_past_key_values(scaled, monkeypatch):
    """HF with a cache of length P puts decoder tokens at P..: ours with positions_after_prefix=True."""
    hf, lm = scaled
    hf_in, batch, valid = random_batch(1)
    kv, (k, v) = random_kv(lm.config.prefix_geometry()[DECODER], 2)
    prefix = Prefix(kv={DECODER: kv})
    mask = torch.cat([torch.ones(B, P, dtype=torch.long), hf_in["decoder_attention_mask"]], dim=1)
    ref = hf_logits(hf, **{**hf_in, "decoder_attention_mask": mask}, past_key_values=hf_decoder_cache(k, v))
    after = with_config(lm, positions_after_prefix=True).apply({"params": lm.params}, batch, prefix)
    assert max_abs_diff(after, ref, valid) < F32_ATOL

    # The paper's placement: decoder tokens from position 0 whatever the prefix. HF does it once told so.
    monkeypatch.setattr(hf.model.decoder, "embed_positions", FixedPositions(hf.model.decoder.embed_positions, 0))
    ref0 = hf_logits(hf, **{**hf_in, "decoder_attention_mask": mask}, past_key_values=hf_decoder_cache(k, v))
    from_zero = lm.model.apply({"params": lm.params}, batch, prefix)
    assert not lm.config.positions_after_prefix
    assert max_abs_diff(from_zero, ref0, valid) < F32_ATOL
    assert max_abs_diff(from_zero, after, valid) > 1e-2
    assert max_abs_diff(lm.model.apply({"params": lm.params}, batch), ref0, valid) > 1e-2  # the prefix acts


@pytest.mark.parametrize("num_layers", [2, 3])
def test_matches_peft_seq2seq_prefix_tuning(num_layers, tmp_path):
    from peft import PrefixTuningConfig, get_peft_model

    # PEFT sizes the prefix from encoder_layers and assumes as many decoder layers.
    hf = _tiny_model(3, encoder_layers=num_layers, decoder_layers=num_layers)
    lm = load_pretrained(str(save_tiny(hf, tmp_path / "bart")), positions_after_prefix=True)
    peft_model = get_peft_model(hf, PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P,
                                                       prefix_projection=True, encoder_hidden_size=24)).eval()
    hf_in, batch, valid = random_batch(4)
    with torch.no_grad():
        tokens = peft_model.prompt_tokens["default"][None, :P]
        prompt_embeddings = peft_model.prompt_encoder["default"](tokens)[0].numpy()
        ref = peft_model(**hf_in).logits.numpy()
    prefix = prefix_from_peft(prompt_embeddings, lm.config.prefix_geometry()[DECODER], seq2seq=True)
    ours = lm.model.apply({"params": lm.params}, batch, prefix)
    assert max_abs_diff(ours, ref, valid) < F32_ATOL
    assert max_abs_diff(lm.model.apply({"params": lm.params}, batch), ref, valid) > 1e-2


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


@pytest.mark.parametrize("after", [False, True])
def test_padding_side_does_not_matter(scaled, after):
    _, lm = scaled
    _, batch, valid = random_batch(9)
    prefix = Prefix(kv={p: kv for p, (kv, _) in all_placements(lm, 10).items()})
    model = with_config(lm, positions_after_prefix=after)
    left_ids, left_mask = map(jnp.asarray, left_pad(batch["source_ids"], batch["source_mask"]))
    a = model.apply({"params": lm.params}, batch, prefix)
    b = model.apply({"params": lm.params}, dict(batch, source_ids=left_ids, source_mask=left_mask), prefix)
    assert max_abs_diff(a, b, valid) < F32_ATOL


@pytest.mark.parametrize("after", [False, True])
def test_incremental_decoding_matches_teacher_forcing(scaled, after):
    _, lm = scaled
    model, params = with_config(lm, positions_after_prefix=after), {"params": lm.params}
    cfg = model.config
    _, batch, valid = random_batch(10)
    prefix = Prefix(kv={p: kv for p, (kv, _) in all_placements(lm, 20).items()})
    full = model.apply(params, batch, prefix)
    encoded, encoded_mask = model.apply(params, batch["source_ids"], batch["source_mask"], prefix,
                                        method=model.encode)
    step = jax.jit(lambda enc, enc_mask, ids, mask, cache: model.apply(
        params, enc, enc_mask, ids, mask, prefix, True, cache, method=model.decode))
    cache = model.init_cache(B, T)
    decoder_ids = jnp.concatenate([jnp.full((B, 1), cfg.decoder_start_token_id), batch["target_ids"][:, :-1]], 1)
    steps = []
    for t in range(T):
        written = jnp.broadcast_to(jnp.arange(T) <= t, (B, T))
        logits, cache = step(encoded, encoded_mask, decoder_ids[:, t:t + 1], written, cache)
        steps.append(logits)
    assert max_abs_diff(jnp.concatenate(steps, axis=1), full, valid) < F32_ATOL


def test_embedding_only_prompt_matches_hf_inputs_embeds(scaled):
    """Prompt vectors go in as they are; token embeddings are scaled by sqrt(d_model) (scale_embedding=True)."""
    hf, lm = scaled
    hf_in, batch, valid = random_batch(11)
    prompt = torch.randn(P, D, generator=torch.Generator().manual_seed(12))
    src = hf_in.pop("input_ids")
    with torch.no_grad():
        tokens = hf.model.encoder.embed_tokens.weight[src] * hf.model.encoder.embed_tokens.embed_scale
        embeds = torch.cat([prompt[None].expand(B, -1, -1), tokens], dim=1)
    mask = torch.cat([torch.ones(B, P, dtype=torch.long), hf_in.pop("attention_mask")], dim=1)
    ref = hf_logits(hf, inputs_embeds=embeds, attention_mask=mask, **hf_in)
    ours = lm.model.apply({"params": lm.params}, batch, Prefix(prompt_embeds=jnp.asarray(prompt.numpy())))
    assert max_abs_diff(ours, ref, valid) < F32_ATOL


def test_params_round_trip_to_hf_names(plain):
    _, lm = plain
    from safetensors.numpy import load_file

    saved = load_file(lm.model_dir / "model.safetensors")
    ours = params_to_hf(lm.params, lm.config)
    assert set(ours) == set(saved)
    for name, x in saved.items():
        np.testing.assert_array_equal(ours[name], x, err_msg=name)


def test_missing_tensor_is_a_clear_error(plain, tmp_path):
    hf, _ = plain
    save_state_dict(hf, tmp_path, drop="decoder.layernorm_embedding")
    with pytest.raises(ModelNotFoundError, match="model.decoder.layernorm_embedding.weight"):
        load_pretrained(str(tmp_path))


def test_missing_final_logits_bias_is_zeros(plain, tmp_path):
    hf, _ = plain
    lm = load_pretrained(str(save_state_dict(hf, tmp_path, drop="final_logits_bias")))
    np.testing.assert_array_equal(lm.params["final_logits_bias"], np.zeros(VOCAB, np.float32))


@pytest.mark.parametrize("field, value", [("normalize_before", True), ("add_final_layer_norm", True),
                                          ("extra_pos_embeddings", 0), ("tie_word_embeddings", False)])
def test_unsupported_variants_are_rejected(field, value):
    with pytest.raises(ValueError, match=field):
        bart.Config.from_hf(tiny_config(**{field: value}), set())


def test_prefix_plus_text_longer_than_position_table_is_a_clear_error(scaled):
    _, lm = scaled
    _, batch, _ = random_batch()
    kv, _ = random_kv(lm.config.prefix_geometry()[ENCODER], 0)
    model = with_config(lm, positions_after_prefix=True, max_position_embeddings=S + P - 1)
    with pytest.raises(ValueError, match="encoder needs 16 positions"):
        model.apply({"params": lm.params}, batch, Prefix(kv={ENCODER: kv}))
