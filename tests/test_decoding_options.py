"""Decoding options (min_new_tokens, n-gram blocking, repetition penalty, forced BOS/EOS, sampling filters):
the same scores as transformers' logits processors, and the same tokens as its `generate`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_fixtures import random_kv, save_tiny
from transformers import (BartConfig, BartForConditionalGeneration, GPT2Config, GPT2LMHeadModel, T5Config,
                          T5ForConditionalGeneration)
from transformers.cache_utils import DynamicCache
from transformers.generation import logits_process as hf_lp

from prefix_jax import logits_processing
from prefix_jax.generate import GenerationConfig, make_generate_fn
from prefix_jax.models import DECODER, NO_PREFIX, Prefix, load_pretrained

B, S, NEW, VOCAB = 4, 7, 10, 40


def until_eos(rows: np.ndarray, eos: int) -> list[list[int]]:
    return [row[:row.index(eos) + 1] if eos in row else row for row in np.asarray(rows).tolist()]


# --- The processors alone, on random scores, against transformers' own processor classes. ---

def _hf_scores(processors, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    out = hf_lp.LogitsProcessorList(processors)(torch.tensor(input_ids), torch.tensor(scores))
    return out.numpy()


def _ours(scores, input_ids, cfg, t, sampling=False, eos=1):
    """Our processing with `input_ids` = a prompt of width C0 = len - t followed by t generated tokens."""
    c0 = input_ids.shape[1] - t
    prompt, generated = input_ids[:, :c0], input_ids[:, c0:]
    generated = np.concatenate([generated, np.full((generated.shape[0], cfg.max_new_tokens - t), 7)], axis=1)
    return np.asarray(logits_processing.process(jnp.asarray(scores), jnp.asarray(prompt, jnp.int32),
                                                jnp.asarray(generated, jnp.int32), jnp.asarray(t), cfg, eos, sampling))


def _random_case(seed: int, rows=6, length=12, vocab=VOCAB):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 6, (rows, length))  # few distinct tokens: repeats and n-gram hits are common
    return ids, rng.normal(size=(rows, vocab)).astype(np.float32) * 3


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_bans_what_transformers_bans(n):
    ids, scores = _random_case(n)
    cfg = GenerationConfig(max_new_tokens=8, no_repeat_ngram_size=n)
    ours = _ours(scores, ids, cfg, t=5)
    ref = _hf_scores([hf_lp.NoRepeatNGramLogitsProcessor(n)], ids, scores)
    np.testing.assert_array_equal(ours, ref)
    assert np.isinf(ref).any()


@pytest.mark.parametrize("penalty", [1.7, 0.6])
def test_repetition_penalty_matches(penalty):
    ids, scores = _random_case(10)
    cfg = GenerationConfig(max_new_tokens=8, repetition_penalty=penalty)
    ref = _hf_scores([hf_lp.RepetitionPenaltyLogitsProcessor(penalty)], ids, scores)
    np.testing.assert_allclose(_ours(scores, ids, cfg, t=4), ref, rtol=1e-6)
    assert not np.allclose(ref, scores)


def test_history_ignores_empty_prompt_slots():
    """Right-aligned prompts with empty slots (-1): as transformers with the padding left out."""
    ids, scores = _random_case(11)
    cfg = GenerationConfig(max_new_tokens=8, no_repeat_ngram_size=2, repetition_penalty=1.3)
    holey = ids.copy()
    holey[:, :3] = logits_processing.NO_TOKEN
    ours = _ours(scores, holey, cfg, t=4)
    for r in range(ids.shape[0]):
        ref = _hf_scores([hf_lp.RepetitionPenaltyLogitsProcessor(1.3), hf_lp.NoRepeatNGramLogitsProcessor(2)],
                         ids[r:r + 1, 3:], scores[r:r + 1])
        np.testing.assert_allclose(ours[r:r + 1], ref, rtol=1e-6)


def test_min_new_tokens_and_forced_tokens_match():
    ids, scores = _random_case(12, length=5)
    eos, new = 3, 6
    cfg = GenerationConfig(max_new_tokens=new, min_new_tokens=4, forced_bos_token_id=9, forced_eos_token_id=eos)
    prompt_len = 1  # an encoder-decoder's decoder start token
    for t in range(new):
        input_ids = ids[:, :prompt_len + t] if t < 4 else np.concatenate([ids, ids], 1)[:, :prompt_len + t]
        ref = _hf_scores([hf_lp.MinNewTokensLengthLogitsProcessor(prompt_len, 4, eos),
                          hf_lp.ForcedBOSTokenLogitsProcessor(9),
                          hf_lp.ForcedEOSTokenLogitsProcessor(prompt_len + new, eos)], input_ids, scores)
        np.testing.assert_array_equal(_ours(scores, input_ids, cfg, t=t, eos=eos), ref)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.8), (1.3, 7, 0.6),
                                                     (1.0, 1, 1.0), (0.5, 0, 0.05)])
def test_sampling_filters_match_transformers_warpers(temperature, top_k, top_p):
    ids, scores = _random_case(13)
    cfg = GenerationConfig(max_new_tokens=4, do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    warpers = []
    if temperature != 1.0:
        warpers.append(hf_lp.TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(hf_lp.TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(hf_lp.TopPLogitsWarper(top_p))
    ref = _hf_scores(warpers, ids, scores)
    ours = _ours(scores, ids, cfg, t=2, sampling=True)
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    np.testing.assert_allclose(ours[~np.isinf(ours)], ref[~np.isinf(ref)], rtol=1e-6)


def test_samples_follow_the_filtered_distribution():
    """Sampled frequencies over many draws match softmax of the filtered scores, and never leave the filter."""
    _, scores = _random_case(14, rows=1, vocab=12)
    cfg = GenerationConfig(max_new_tokens=2, do_sample=True, temperature=0.8, top_k=4)
    filtered = logits_processing.process(jnp.asarray(scores), jnp.zeros((1, 1), jnp.int32),
                                         jnp.zeros((1, 2), jnp.int32), jnp.asarray(0), cfg, 1, True)
    draws = np.asarray(jax.random.categorical(jax.random.key(0), filtered[0], shape=(20000,)))
    freq = np.bincount(draws, minlength=12) / draws.size
    expected = np.asarray(jax.nn.softmax(filtered[0]))
    assert set(np.nonzero(freq)[0]) <= set(np.argsort(scores[0])[-4:])
    np.testing.assert_allclose(freq, expected, atol=0.015)


@pytest.mark.parametrize("kw", [dict(do_sample=True, num_beams=2), dict(top_k=3), dict(top_p=0.0),
                                dict(repetition_penalty=0.0), dict(no_repeat_ngram_size=-1), dict(min_new_tokens=-2),
                                dict(temperature=0.0, do_sample=True), dict(forced_eos_token_id=-1)])
def test_bad_options_are_one_line_errors_naming_the_field(kw):
    with pytest.raises(ValueError, match=r"^generate\.\w+") as err:
        GenerationConfig(**kw)
    assert "\n" not in str(err.value)


def test_from_config_rejects_unknown_fields():
    assert GenerationConfig.from_config({"num_beams": 3, "no_repeat_ngram_size": 2}).no_repeat_ngram_size == 2
    with pytest.raises(ValueError, match="generate.beams is not a decoding option"):
        GenerationConfig.from_config({"beams": 3})


# --- Whole decoding loops against transformers' generate on tiny checkpoints. ---

@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    torch.manual_seed(1)
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0,
                   relative_attention_num_buckets=8, eos_token_id=1, pad_token_id=0)
    return _with_eos_direction(_noisy(T5ForConditionalGeneration(cfg).eval()), tmp_path_factory, "t5")


@pytest.fixture(scope="module")
def bart(tmp_path_factory):
    torch.manual_seed(2)
    cfg = BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                     decoder_start_token_id=0)  # not EOS, so EOS can be steered apart from the start token
    return _with_eos_direction(_noisy(BartForConditionalGeneration(cfg).eval()), tmp_path_factory, "bart", 1.0)


def _noisy(hf, scale=0.3):
    """HF's tiny inits make a decoder that ignores its input; noise on every weight makes rows differ."""
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(scale * torch.randn_like(p))
    return hf


