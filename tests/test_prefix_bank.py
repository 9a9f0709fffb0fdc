"""A batch mixing rows of 3 prefixes of different lengths == 3 separate single-prefix runs (T5, BART, GPT-2, Llama,
Gemma 2 and Phi-3 with sliding windows shorter than prefix + text), teacher-forced and decoded (greedy and beam); each
prefix of a bank gets gradients from its own rows only."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_fixtures import random_kv, save_tiny
from tolerances import F32_ATOL
from transformers import BartConfig, BartForConditionalGeneration, Gemma2Config, Gemma2ForCausalLM, GPT2Config, \
    GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM, T5Config, T5ForConditionalGeneration

from prefix_jax import prefix_bank
from prefix_jax.generate import GenerationConfig, make_generate_fn
from prefix_jax.models import DECODER, Prefix, load_pretrained

VOCAB, S, T, NEW = 40, 6, 4, 6
LENGTHS = (2, 5, 3)
WINDOW = 4  # Gemma 2's and Phi-3's sliding window: prefixes slide out of view at different steps
ROWS = np.array([0, 1, 2, 1, 0, 2])  # every prefix on two rows, interleaved
B = len(ROWS)


def _noisy(hf, scale=0.3):
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(scale * torch.randn_like(p))
    return hf.eval()


def _hf(which):
    torch.manual_seed(7)
    if which == "gpt2":
        return _noisy(GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                                                 bos_token_id=1, eos_token_id=2)))
    if which == "llama":
        return _noisy(LlamaForCausalLM(LlamaConfig(
            vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32, bos_token_id=1, eos_token_id=2)), scale=0.1)
    if which == "gemma2":  # a sliding layer then a global one, soft-capping
        return _noisy(Gemma2ForCausalLM(Gemma2Config(
            vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=4, query_pre_attn_scalar=4, sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention"], attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0, max_position_embeddings=32, bos_token_id=1, eos_token_id=2, pad_token_id=0)),
            scale=0.1)
    if which == "phi3":  # partial rotary, every layer sliding
        return _noisy(Phi3ForCausalLM(Phi3Config(
            vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=32, sliding_window=WINDOW, bos_token_id=1, eos_token_id=2,
            pad_token_id=0, rope_parameters=dict(rope_type="default", rope_theta=100.0, partial_rotary_factor=0.5))),
            scale=0.1)
    if which.startswith("bart"):
        return _noisy(BartForConditionalGeneration(BartConfig(
            vocab_size=VOCAB, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32)))
    return _noisy(T5ForConditionalGeneration(T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2, relative_attention_num_buckets=8,
        decoder_start_token_id=0)), scale=0.1)


@pytest.fixture(scope="module", params=["t5", "bart", "bart_hf_positions", "gpt2", "llama", "gemma2", "phi3"])
def lm(request, tmp_path_factory):
    which = request.param  # also set by tests that parametrize `lm` indirectly
    overrides = {"positions_after_prefix": True} if which == "bart_hf_positions" else {}
    return which, load_pretrained(str(save_tiny(_hf(which), tmp_path_factory.mktemp(which))), **overrides)


def _prefixes(lm):
    out = []
    for i, length in enumerate(LENGTHS):
        kv = {p: random_kv(g, 10 * i + j, length)[0] for j, (p, g) in enumerate(lm.config.prefix_geometry().items())}
        out.append(Prefix(kv=kv))
    return out


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    source_mask = np.ones((B, S), np.int32)
    source_mask[1, 4:] = 0
    source_mask[4, 2:] = 0
    target_mask = np.ones((B, T), np.int32)
    target_mask[2, 3:] = 0
    return dict(source_ids=jnp.asarray(rng.integers(3, VOCAB, (B, S))), source_mask=jnp.asarray(source_mask),
                target_ids=jnp.asarray(rng.integers(3, VOCAB, (B, T))), target_mask=jnp.asarray(target_mask))


@pytest.mark.parametrize("lm", [  # bart_hf_positions: the same encoder-decoder shell as t5 and bart
    pytest.param("t5", marks=pytest.mark.slow), pytest.param("bart", marks=pytest.mark.slow), "bart_hf_positions",
    "gpt2", "llama", "gemma2", pytest.param("phi3", marks=pytest.mark.slow)], indirect=True)
def test_mixed_batch_logits_equal_separate_runs(lm):
    _, lm = lm
    prefixes = _prefixes(lm)
    bank = prefix_bank.for_rows(prefix_bank.stack(prefixes), ROWS)
    batch = _batch()
    params = {"params": lm.params}
    apply = jax.jit(lm.model.apply)
    mixed = np.asarray(apply(params, batch, bank))
    valid = np.asarray(batch["target_mask"], bool)
    for i, prefix in enumerate(prefixes):
        alone = np.asarray(apply(params, batch, prefix))
        rows = ROWS == i
        np.testing.assert_allclose(mixed[rows][valid[rows]], alone[rows][valid[rows]], atol=F32_ATOL)
    # Not vacuous: another prefix's rows really differ.
    other = np.asarray(apply(params, batch, prefixes[0]))
    assert np.abs(mixed[ROWS == 1] - other[ROWS == 1])[valid[ROWS == 1]].max() > 1e-2


def test_bank_round_trips_its_prefixes(lm):
    _, lm = lm
    prefixes = _prefixes(lm)
    bank = prefix_bank.stack(prefixes)
    assert prefix_bank.size(bank) == 3 and bank.length(DECODER) == max(LENGTHS)
    for i, prefix in enumerate(prefixes):
        back = prefix_bank.single(bank, i)
        for placement, kv in prefix.kv.items():
            np.testing.assert_array_equal(np.asarray(back.kv[placement].key), np.asarray(kv.key))


@pytest.mark.parametrize("beams", [1, pytest.param(3, marks=pytest.mark.slow)])
@pytest.mark.parametrize("lm", ["t5", "bart", pytest.param("bart_hf_positions", marks=pytest.mark.slow), "gpt2",
                                "llama", *(pytest.param(name, marks=pytest.mark.slow) for name in ("gemma2", "phi3"))],
                         indirect=True)  # (a sliding-window bank's logits stay in the default set)
def test_mixed_decoding_equals_separate_runs(lm, beams):
    which, lm = lm
    if beams == 1 and which in ("bart", "t5", "llama"):
        pytest.skip("slow-only: greedy runs by default on GPT-2, BART (HF positions) and Gemma 2; beam on all")
    prefixes = _prefixes(lm)
    bank = prefix_bank.for_rows(prefix_bank.stack(prefixes), ROWS)
    batch = _batch(1)
    src, mask = batch["source_ids"], batch["source_mask"]
    generate = make_generate_fn(lm.model, GenerationConfig(NEW, beams))
    mixed = np.asarray(generate(lm.params, bank, src, mask))
    separate = np.zeros_like(mixed)
    for i, prefix in enumerate(prefixes):
        rows = ROWS == i
        separate[rows] = np.asarray(generate(lm.params, prefix, src, mask))[rows]
    np.testing.assert_array_equal(mixed, separate)
    assert len({tuple(r) for r in mixed}) > 2  # the rows really decode differently


@pytest.mark.parametrize("lm", ["t5", "gpt2", pytest.param("bart", marks=pytest.mark.slow)], indirect=True)
def test_each_prefix_gets_gradients_only_from_its_own_rows(lm):
    _, lm = lm
    prefixes = _prefixes(lm)[:2]
    rows = jnp.asarray([0, 1, 1, 0, 0, 1])
    batch = _batch(2)
    params = {"params": lm.params}

    bank = prefix_bank.stack(prefixes)

    def loss(kv, weight_B):
        trainable = bank.replace(kv={p: b._replace(key=kv[p][0], value=kv[p][1]) for p, b in bank.kv.items()})
        logits = lm.model.apply(params, batch, prefix_bank.for_rows(trainable, rows))
        logp = jax.nn.log_softmax(logits)
        picked = jnp.take_along_axis(logp, batch["target_ids"][..., None], -1)[..., 0] * batch["target_mask"]
        return -(picked.sum(-1) * weight_B).sum()

    only_task0 = (rows == 0).astype(jnp.float32)
    grads = jax.jit(jax.grad(loss))({p: (b.key, b.value) for p, b in bank.kv.items()}, only_task0)
    for placement, (g_key, g_value) in grads.items():
        assert float(jnp.abs(g_key[:, 1]).max()) == 0.0 and float(jnp.abs(g_value[:, 1]).max()) == 0.0
        valid = np.asarray(bank.kv[placement].slot_valid[0, 0])
        assert float(jnp.abs(g_key[:, 0][..., valid, :]).max()) > 0.0
        # Empty (padding) slots of the shorter prefix get no gradient either.
        assert float(jnp.abs(g_key[:, 0][..., ~valid, :]).max(initial=0.0)) == 0.0


def test_prefixes_for_different_lms_do_not_stack(lm):
    _, lm = lm
    a = _prefixes(lm)[0]
    placement = next(iter(a.kv))
    kv = a.kv[placement]
    wider = kv._replace(key=jnp.concatenate([kv.key, kv.key], -1), value=jnp.concatenate([kv.value, kv.value], -1))
    with pytest.raises(prefix_bank.PrefixBankError, match="different"):
        prefix_bank.stack([a, Prefix(kv={**a.kv, placement: wider})])
