"""GPT-2 beyond the shared contract (test_architectures.py): positions from zero, an infix, greedy generation,
dropout, the real-word init, its checkpoint layouts and refused options."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from families import FAMILY, SEP, gpt2_config, hf_prefix_cache as _hf_prefix_cache, left_padded
from hf_fixtures import max_abs_diff, random_kv as _random_kv, save_tiny
from tolerances import F32_ATOL

from prefix_jax.models import DECODER, NO_PREFIX, Prefix, gpt2, load_pretrained, params_to_hf

GPT2 = FAMILY["gpt2"]
B, S, T, P = dataclasses.astuple(GPT2.sizes)
random_kv = functools.partial(_random_kv, length=P)
hf_prefix_cache = functools.partial(_hf_prefix_cache, rows=B)
VOCAB = GPT2.vocab
target_logits = GPT2.target_logits

@pytest.fixture
def base(tiny_hf):
    return tiny_hf("gpt2", "base")

def random_batch(seed: int = 0) -> dict[str, np.ndarray]:
    """Right-padded, ragged sources and targets (pads are id 0)."""
    return GPT2.batch(seed).batch

def jnp_batch(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v) for k, v in batch.items()}
def run(lm, batch, prefix=NO_PREFIX, config=None):
    model = lm.model if config is None else gpt2.Model(config)
    return model.apply({"params": lm.params}, jnp_batch(batch), prefix)

def test_positions_after_prefix_false_matches_hf_positions_from_zero(base):
    hf, lm = base
    assert lm.config.positions_after_prefix
    x = GPT2.batch(4)
    batch, ids, mask, starts = x.batch, x.ids, x.mask, x.starts
    kv, (k, v) = random_kv(lm.config.prefix_geometry()[DECODER], 5)
    with torch.no_grad():
        ref = target_logits(hf(input_ids=ids, attention_mask=torch.cat([torch.ones(B, P, dtype=torch.long), mask], 1),
                               position_ids=torch.arange(ids.shape[1])[None].expand(B, -1),
                               past_key_values=hf_prefix_cache(k, v)).logits, starts)
    unshifted = dataclasses.replace(lm.config, positions_after_prefix=False)
    prefix = Prefix(kv={DECODER: kv})
    ours = run(lm, left_padded(batch), prefix, unshifted)
    assert max_abs_diff(ours, ref, batch["target_mask"]) < F32_ATOL
    assert max_abs_diff(run(lm, batch, prefix), ref, batch["target_mask"]) > 1e-2  # the flag really acts
    # Without a prefix the flag changes nothing.
    assert max_abs_diff(run(lm, batch, Prefix(), unshifted), run(lm, batch), batch["target_mask"]) < 1e-6

@pytest.mark.parametrize("kind", ["none", "prefix", "infix"])
def test_greedy_generation_agrees_with_teacher_forcing_and_hf(base, kind):
    """`generate` drives `decode`: its greedy tokens are the argmax of our teacher-forced logits given them,
    and without a prefix HF's greedy search from `[source, SEP]` (compared up to the first EOS)."""
    from prefix_jax.generate import GenerationConfig, generate

    hf, lm = base
    batch = left_padded(random_batch(23))
    kv = random_kv(lm.config.prefix_geometry()[DECODER], 24)[0]
    prefix = Prefix() if kind == "none" else Prefix(kv={DECODER: kv}, infix=kind == "infix")
    tokens = np.asarray(generate(lm.model, lm.params, prefix, jnp.asarray(batch["source_ids"]),
                                 jnp.asarray(batch["source_mask"]), GenerationConfig(max_new_tokens=T)))
    until_eos = np.cumsum(tokens == lm.config.eos_token_id, axis=1) - (tokens == lm.config.eos_token_id) == 0
    forced = run(lm, dict(batch, target_ids=tokens, target_mask=until_eos.astype(np.int32)), prefix)
    assert (np.asarray(forced.argmax(-1)) == tokens)[until_eos].all()
    if kind == "none":
        for b in range(B):
            src = batch["source_ids"][b][batch["source_mask"][b] == 1]
            with torch.no_grad():
                ref = hf.generate(torch.tensor([[*src, SEP]]), max_new_tokens=T, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[0, len(src) + 1:].numpy()
            np.testing.assert_array_equal(tokens[b][until_eos[b]], ref[until_eos[b]])

def test_infix_hides_kv_from_source_and_shifts_target(base):
    _, lm = base
    model, params = lm.model, {"params": lm.params}
    batch = jnp_batch(left_padded(random_batch(13)))
    geometry = lm.config.prefix_geometry()[DECODER]
    kv_a, kv_b = random_kv(geometry, 14)[0], random_kv(geometry, 15)[0]
    hidden = lambda prefix: model.apply(params, batch, prefix, method=model.hidden_states)
    h_a, start = hidden(Prefix(kv={DECODER: kv_a}, infix=True))
    h_b, _ = hidden(Prefix(kv={DECODER: kv_b}, infix=True))
    h_none, _ = hidden(Prefix())
    assert start == S
    source_valid = batch["source_mask"]
    assert max_abs_diff(h_a[:, :S], h_b[:, :S], source_valid) < 1e-6
    assert max_abs_diff(h_a[:, :S], h_none[:, :S], source_valid) < F32_ATOL  # the source is plain LM context
    assert max_abs_diff(h_a[:, S:], h_b[:, S:], batch["target_mask"]) > 1e-2
    as_infix = run(lm, batch, Prefix(kv={DECODER: kv_a}, infix=True))
    as_prefix = run(lm, batch, Prefix(kv={DECODER: kv_a}))
    assert max_abs_diff(as_infix, as_prefix, batch["target_mask"]) > 1e-2

def test_infix_matches_hf_with_custom_mask_and_positions(base):
    """HF given the K/V as a cache, a 4D mask hiding it from source queries, and target positions after it."""
    hf, lm = base
    x = GPT2.batch(16)
    batch, ids, mask, starts = x.batch, x.ids, x.mask, x.starts
    kv, (k, v) = random_kv(lm.config.prefix_geometry()[DECODER], 17)
    width = ids.shape[1]
    allowed = torch.zeros(B, 1, width, P + width, dtype=torch.bool)
    positions = torch.zeros(B, width, dtype=torch.long)
    for b, s in enumerate(starts):
        n = int(mask[b].sum())
        allowed[b, 0, :n, P:P + n] = torch.tril(torch.ones(n, n, dtype=torch.bool))
        allowed[b, 0, s:n, :P] = True  # target side only
        positions[b, :n] = torch.arange(n) + P * (torch.arange(n) >= s)
    allowed[:, 0, :, P] |= ~allowed.any(-1)[:, 0]  # pad queries see something: no NaN rows
    additive = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)
    with torch.no_grad():
        ref = target_logits(hf(input_ids=ids, attention_mask=additive, position_ids=positions,
                               past_key_values=hf_prefix_cache(k, v)).logits, starts)
    ours = run(lm, left_padded(batch), Prefix(kv={DECODER: kv}, infix=True))
    assert max_abs_diff(ours, ref, batch["target_mask"]) < F32_ATOL