def _with_eos_direction(hf, tmp_path_factory, name, scale=3.0):
    """Point EOS's embedding along the typical final decoder state, so hypotheses end at various steps."""
    src, mask = _sources(0)
    eos = hf.config.eos_token_id
    with torch.no_grad():
        out = hf(input_ids=src, attention_mask=mask, decoder_input_ids=torch.randint(3, VOCAB, (B, NEW)),
                 output_hidden_states=True)
        direction = out.decoder_hidden_states[-1].reshape(-1, 32).mean(0)
        hf.get_input_embeddings().weight[eos] = scale * direction / direction.norm()
    return hf, load_pretrained(str(save_tiny(hf, tmp_path_factory.mktemp(name))))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    torch.manual_seed(3)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2,
                     initializer_range=0.3)
    hf = GPT2LMHeadModel(cfg).eval()
    return hf, load_pretrained(str(save_tiny(hf, tmp_path_factory.mktemp("gpt2"))))


def _sources(seed: int, ragged: bool = True):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, VOCAB, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    if ragged:
        mask[1, 4:] = 0
        mask[3, 2:] = 0
    return src, mask


# The first combination runs by default; each option alone is a slow check (one compile per setting).
COMBINED = dict(min_new_tokens=3, no_repeat_ngram_size=2, repetition_penalty=1.3)
SINGLE = [dict(min_new_tokens=6), dict(no_repeat_ngram_size=2), dict(repetition_penalty=1.8),
          dict(repetition_penalty=0.5, no_repeat_ngram_size=3), dict(forced_bos_token_id=5, forced_eos_token_id="eos")]
