"""GPT-2 parity with transformers and PEFT, with a prefix, an infix and an embedding-only prompt."""

from __future__ import annotations

import copy
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_fixtures import left_pad, max_abs_diff, random_kv as _random_kv, save_state_dict, save_tiny
from tolerances import F32_ATOL
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.cache_utils import DynamicCache

from prefix_jax.models import DECODER, NO_PREFIX, Prefix, gpt2, load_pretrained, masks, params_to_hf
from prefix_jax.hub import ModelNotFoundError
from prefix_jax.peft_compat import prefix_from_peft

B, S, T, P = 3, 9, 6, 4
random_kv = functools.partial(_random_kv, length=P)
VOCAB, SEP = 101, 1


def tiny_config(**kw) -> GPT2Config:
    base = dict(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=3, n_head=4, bos_token_id=SEP, eos_token_id=2,
                initializer_range=0.2)
    return GPT2Config(**{**base, **kw})


def random_tiny(seed: int, **kw) -> GPT2LMHeadModel:
    """A tiny GPT-2 with every parameter random (layer-norm scales and biases included)."""
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(tiny_config(**kw)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return hf


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    hf = random_tiny(0)
    return hf, load_pretrained(str(save_tiny(hf, tmp_path_factory.mktemp("gpt2"))))


@pytest.fixture(scope="module")
def variant(tmp_path_factory):
    """Unscaled scores, explicit MLP width, exact GELU, another epsilon, HF's upcast attention path."""
    hf = random_tiny(1, scale_attn_weights=False, n_inner=48, activation_function="gelu", layer_norm_epsilon=1e-6,
                     reorder_and_upcast_attn=True, attn_implementation="eager")
    return hf, load_pretrained(str(save_tiny(hf, tmp_path_factory.mktemp("gpt2_variant"))))


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
    """The same examples with each source's real tokens moved to the right end."""
    ids, mask = left_pad(batch["source_ids"], batch["source_mask"])
    return dict(batch, source_ids=ids, source_mask=mask)


def jnp_batch(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v) for k, v in batch.items()}


def packed(batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """HF inputs: per example `[source real tokens, SEP, target real tokens]`, right-padded; and source lengths."""
    rows, starts = [], []
    for b in range(B):
        src = batch["source_ids"][b][batch["source_mask"][b] == 1]
        tgt = batch["target_ids"][b][batch["target_mask"][b] == 1]
        rows.append([*src, SEP, *tgt])
        starts.append(len(src))
    width = S + 1 + T
    ids, mask = torch.zeros(B, width, dtype=torch.long), torch.zeros(B, width, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, :len(row)], mask[b, :len(row)] = torch.tensor(row), 1
    return ids, mask, starts


def target_logits(hf_logits: torch.Tensor, starts: list[int], offset: int = 0) -> np.ndarray:
    """HF logits at our target slots: target t of example b is HF position `offset + starts[b] + t`."""
    return np.stack([hf_logits[b, offset + s: offset + s + T].numpy() for b, s in enumerate(starts)])


def hf_prefix_cache(k: torch.Tensor, v: torch.Tensor) -> DynamicCache:
    """A prefix as HF takes it: `past_key_values` holding `[B, H, P, K]` per layer (a fresh one per call)."""
    e = lambda x: x[None].expand(B, -1, -1, -1).clone()
    return DynamicCache([(e(k[i]), e(v[i])) for i in range(k.shape[0])])


def run(lm, batch, prefix=NO_PREFIX, config=None):
    model = lm.model if config is None else gpt2.Model(config)
    return model.apply({"params": lm.params}, jnp_batch(batch), prefix)


@pytest.mark.parametrize("which", ["base", "variant"])
@pytest.mark.parametrize("left", [False, True])
def test_logits_match_transformers_with_padding(which, left, request):
    hf, lm = request.getfixturevalue(which)
    batch = random_batch(1)
    ids, mask, starts = packed(batch)
    with torch.no_grad():
        ref = target_logits(hf(input_ids=ids, attention_mask=mask).logits, starts)
    ours = run(lm, left_padded(batch) if left else batch)
    assert ours.shape == (B, T, VOCAB) and ours.dtype == jnp.float32
    assert max_abs_diff(ours, ref, batch["target_mask"]) < F32_ATOL
    assert np.abs(ref).max() > 1.0  # weights large enough for the comparison to mean something


@pytest.mark.parametrize("left", [False, True])
def test_prefix_matches_hf_past_key_values(base, left):
    hf, lm = base
    batch = random_batch(2)
    kv, (k, v) = random_kv(lm.config.prefix_geometry()[DECODER], 3)
    ids, mask, starts = packed(batch)
    with torch.no_grad():  # HF puts real tokens after the cache: positions P, P+1, ...
        ref = target_logits(hf(input_ids=ids, attention_mask=torch.cat([torch.ones(B, P, dtype=torch.long), mask], 1),
                               past_key_values=hf_prefix_cache(k, v)).logits, starts)
    ours = run(lm, left_padded(batch) if left else batch, Prefix(kv={DECODER: kv}))
    assert max_abs_diff(ours, ref, batch["target_mask"]) < F32_ATOL
    assert max_abs_diff(run(lm, batch), ref, batch["target_mask"]) > 1e-2  # the prefix really acts


def test_positions_after_prefix_false_matches_hf_positions_from_zero(base):
    hf, lm = base
    assert lm.config.positions_after_prefix
    batch = random_batch(4)
    kv, (k, v) = random_kv(lm.config.prefix_geometry()[DECODER], 5)
    ids, mask, starts = packed(batch)
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


def test_matches_peft_causal_lm_prefix_tuning(base):
    from peft import PrefixTuningConfig, get_peft_model

    hf, lm = base
    torch.manual_seed(6)
    peft_model = get_peft_model(copy.deepcopy(hf), PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=True, encoder_hidden_size=24)).eval()
    batch = random_batch(7)
    ids, mask, starts = packed(batch)  # PEFT ignores padding for positions: pack to the right
    with torch.no_grad():
        tokens = peft_model.prompt_tokens["default"][None, :P]
        prompt_embeddings = peft_model.prompt_encoder["default"](tokens)[0].numpy()
        ref = target_logits(peft_model(input_ids=ids, attention_mask=mask).logits, starts)
    assert prompt_embeddings.shape == (P, 2 * 3 * 32)
    prefix = prefix_from_peft(prompt_embeddings, lm.config.prefix_geometry()[DECODER], seq2seq=False)
    assert max_abs_diff(run(lm, left_padded(batch), prefix), ref, batch["target_mask"]) < F32_ATOL


