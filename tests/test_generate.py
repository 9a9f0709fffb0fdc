"""Decoding: token-for-token parity with transformers' generate, and a prefix that never goes missing."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_fixtures import left_pad, save_tiny
from transformers import T5Config, T5ForConditionalGeneration

from prefix_jax.generate import GenerationConfig, make_generate_fn
from prefix_jax.text_metrics import bleu, rouge
from prefix_jax.models import CROSS, DECODER, ENCODER, KV, NO_PREFIX, Prefix, load_pretrained

B, S, NEW = 6, 9, 12
EOS, PAD = 1, 0


@pytest.fixture(scope="module")
def t5_pair(tmp_path_factory):
    torch.manual_seed(5)
    cfg = T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0,
                   relative_attention_num_buckets=8)
    hf = T5ForConditionalGeneration(cfg).eval()
    # Point EOS's embedding along the typical final decoder state, so hypotheses finish at various steps.
    src, mask = sources()
    with torch.no_grad():
        out = hf(input_ids=src, attention_mask=mask, decoder_input_ids=torch.randint(2, 99, (B, NEW)),
                 output_hidden_states=True)
        direction = out.decoder_hidden_states[-1].reshape(-1, 32).mean(0)
        hf.shared.weight[EOS] = 8.0 * direction / direction.norm()
    return hf, load_pretrained(str(save_tiny(hf, tmp_path_factory.mktemp("t5gen"))))


def sources(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(2, 99, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, 5:] = 0
    mask[4, 2:] = 0
    return src, mask


def until_eos(rows: np.ndarray) -> list[list[int]]:
    """Each row up to and including its first EOS (padding conventions after EOS differ between libraries)."""
    out = []
    for row in rows.tolist():
        out.append(row[:row.index(EOS) + 1] if EOS in row else row)
    return out


@pytest.mark.parametrize("beams,length_penalty", [(1, 1.0), (4, 0.6), (5, -0.5)] + [  # one compile each
    pytest.param(*case, marks=pytest.mark.slow) for case in [(4, 1.0), (3, 2.0), (2, 0.0)]])
def test_matches_transformers_generate(t5_pair, beams, length_penalty):
    hf, lm = t5_pair
    src, mask = sources()
    with torch.no_grad():
        ref = hf.generate(input_ids=src, attention_mask=mask, max_new_tokens=NEW, num_beams=beams, do_sample=False,
                          length_penalty=length_penalty, eos_token_id=EOS, pad_token_id=PAD).numpy()[:, 1:]
    fn = make_generate_fn(lm.model, GenerationConfig(NEW, beams, length_penalty))
    ours = np.asarray(fn(lm.params, NO_PREFIX, jnp.asarray(src.numpy()), jnp.asarray(mask.numpy())))
    assert until_eos(ours) == until_eos(ref)
    assert any(EOS in row for row in until_eos(ours))  # the finishing logic was exercised


def random_prefix(lm, length=4, seed=0) -> Prefix:
    rng = np.random.default_rng(seed)
    kv = {}
    for placement, g in lm.config.prefix_geometry().items():
        shape = (g.num_layers, g.num_heads, length, g.head_dim)
        kv[placement] = KV(jnp.asarray(rng.normal(size=shape), jnp.float32),
                           jnp.asarray(rng.normal(size=shape), jnp.float32))
    return Prefix(kv=kv)


@pytest.mark.parametrize("beams", [1, pytest.param(3, marks=pytest.mark.slow)])
def test_prefix_survives_batch_size_padding_side_and_beams(t5_pair, beams):
    _, lm = t5_pair
    prefix = random_prefix(lm)
    src, mask = (x.numpy() for x in sources(1))
    fn = make_generate_fn(lm.model, GenerationConfig(NEW, beams))
    batched = np.asarray(fn(lm.params, prefix, jnp.asarray(src), jnp.asarray(mask)))
    one_by_one = np.concatenate([np.asarray(fn(lm.params, prefix, jnp.asarray(src[i:i + 1]), jnp.asarray(mask[i:i + 1])))
                                 for i in range(B)])
    left = np.asarray(fn(lm.params, prefix, *map(jnp.asarray, left_pad(src, mask))))
    plain = np.asarray(fn(lm.params, NO_PREFIX, jnp.asarray(src), jnp.asarray(mask)))
    np.testing.assert_array_equal(batched, one_by_one)
    np.testing.assert_array_equal(batched, left)
    assert not np.array_equal(batched, plain)  # the prefix steers decoding


@pytest.mark.parametrize("beams,length_penalty", [pytest.param(1, 1.0, marks=pytest.mark.slow), (3, 0.6)])
def test_decoder_prefix_matches_transformers_generate_given_the_prefix_as_its_cache(t5_pair, beams, length_penalty):
    """HF fed the prefix as its cache: self-attention K/V `[B * beams, H, P, K]` per layer, P placeholder decoder
    ids before the start token (so only the start token is new) and a decoder mask of ones over them."""
    from hf_fixtures import hf_decoder_cache, random_kv

    hf, lm = t5_pair
    P = 4
    kv, (k, v) = random_kv(lm.config.prefix_geometry()[DECODER], 7, P)
    src, mask = sources(3)
    placeholders = torch.full((B, P + 1), hf.config.decoder_start_token_id)
    with torch.no_grad():
        ref = hf.generate(input_ids=src, attention_mask=mask, decoder_input_ids=placeholders,
                          decoder_attention_mask=torch.ones_like(placeholders),
                          past_key_values=hf_decoder_cache(k, v, B * beams), max_new_tokens=NEW, num_beams=beams,
                          do_sample=False, length_penalty=length_penalty, eos_token_id=EOS,
                          pad_token_id=PAD).numpy()[:, P + 1:]
    fn = make_generate_fn(lm.model, GenerationConfig(NEW, beams, length_penalty))
    ours = np.asarray(fn(lm.params, Prefix(kv={DECODER: kv}), jnp.asarray(src.numpy()), jnp.asarray(mask.numpy())))
    plain = np.asarray(fn(lm.params, NO_PREFIX, jnp.asarray(src.numpy()), jnp.asarray(mask.numpy())))
    assert until_eos(ours) == until_eos(ref)
    assert until_eos(ours) != until_eos(plain)  # the prefix steers decoding
    assert any(EOS in row for row in until_eos(ours))  # the finishing logic was exercised


def test_greedy_output_is_the_argmax_of_teacher_forcing_with_every_placement(t5_pair):
    """Each decoded token is what the full (teacher-forced) model with the same prefix predicts there."""
    _, lm = t5_pair
    prefix = random_prefix(lm, seed=3)
    assert set(prefix.kv) == {ENCODER, DECODER, CROSS}
    src, mask = (jnp.asarray(x.numpy()) for x in sources(2))
    tokens = np.asarray(make_generate_fn(lm.model, GenerationConfig(NEW, 1))(lm.params, prefix, src, mask))
    valid = np.ones_like(tokens)
    for b, row in enumerate(tokens.tolist()):
        if EOS in row:
            valid[b, row.index(EOS) + 1:] = 0
    batch = {"source_ids": src, "source_mask": mask, "target_ids": jnp.asarray(tokens),
             "target_mask": jnp.asarray(valid)}
    logits = np.asarray(lm.model.apply({"params": lm.params}, batch, prefix))
    np.testing.assert_array_equal(np.argmax(logits, -1)[valid == 1], tokens[valid == 1])


def test_metrics_on_known_strings():
    assert bleu(["the cat sat on the mat"], [["the cat sat on the mat"]]) == pytest.approx(100.0)
    assert bleu(["a b c d"], [["w x y z"]]) == pytest.approx(0.0)
    # The best of several references counts, as in E2E/DART evaluation.
    assert bleu(["the cat sat on the mat"], [["completely different words here", "the cat sat on the mat"]]) == \
        pytest.approx(100.0)
    scores = rouge(["the cat sat on the mat"], [["the cat sat on a mat"]])
    assert scores["rouge1"] == pytest.approx(100 * 5 / 6)
    assert scores["rouge2"] == pytest.approx(100 * 3 / 5)