OPTIONS = [COMBINED] + [pytest.param(o, marks=pytest.mark.slow) for o in SINGLE]
_ID = lambda o: ",".join(o)


def _resolve(options: dict, eos: int) -> dict:
    return {k: eos if v == "eos" else v for k, v in options.items()}


def _hf_generate(hf, src, mask, beams, options, **extra):
    full = {**dict(min_new_tokens=0, no_repeat_ngram_size=0, repetition_penalty=1.0, forced_bos_token_id=None,
                   forced_eos_token_id=None), **options}
    with torch.no_grad():
        return hf.generate(input_ids=src, attention_mask=mask, max_new_tokens=NEW, num_beams=beams, do_sample=False,
                           length_penalty=1.0, early_stopping=False, **full, **extra).numpy()


@pytest.mark.parametrize("options", OPTIONS, ids=_ID)
@pytest.mark.parametrize("beams,which", [(3, "t5"), pytest.param(3, "bart", marks=pytest.mark.slow),
                                         pytest.param(1, "t5", marks=pytest.mark.slow),
                                         pytest.param(1, "bart", marks=pytest.mark.slow)])
def test_encoder_decoder_matches_generate(which, beams, options, request):
    hf, lm = request.getfixturevalue(which)
    eos = lm.config.eos_token_id
    options = _resolve(options, eos)
    src, mask = _sources(4)
    ref = _hf_generate(hf, src, mask, beams, options, eos_token_id=eos, pad_token_id=lm.config.pad_token_id)[:, 1:]
    cfg = GenerationConfig(NEW, beams, **options)
    ours = np.asarray(make_generate_fn(lm.model, cfg)(lm.params, NO_PREFIX, jnp.asarray(src.numpy()),
                                                      jnp.asarray(mask.numpy())))
    assert until_eos(ours, eos) == until_eos(ref, eos)
    plain = until_eos(_plain(hf, lm, beams, src, mask), eos)
    if options.keys() != {"min_new_tokens"} or min(map(len, plain)) < options["min_new_tokens"]:
        assert plain != until_eos(ours, eos)  # the option changed something


def _plain(hf, lm, beams, src, mask):
    with torch.no_grad():
        return hf.generate(input_ids=src, attention_mask=mask, max_new_tokens=NEW, num_beams=beams, do_sample=False,
                           early_stopping=False, eos_token_id=lm.config.eos_token_id,
                           pad_token_id=lm.config.pad_token_id, forced_bos_token_id=None,
                           forced_eos_token_id=None).numpy()[:, 1:]


