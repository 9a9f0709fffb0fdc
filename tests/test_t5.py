"""T5 parity with transformers and PEFT, with and without a prefix in every placement."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_fixtures import hf_decoder_cache as _hf_decoder_cache, left_pad, max_abs_diff, random_kv as _random_kv, save_state_dict, save_tiny
from tolerances import F32_ATOL
from transformers import T5Config, T5ForConditionalGeneration
from transformers.models.t5 import modeling_t5

from prefix_jax.models import CROSS, DECODER, ENCODER, Prefix, load_pretrained, t5
from prefix_jax.hub import ModelNotFoundError
from prefix_jax.peft_compat import prefix_from_peft

B, S, T, P = 3, 11, 7, 5
random_kv = functools.partial(_random_kv, length=P)
hf_decoder_cache = functools.partial(_hf_decoder_cache, batch=B)


def tiny_config(**kw) -> T5Config:
    base = dict(vocab_size=99, d_model=32, d_kv=12, d_ff=64, num_layers=2, num_decoder_layers=3, num_heads=4,
                decoder_start_token_id=0, relative_attention_num_buckets=8, relative_attention_max_distance=20)
    return T5Config(**{**base, **kw})


@pytest.fixture(scope="module")
def v10(tmp_path_factory):
    """T5 v1.0 layout: ReLU FFN, tied head with d_model**-0.5 scaling. d_kv*heads != d_model on purpose."""
    torch.manual_seed(0)
    hf = T5ForConditionalGeneration(tiny_config(feed_forward_proj="relu")).eval()
    return hf, load_pretrained(str(save_tiny(hf, tmp_path_factory.mktemp("t5v10"))))


@pytest.fixture(scope="module")
def v11(tmp_path_factory):
    """T5 v1.1 / Flan layout: gated-GELU FFN, its own lm_head, no output scaling."""
    torch.manual_seed(1)
    cfg = tiny_config(feed_forward_proj="gated-gelu", tie_word_embeddings=False, num_decoder_layers=2)
    hf = T5ForConditionalGeneration(cfg).eval()
    # transformers 5 ties lm_head to the embedding even for v1.1 configs; real v1.1 checkpoints carry their own.
    hf.lm_head.weight = torch.nn.Parameter(torch.randn_like(hf.shared.weight) * 0.5)
    return hf, load_pretrained(str(save_state_dict(hf, tmp_path_factory.mktemp("t5v11"))))


def random_batch(seed: int = 0, vocab: int = 99):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(2, vocab, (B, S), generator=g)
    smask = torch.ones(B, S, dtype=torch.long)
    smask[1, 7:] = 0
    smask[2, 3:] = 0
    tgt = torch.randint(2, vocab, (B, T), generator=g)
    tmask = torch.ones(B, T, dtype=torch.long)
    tmask[0, 4:] = 0
    ours = dict(source_ids=jnp.asarray(src.numpy()), source_mask=jnp.asarray(smask.numpy()),
                target_ids=jnp.asarray(tgt.numpy()), target_mask=jnp.asarray(tmask.numpy()))
    return (src, smask, tgt, tmask), ours


@pytest.mark.parametrize("variant", ["v10", "v11"])
def test_logits_match_transformers_with_padding(variant, request):
    hf, lm = request.getfixturevalue(variant)
    (src, smask, tgt, tmask), batch = random_batch()
    with torch.no_grad():
        ref = hf(input_ids=src, attention_mask=smask, labels=tgt.masked_fill(tmask == 0, -100)).logits.numpy()
    ours = lm.model.apply({"params": lm.params}, batch)
    assert lm.config.tied_lm_head == (variant == "v10")
    assert lm.config.scale_decoder_outputs == (variant == "v10")
    assert max_abs_diff(ours, ref, tmask.numpy()) < F32_ATOL


def test_decoder_prefix_matches_hf_past_key_values(v10):
    hf, lm = v10
    (src, smask, tgt, tmask), batch = random_batch(1)
    kv, (k, v) = random_kv(lm.config.prefix_geometry()[DECODER], 2)
    with torch.no_grad():
        ref = hf(input_ids=src, attention_mask=smask, decoder_input_ids=hf._shift_right(tgt),
                 decoder_attention_mask=torch.cat([torch.ones(B, P, dtype=torch.long), torch.ones(B, T, dtype=torch.long)], 1),
                 past_key_values=hf_decoder_cache(k, v)).logits.numpy()
    ours = lm.model.apply({"params": lm.params}, batch, Prefix(kv={DECODER: kv}))
    plain = lm.model.apply({"params": lm.params}, batch)
    assert max_abs_diff(ours, ref, tmask.numpy()) < F32_ATOL
    assert max_abs_diff(plain, ref, tmask.numpy()) > 1e-2  # the prefix really acts


def test_matches_peft_seq2seq_prefix_tuning(tmp_path):
    from peft import PrefixTuningConfig, get_peft_model

    torch.manual_seed(3)
    # PEFT assumes heads*head_dim == d_model and as many decoder layers as encoder layers.
    cfg = tiny_config(d_kv=8, num_layers=4, num_decoder_layers=4)
    hf = T5ForConditionalGeneration(cfg).eval()
    lm = load_pretrained(str(save_tiny(hf, tmp_path / "t5")))
    peft_model = get_peft_model(hf, PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P,
                                                       prefix_projection=True, encoder_hidden_size=24)).eval()
    (src, smask, tgt, tmask), batch = random_batch(4)
    with torch.no_grad():
        tokens = peft_model.prompt_tokens["default"][None, :P]
        prompt_embeddings = peft_model.prompt_encoder["default"](tokens)[0].numpy()
        ref = peft_model(input_ids=src, attention_mask=smask, decoder_input_ids=hf._shift_right(tgt),
                         decoder_attention_mask=torch.ones(B, T, dtype=torch.long)).logits.numpy()
    prefix = prefix_from_peft(prompt_embeddings, lm.config.prefix_geometry()[DECODER], seq2seq=True)
    assert set(prefix.kv) == {DECODER}
    ours = lm.model.apply({"params": lm.params}, batch, prefix)
    assert max_abs_diff(ours, ref, tmask.numpy()) < F32_ATOL


def _attention_with_prefix(prefixes: dict[int, tuple[torch.Tensor, torch.Tensor]]):
    """HF T5Attention.forward, but keys/values get a prefix after projection, as the paper's code does.

    Self-attention positions follow HF's cache convention (queries start at P). Prefix slots are never masked.
    """

    def forward(self, hidden_states, mask=None, key_value_states=None, position_bias=None, cache=None, **kwargs):
        pk, pv = prefixes[id(self)]
        batch, q_len = hidden_states.shape[:2]
        heads = lambda x: x.view(batch, -1, self.n_heads, self.key_value_proj_dim).transpose(1, 2)
        source = hidden_states if key_value_states is None else key_value_states
        q, k, v = heads(self.q(hidden_states)), heads(self.k(source)), heads(self.v(source))
        k = torch.cat([pk[None].expand(batch, -1, -1, -1), k], dim=2)
        v = torch.cat([pv[None].expand(batch, -1, -1, -1), v], dim=2)
        prefix_len, key_len = pk.shape[1], k.shape[2]
        if position_bias is None:
            if self.has_relative_attention_bias:
                position_bias = self.compute_bias(q_len, key_len, past_seen_tokens=prefix_len)
            else:
                position_bias = torch.zeros(1, self.n_heads, q_len, key_len)
        scores = q @ k.transpose(2, 3) + position_bias
        if mask is not None:
            if mask.dtype == torch.bool:
                mask = torch.where(mask, 0.0, torch.finfo(scores.dtype).min)
            mask = mask[..., -(key_len - prefix_len):]
            mask = torch.cat([torch.zeros(*mask.shape[:-1], prefix_len), mask], dim=-1)
            scores = scores + mask
        out = torch.softmax(scores.float(), dim=-1) @ v
        out = self.o(out.transpose(1, 2).reshape(batch, q_len, -1))
        return out, position_bias, None

    return forward


def test_encoder_and_cross_prefixes_match_patched_hf(v10, monkeypatch):
    hf, lm = v10
    geometry = lm.config.prefix_geometry()
    (src, smask, tgt, tmask), batch = random_batch(5)
    placed = {p: random_kv(geometry[p], seed) for p, seed in ((ENCODER, 6), (DECODER, 7), (CROSS, 8))}
    prefixes = {}
    for i, block in enumerate(hf.encoder.block):
        k, v = placed[ENCODER][1]
        prefixes[id(block.layer[0].SelfAttention)] = (k[i], v[i])
    for i, block in enumerate(hf.decoder.block):
        k, v = placed[CROSS][1]
        prefixes[id(block.layer[1].EncDecAttention)] = (k[i], v[i])
    original = modeling_t5.T5Attention.forward
    patched = _attention_with_prefix(prefixes)
    monkeypatch.setattr(modeling_t5.T5Attention, "forward",
                        lambda self, *a, **kw: (patched if id(self) in prefixes else original)(self, *a, **kw))
    k, v = placed[DECODER][1]
    with torch.no_grad():
        ref = hf(input_ids=src, attention_mask=smask, decoder_input_ids=hf._shift_right(tgt),
                 decoder_attention_mask=torch.ones(B, P + T, dtype=torch.long),
                 past_key_values=hf_decoder_cache(k, v)).logits.numpy()
    ours = lm.model.apply({"params": lm.params}, batch, Prefix(kv={p: kv for p, (kv, _) in placed.items()}))
    assert max_abs_diff(ours, ref, tmask.numpy()) < F32_ATOL
    only_decoder = lm.model.apply({"params": lm.params}, batch, Prefix(kv={DECODER: placed[DECODER][0]}))
    assert max_abs_diff(only_decoder, ref, tmask.numpy()) > 1e-2  # encoder and cross prefixes really act


def test_padding_side_does_not_matter(v10):
    _, lm = v10
    _, batch = random_batch(9)
    geometry = lm.config.prefix_geometry()
    prefix = Prefix(kv={p: random_kv(geometry[p], i)[0] for i, p in enumerate((ENCODER, DECODER, CROSS))})
    left_ids, left_mask = map(jnp.asarray, left_pad(batch["source_ids"], batch["source_mask"]))
    left = dict(batch, source_ids=left_ids, source_mask=left_mask)
    a = lm.model.apply({"params": lm.params}, batch, prefix)
    b = lm.model.apply({"params": lm.params}, left, prefix)
    assert max_abs_diff(a, b, batch["target_mask"]) < F32_ATOL


def test_incremental_decoding_matches_teacher_forcing(v10):
    _, lm = v10
    cfg, model, params = lm.config, lm.model, {"params": lm.params}
    _, batch = random_batch(10)
    geometry = cfg.prefix_geometry()
    prefix = Prefix(kv={p: random_kv(geometry[p], 20 + i)[0] for i, p in enumerate((ENCODER, DECODER, CROSS))})
    full = model.apply(params, batch, prefix)
    encoded, encoded_mask = model.apply(params, batch["source_ids"], batch["source_mask"], prefix,
                                        method=model.encode)
    cache = model.init_cache(B, T)
    decoder_ids = jnp.concatenate([jnp.zeros((B, 1), jnp.int32), batch["target_ids"][:, :-1]], axis=1)
    steps = []
    for t in range(T):
        written = jnp.broadcast_to(jnp.arange(T) <= t, (B, T))
        logits, cache = model.apply(params, encoded, encoded_mask, decoder_ids[:, t:t + 1], written, prefix, True,
                                    cache, method=model.decode)
        steps.append(logits)
    assert max_abs_diff(jnp.concatenate(steps, axis=1), full, batch["target_mask"]) < F32_ATOL


def test_embedding_only_prompt_matches_hf_inputs_embeds(v10):
    hf, lm = v10
    (src, smask, tgt, tmask), batch = random_batch(11)
    prompt = torch.randn(P, 32, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        embeds = torch.cat([prompt[None].expand(B, -1, -1), hf.shared(src)], dim=1)
        mask = torch.cat([torch.ones(B, P, dtype=torch.long), smask], dim=1)
        ref = hf(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=hf._shift_right(tgt)).logits.numpy()
    ours = lm.model.apply({"params": lm.params}, batch, Prefix(prompt_embeds=jnp.asarray(prompt.numpy())))
    assert max_abs_diff(ours, ref, tmask.numpy()) < F32_ATOL


def test_relative_position_buckets_match_hf():
    relative = torch.arange(-300, 300)[None]
    for bidirectional in (True, False):
        ref = modeling_t5.T5Attention._relative_position_bucket(relative, bidirectional, 32, 128).numpy()
        ours = t5.relative_position_bucket(jnp.asarray(relative.numpy()), bidirectional, 32, 128)
        np.testing.assert_array_equal(np.asarray(ours), ref)


def test_missing_tensor_is_a_clear_error(v10, tmp_path):
    hf, _ = v10
    save_state_dict(hf, tmp_path, drop="decoder.final_layer_norm")
    with pytest.raises(ModelNotFoundError, match="decoder.final_layer_norm.weight"):
        load_pretrained(str(tmp_path))


def test_unknown_local_path_and_offline_hub_are_clear_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such directory"):
        load_pretrained(str(tmp_path / "nope"))
    with pytest.raises(ModelNotFoundError, match="--local-dir"):
        load_pretrained("google-t5/t5-this-does-not-exist")


def test_bfloat16_weights_and_compute(v10):
    hf, lm32 = v10
    lm16 = load_pretrained(str(lm32.model_dir), param_dtype="bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(lm16.params))
    _, batch = random_batch(13)
    a = np.asarray(lm32.model.apply({"params": lm32.params}, batch))
    b = np.asarray(lm16.model.apply({"params": lm16.params}, batch))
    assert b.dtype == np.float32  # logits (and softmax) stay float32
    valid = np.asarray(batch["target_mask"], bool)
    assert np.abs(a - b)[valid].max() < 0.05 * np.abs(a).max()
    with pytest.raises(ValueError, match="model.param_dtype"):
        load_pretrained(str(lm32.model_dir), param_dtype="float16")