def test_padding_side_does_not_matter(base):
    _, lm = base
    batch = random_batch(8)
    kv = random_kv(lm.config.prefix_geometry()[DECODER], 9)[0]
    prompt = jnp.asarray(np.random.default_rng(10).normal(size=(P, 32)), jnp.float32)
    for prefix in (Prefix(), Prefix(kv={DECODER: kv}), Prefix(kv={DECODER: kv}, infix=True),
                   Prefix(prompt_embeds=prompt)):
        right, left = run(lm, batch, prefix), run(lm, left_padded(batch), prefix)
        assert max_abs_diff(right, left, batch["target_mask"]) < F32_ATOL


@pytest.mark.parametrize("infix", [False, True])
def test_incremental_decoding_matches_teacher_forcing(base, infix):
    """Prefill the left-padded source, then feed the separator and the target one token at a time."""
    _, lm = base
    cfg, model, params = lm.config, lm.model, {"params": lm.params}
    batch = jnp_batch(left_padded(random_batch(11)))
    prefix = Prefix(kv={DECODER: random_kv(cfg.prefix_geometry()[DECODER], 12)[0]}, infix=infix)
    full = model.apply(params, batch, prefix)
    capacity = S + T
    cache = model.init_cache(B, capacity)
    valid = jnp.concatenate([batch["source_mask"].astype(bool), jnp.zeros((B, T), bool)], axis=1)
    source_positions = masks.token_positions(batch["source_mask"], 0 if infix else P)
    _, cache = model.apply(params, batch["source_ids"], source_positions, valid, prefix, cache, True, not infix,
                           method=model.decode)
    first_target_position = jnp.sum(batch["source_mask"], axis=1) + P
    inputs = masks.shift_right(batch["target_ids"], cfg.separator_token_id)
    step = jax.jit(lambda ids, positions, valid, cache: model.apply(params, ids, positions, valid, prefix, cache,
                                                                     method=model.decode))
    steps = []
    for t in range(T):
        valid = valid.at[:, S + t].set(True)
        logits, cache = step(inputs[:, t:t + 1], (first_target_position + t)[:, None], valid, cache)
        steps.append(logits)
    assert int(cache["self"]["index"][0]) == capacity
    assert max_abs_diff(jnp.concatenate(steps, axis=1), full, batch["target_mask"]) < F32_ATOL


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
    batch = random_batch(16)
    kv, (k, v) = random_kv(lm.config.prefix_geometry()[DECODER], 17)
    ids, mask, starts = packed(batch)
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


def test_embedding_only_prompt_matches_hf_inputs_embeds(base):
    hf, lm = base
    batch = random_batch(18)
    prompt = torch.randn(P, 32, generator=torch.Generator().manual_seed(19))
    ids, mask, starts = packed(batch)
    with torch.no_grad():
        embeds = torch.cat([prompt[None].expand(B, -1, -1), hf.transformer.wte(ids)], dim=1)
        ref = target_logits(hf(inputs_embeds=embeds, attention_mask=torch.cat([torch.ones(B, P, dtype=torch.long),
                                                                               mask], 1)).logits, starts, offset=P)
    ours = run(lm, left_padded(batch), Prefix(prompt_embeds=jnp.asarray(prompt.numpy())))
    assert max_abs_diff(ours, ref, batch["target_mask"]) < F32_ATOL
    model = lm.model
    with pytest.raises(ValueError, match="prompt_embeds"):
        model.apply({"params": lm.params}, jnp.zeros((B, 1), jnp.int32), jnp.zeros((B, 1), jnp.int32),
                    jnp.ones((B, 4), bool), Prefix(prompt_embeds=jnp.asarray(prompt.numpy())),
                    model.init_cache(B, 4), method=model.decode)


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


def test_missing_tensor_is_a_clear_error(base, tmp_path):
    hf, _ = base
    save_state_dict(hf, tmp_path, drop="h.1.attn.c_proj")
    with pytest.raises(ModelNotFoundError, match=r"transformer\.h\.1\.attn\.c_proj"):
        load_pretrained(str(tmp_path))


@pytest.mark.parametrize("field, value", [("scale_attn_by_inverse_layer_idx", True), ("add_cross_attention", True),
                                          ("tie_word_embeddings", False)])
def test_unsupported_options_are_clear_errors(field, value):
    with pytest.raises(ValueError, match=field):
        gpt2.Config.from_hf(tiny_config(**{field: value}), set())


def test_too_many_positions_is_a_clear_error(base):
    _, lm = base
    kv = random_kv(lm.config.prefix_geometry()[DECODER], 21, length=64 - S - T + 1)[0]
    with pytest.raises(ValueError, match="positions"):
        run(lm, random_batch(22), Prefix(kv={DECODER: kv}))