def _gpt2_hf_cache(kv, batch):
    k, v = (torch.tensor(np.asarray(x)) for x in kv)
    e = lambda x: x[None].expand(batch, -1, -1, -1).clone()
    return DynamicCache([(e(k[i]), e(v[i])) for i in range(k.shape[0])])


@pytest.mark.parametrize("options", [COMBINED] + [pytest.param(o, marks=pytest.mark.slow) for o in SINGLE
                                                  if "forced_bos_token_id" not in o] +
                         [pytest.param(dict(forced_eos_token_id="eos"), marks=pytest.mark.slow)], ids=_ID)
@pytest.mark.parametrize("with_prefix,beams", [(True, 3), pytest.param(True, 1, marks=pytest.mark.slow),
                                              pytest.param(False, 1, marks=pytest.mark.slow),
                                              pytest.param(False, 3, marks=pytest.mark.slow)])
def test_gpt2_with_prefix_matches_generate(gpt2, beams, options, with_prefix):
    """HF given the prefix as its cache (and P leading ones in the mask), from `[source, SEP]`."""
    hf, lm = gpt2
    eos, sep, P = lm.config.eos_token_id, lm.config.separator_token_id, 3
    options = _resolve(options, eos)
    src, _ = _sources(5, ragged=False)
    src_ids = torch.cat([src, torch.full((B, 1), sep)], dim=1)
    kv = random_kv(lm.config.prefix_geometry()[DECODER], 6, P)[0]
    prefix = Prefix(kv={DECODER: kv}) if with_prefix else NO_PREFIX
    extra = dict(past_key_values=_gpt2_hf_cache(kv, B * beams)) if with_prefix else {}
    mask = torch.ones(B, (P if with_prefix else 0) + S + 1, dtype=torch.long)
    ref = _hf_generate(hf, src_ids, mask, beams, options, eos_token_id=eos, pad_token_id=0, **extra)[:, S + 1:]
    cfg = GenerationConfig(NEW, beams, **options)
    ours = np.asarray(make_generate_fn(lm.model, cfg)(lm.params, prefix, jnp.asarray(src.numpy()),
                                                      jnp.ones((B, S), jnp.int32)))
    assert until_eos(ours, eos) == until_eos(ref, eos)


@pytest.mark.slow
def test_sampling_is_seeded_and_top_k_1_is_greedy(t5):
    hf, lm = t5
    src, mask = (jnp.asarray(x.numpy()) for x in _sources(7))
    greedy = make_generate_fn(lm.model, GenerationConfig(NEW))(lm.params, NO_PREFIX, src, mask)
    top1 = make_generate_fn(lm.model, GenerationConfig(NEW, do_sample=True, top_k=1, temperature=0.5))
    np.testing.assert_array_equal(top1(lm.params, NO_PREFIX, src, mask, jax.random.key(3)), greedy)
    sample = make_generate_fn(lm.model, GenerationConfig(NEW, do_sample=True, temperature=2.0))
    a = np.asarray(sample(lm.params, NO_PREFIX, src, mask, jax.random.key(1)))
    np.testing.assert_array_equal(a, sample(lm.params, NO_PREFIX, src, mask, jax.random.key(1)))
    assert not np.array_equal(a, sample(lm.params, NO_PREFIX, src, mask, jax.random.key(2)))
    np.testing.assert_array_equal(sample(lm.params, NO_PREFIX, src, mask),
                                  sample(lm.params, NO_PREFIX, src, mask, jax.random.key(0)))  # cfg.seed = 0


def test_forced_bos_on_a_decoder_only_model_is_refused(gpt2):
    _, lm = gpt2
    with pytest.raises(ValueError, match="generate.forced_bos_token_id applies to encoder-decoder"):
        make_generate_fn(lm.model, GenerationConfig(4, forced_bos_token_id=0))(
            lm.params, NO_PREFIX, jnp.ones((1, 3), jnp.int32), jnp.ones((1, 3), jnp.int32))
