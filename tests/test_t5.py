"""T5 beyond the shared contract (test_architectures.py): encoder and cross prefixes against HF attention
patched as the paper's code does, relative position buckets, load errors, bfloat16 weights."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from families import FAMILY
from hf_fixtures import hf_decoder_cache as _hf_decoder_cache, max_abs_diff, random_kv as _random_kv
from tolerances import F32_ATOL
from transformers.models.t5 import modeling_t5

from prefix_jax.models import CROSS, DECODER, ENCODER, Prefix, load_pretrained, t5
from prefix_jax.hub import ModelNotFoundError

T5 = FAMILY["t5"]
B, S, T, P = dataclasses.astuple(T5.sizes)
random_kv = functools.partial(_random_kv, length=P)
hf_decoder_cache = functools.partial(_hf_decoder_cache, batch=B)


@pytest.fixture
def v10(tiny_hf):
    """T5 v1.0 layout: ReLU FFN, tied head with d_model**-0.5 scaling. d_kv*heads != d_model on purpose."""
    return tiny_hf("t5", "v10")


def random_batch(seed: int):
    x = T5.batch(seed)
    return (x.src, x.smask, x.tgt, x.tmask), x.ours()


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


def test_relative_position_buckets_match_hf():
    relative = torch.arange(-300, 300)[None]
    for bidirectional in (True, False):
        ref = modeling_t5.T5Attention._relative_position_bucket(relative, bidirectional, 32, 128).numpy()
        ours = t5.relative_position_bucket(jnp.asarray(relative.numpy()), bidirectional, 32, 128)
        np.testing.assert_array_equal(np.asarray(ours), ref)


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