def test_dropout_only_when_not_deterministic(base):
    _, lm = base
    batch = jnp_batch(random_batch(20))
    apply = jax.jit(lambda seed: lm.model.apply({"params": lm.params}, batch, Prefix(), False,
                                                rngs={"dropout": jax.random.PRNGKey(seed)}))
    assert lm.config.attn_pdrop > 0 and lm.config.resid_pdrop > 0
    assert max_abs_diff(apply(0), apply(0)) == 0.0
    assert max_abs_diff(apply(0), apply(1)) > 1e-2
    assert max_abs_diff(apply(0), run(lm, batch)) > 1e-2

def test_words_init_takes_gpt2s_own_keys_and_values(base):
    """`prefix_direct` from words == the K/V HF GPT-2 caches for that text (the paper's real-word init)."""
    from prefix_jax import prefix as prefix_lib
    from prefix_jax import prefix_init

    hf, lm = base
    text = [5, 17, 33, 9]
    with torch.no_grad():
        cache = hf(input_ids=torch.tensor([text]), use_cache=True).past_key_values
    spec = prefix_lib.PrefixSpec(length=len(text), placements=(DECODER,), geometry=lm.config.prefix_geometry(),
                                 hidden_size=32, method="prefix_direct", init="words")
    params, _ = prefix_init.init_from_text(spec, prefix_lib.init_params(spec, jax.random.PRNGKey(0)), lm.model,
                                           lm.params, text)
    kv = prefix_lib.materialize(params, spec).kv[DECODER]
    for layer in range(3):
        np.testing.assert_allclose(kv.key[layer], cache.layers[layer].keys[0].numpy(), atol=F32_ATOL)
        np.testing.assert_allclose(kv.value[layer], cache.layers[layer].values[0].numpy(), atol=F32_ATOL)

def test_checkpoint_layouts_and_round_trip(base, tmp_path):
    hf, lm = base
    assert lm.config.separator_token_id == SEP and lm.config.pad_token_id is None
    # `GPT2Model` (and the original OpenAI upload) has no "transformer." in its tensor names.
    bare = load_pretrained(str(save_tiny(hf.transformer, tmp_path / "bare")))
    jax.tree.map(np.testing.assert_array_equal, bare.params, lm.params)
    tensors = params_to_hf(lm.params, lm.config)
    expected = {k: v.numpy() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    assert set(tensors) == set(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(tensors[name], value, err_msg=name)

@pytest.mark.parametrize("field, value", [("scale_attn_by_inverse_layer_idx", True), ("add_cross_attention", True),
                                          ("tie_word_embeddings", False)])
def test_unsupported_options_are_clear_errors(field, value):
    with pytest.raises(ValueError, match=field):
        gpt2.Config.from_hf(gpt2_config(**{field: value}), set())

def test_too_many_positions_is_a_clear_error(base):
    _, lm = base
    kv = random_kv(lm.config.prefix_geometry()[DECODER], 21, length=64 - S - T + 1)[0]
    with pytest.raises(ValueError, match="positions"):
        run(lm, random_batch(22), Prefix(kv={DECODER: kv}))
