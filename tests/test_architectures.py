"""The contract every architecture family meets, against transformers and PEFT on its tiny random models:
logits with padding, a prefix given to HF as its cache, PEFT's prefix tuning, padding side, incremental decoding,
an embedding-only prompt, `generate` (greedy and beams) after a prefix, a clear error for a missing tensor, and
PARAM_AXES naming every param once.

The families, their variants and which cases run (slow or not) are rows of `families.FAMILIES`; what only one
family has lives in its own file (test_t5.py, test_bart.py, test_gpt2.py, test_llama.py, test_gemma.py).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from families import FAMILIES, Case, Family, cases, hf_generate_unpadded, left_padded_generation_sources, until_eos
from hf_fixtures import left_pad, max_abs_diff, random_kv, save_state_dict
from tolerances import F32_ATOL

from prefix_jax import prefix as prefix_lib
from prefix_jax import train_steps
from prefix_jax.generate import GenerationConfig, make_generate_fn
from prefix_jax.models import DECODER, NO_PREFIX, Prefix, load_pretrained, masks
from prefix_jax.partitioning import path_name
from prefix_jax.hub import ModelNotFoundError
from prefix_jax.peft_compat import prefix_from_peft


def model_for(lm, case: Case):
    """`lm`'s model, under the case's config changes (the same weights)."""
    return type(lm.model)(dataclasses.replace(lm.config, **dict(case.config))) if case.config else lm.model


def kv_of(family: Family, lm, placement: str, seed: int):
    return random_kv(lm.config.prefix_geometry()[placement], seed, family.sizes.P)


def every_placement(family: Family, lm, first_seed: int) -> Prefix:
    """A random K/V in each of the family's placements, seeds `first_seed`, `first_seed + 1`, ..."""
    return Prefix(kv={p: kv_of(family, lm, p, first_seed + i)[0] for i, p in enumerate(family.placements)})


@pytest.mark.parametrize("family, case", cases("logits"))
def test_logits_match_transformers_with_padding(family, case, tiny_hf):
    hf, lm = tiny_hf(family.name, case.variant)
    x = family.batch(0 if family.encoder_decoder else 1)
    ref = family.reference(hf, x)
    ours = model_for(lm, case).apply({"params": lm.params}, x.ours(case.left))
    family.check_loaded(hf, lm, case.variant)
    assert ours.shape == (family.sizes.B, family.sizes.T, family.vocab) and ours.dtype == jnp.float32
    assert max_abs_diff(ours, ref, x.valid) < family.tolerance
    if not family.encoder_decoder:
        assert np.abs(ref).max() > 1.0  # weights large enough for the comparison to mean something


@pytest.mark.parametrize("family, case", cases("past_key_values"))
def test_prefix_matches_hf_past_key_values(family, case, tiny_hf):
    """A decoder prefix == HF given it as its cache of length P (HF's tokens at positions P..)."""
    hf, lm = tiny_hf(family.name, case.variant)
    x = family.batch(1 if family.encoder_decoder else 2)
    kv, kv_t = kv_of(family, lm, DECODER, 2 if family.encoder_decoder else 3)
    ref = family.reference(hf, x, kv=kv_t)
    batch = x.ours(case.left)
    ours = model_for(lm, case).apply({"params": lm.params}, batch, Prefix(kv={DECODER: kv}))
    plain = lm.model.apply({"params": lm.params}, x.ours())
    assert max_abs_diff(ours, ref, x.valid) < family.tolerance
    assert max_abs_diff(plain, ref, x.valid) > 1e-2  # the prefix really acts


@pytest.mark.parametrize("family, case", cases("peft"))
def test_matches_peft_prefix_tuning(family, case, tiny_hf, tmp_path):
    """PEFT's prefix tuning (MLP reparameterization or not): our logits from its `prompt_embeddings`
    (peft_compat) equal its own; decoder-only cases with `gradients` also from its prefix parameters, with the loss
    and their gradients."""
    if family.encoder_decoder:
        check_peft_seq2seq(family, case, tmp_path)
    else:
        check_peft_causal(family, case, *tiny_hf(family.name, case.variant))


def peft_prompt_embeddings(peft_model, P: int) -> np.ndarray:
    with torch.no_grad():
        tokens = peft_model.prompt_tokens["default"][None, :P]
        return peft_model.prompt_encoder["default"](tokens)[0].numpy()


def check_peft_seq2seq(family: Family, case: Case, tmp_path) -> None:
    from peft import PrefixTuningConfig, get_peft_model

    hf = family.peft_base(case.layers)
    directory = tmp_path / family.name
    hf.save_pretrained(directory)
    lm = load_pretrained(str(directory), **dict(case.config))
    P = family.sizes.P
    peft_model = get_peft_model(hf, PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P,
                                                       prefix_projection=True, encoder_hidden_size=24)).eval()
    x = family.batch(4)
    prompt_embeddings = peft_prompt_embeddings(peft_model, P)
    ref = family.peft_reference(peft_model, hf, x)
    prefix = prefix_from_peft(prompt_embeddings, lm.config.prefix_geometry()[DECODER], seq2seq=True)
    assert set(prefix.kv) == {DECODER}
    ours = lm.model.apply({"params": lm.params}, x.ours(), prefix)
    assert max_abs_diff(ours, ref, x.valid) < family.tolerance
    assert max_abs_diff(lm.model.apply({"params": lm.params}, x.ours()), ref, x.valid) > 1e-2


def peft_and_ours(hf, lm, projection: bool, seed: int, P: int):
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


def check_peft_causal(family: Family, case: Case, hf, lm) -> None:
    P = family.sizes.P
    peft_model, spec, params = peft_and_ours(hf, lm, case.projection, seed=6, P=P)
    x = family.batch(7)
    ours_batch = x.ours(left=True)  # HF's rows packed to the left (PEFT ignores padding for positions); ours any way
    if case.gradients:
        labels = torch.full_like(x.ids, -100)
        for b, s in enumerate(x.starts):
            n = int(x.batch["target_mask"][b].sum())
            labels[b, s + 1:s + 1 + n] = torch.as_tensor(x.batch["target_ids"][b, :n])
        out = peft_model(input_ids=x.ids, attention_mask=x.mask, labels=labels)
        out.loss.backward()
        ref_logits, ref_loss = family.target_logits(out.logits, x.starts), float(out.loss.detach())
        check_peft_loss_and_gradients(family, lm, spec, params, ours_batch, x.valid, ref_logits, ref_loss,
                                      peft_grads(peft_model, case.projection))
    else:
        with torch.no_grad():
            ref_logits = family.target_logits(peft_model(input_ids=x.ids, attention_mask=x.mask).logits, x.starts)
    # The adapter's `prompt_embeddings` (MLP output) through peft_compat give the same logits.
    prompt_embeddings = peft_prompt_embeddings(peft_model, P)
    geometry = lm.config.prefix_geometry()[DECODER]
    assert prompt_embeddings.shape == (P, 2 * geometry.num_layers * geometry.num_heads * geometry.head_dim)
    compat = prefix_from_peft(prompt_embeddings, geometry, seq2seq=False)
    ours = lm.model.apply({"params": lm.params}, ours_batch, compat)
    assert max_abs_diff(ours, ref_logits, x.valid) < family.tolerance


def check_peft_loss_and_gradients(family: Family, lm, spec, params, batch, valid, ref_logits, ref_loss,
                                  ref_grads) -> None:
    """Our prefix holding PEFT's parameters: its logits, mean loss and parameter gradients equal PEFT's."""

    def loss_fn(p):
        total, count = train_steps.batch_loss(lm.model, spec, p, lm.params, batch, None)
        return total / count

    loss, grads = jax.value_and_grad(loss_fn)(params)
    logits = lm.model.apply({"params": lm.params}, batch, prefix_lib.materialize(params, spec))
    assert max_abs_diff(logits, ref_logits, valid) < family.tolerance
    assert abs(float(loss) - ref_loss) < family.tolerance
    for path, ours_g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        theirs_g = functools.reduce(lambda t, k: t[k.key], path, ref_grads)
        scale = np.abs(theirs_g).max()
        assert scale > 1e-6 and max_abs_diff(ours_g, theirs_g) < F32_ATOL * max(1.0, scale), jax.tree_util.keystr(path)


@pytest.mark.parametrize("family, case", cases("padding_side"))
def test_padding_side_does_not_matter(family, case, tiny_hf):
    """Sources padded on the left give the logits right padding gives, for every kind of prefix the family takes."""
    _, lm = tiny_hf(family.name, case.variant)
    model = model_for(lm, case)
    apply = lambda batch, prefix: model.apply({"params": lm.params}, batch, prefix)
    if family.encoder_decoder:
        batch = family.batch(9).ours()
        left_ids, left_mask = map(jnp.asarray, left_pad(batch["source_ids"], batch["source_mask"]))
        left = dict(batch, source_ids=left_ids, source_mask=left_mask)
        prefixes = [every_placement(family, lm, family.padding_kv_seed)]
    else:
        x = family.batch(8)
        batch, left = x.ours(), x.ours(left=True)
        kv = kv_of(family, lm, DECODER, family.padding_kv_seed)[0]
        prompt = jnp.asarray(np.random.default_rng(family.padding_kv_seed + 1).normal(size=(family.sizes.P, 32)),
                             jnp.float32)
        prefixes = [Prefix(), Prefix(kv={DECODER: kv}), Prefix(kv={DECODER: kv}, infix=True),
                    Prefix(prompt_embeds=prompt)]
    for prefix in prefixes:
        assert max_abs_diff(apply(batch, prefix), apply(left, prefix), batch["target_mask"]) < family.tolerance


@pytest.mark.parametrize("family, case", cases("incremental"))
def test_incremental_decoding_matches_teacher_forcing(family, case, tiny_hf):
    """Decoding one target token at a time through the cache gives the teacher-forced logits."""
    _, lm = tiny_hf(family.name, case.variant)
    model, params = model_for(lm, case), {"params": lm.params}
    cfg, (B, S, T, P) = model.config, dataclasses.astuple(family.sizes)
    if family.encoder_decoder:
        batch = family.batch(10).ours()
        prefix = every_placement(family, lm, 20)
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
    else:  # prefill the left-padded source, then feed the separator and the target one token at a time
        batch = family.batch(11).ours(left=True)
        prefix = Prefix(kv={DECODER: kv_of(family, lm, DECODER, 12)[0]}, infix=case.infix)
        full = model.apply(params, batch, prefix)
        capacity = S + T
        cache = model.init_cache(B, capacity)
        valid = jnp.concatenate([batch["source_mask"].astype(bool), jnp.zeros((B, T), bool)], axis=1)
        source_positions = masks.token_positions(batch["source_mask"], 0 if case.infix else P)
        _, cache = model.apply(params, batch["source_ids"], source_positions, valid, prefix, cache, True,
                               not case.infix, method=model.decode)
        first_target_position = jnp.sum(batch["source_mask"], axis=1) + P
        inputs = masks.shift_right(batch["target_ids"], cfg.separator_token_id)
        step = jax.jit(lambda ids, positions, valid, cache: model.apply(params, ids, positions, valid, prefix, cache,
                                                                         method=model.decode))
        steps = []
        for t in range(T):
            valid = valid.at[:, S + t].set(True)
            logits, cache = step(inputs[:, t:t + 1], (first_target_position + t)[:, None], valid, cache)
            steps.append(logits)
        geometry = cfg.prefix_geometry()[DECODER]
        assert int(cache["self"]["index"][0]) == capacity
        assert cache["self"]["key"].shape == (geometry.num_layers, B, capacity, geometry.num_heads, geometry.head_dim)
    assert max_abs_diff(jnp.concatenate(steps, axis=1), full, batch["target_mask"]) < family.tolerance


@pytest.mark.parametrize("family, case", cases("embedding_only"))
def test_embedding_only_prompt_matches_hf_inputs_embeds(family, case, tiny_hf):
    """P free vectors in front of the source embeddings == HF given them as `inputs_embeds`."""
    hf, lm = tiny_hf(family.name, case.variant)
    seed = 11 if family.encoder_decoder else 18
    x = family.batch(seed)
    prompt = torch.randn(family.sizes.P, 32, generator=torch.Generator().manual_seed(seed + 1))
    ref = family.reference(hf, x, prompt=prompt)
    prefix = Prefix(prompt_embeds=jnp.asarray(prompt.numpy()))
    batch = x.ours(left=not family.encoder_decoder)
    assert max_abs_diff(lm.model.apply({"params": lm.params}, batch, prefix), ref, x.valid) < family.tolerance
    if not family.encoder_decoder:  # decoding cannot prepend vectors: a clear error, not a silent skip
        B, model = family.sizes.B, lm.model
        with pytest.raises(ValueError, match="prompt_embeds"):
            model.apply({"params": lm.params}, jnp.zeros((B, 1), jnp.int32), jnp.zeros((B, 1), jnp.int32),
                        jnp.ones((B, 4), bool), prefix, model.init_cache(B, 4), method=model.decode)


@pytest.mark.parametrize("family", [pytest.param(f, id=f.name) for f in FAMILIES])
def test_missing_tensor_is_a_clear_error(family, tiny_hf, tmp_path):
    variant, dropped, message = family.missing_tensor
    hf, _ = tiny_hf(family.name, variant)
    save_state_dict(hf, tmp_path, drop=dropped)
    with pytest.raises(ModelNotFoundError, match=message):
        load_pretrained(str(tmp_path))



@pytest.mark.parametrize("family, case", cases("generate"))
def test_generate_matches_hf_given_the_prefix_as_its_cache(family, case, eos_steered):
    """`generate` (greedy or beams, left-padded sources) == HF's `generate` with the prefix as its cache."""
    hf, lm = eos_steered(family.name, case.variant)
    src, mask = left_padded_generation_sources(family.sizes.B, family.sizes.S, family.vocab)
    kv, kv_torch = kv_of(family, lm, DECODER, 13)
    fn = make_generate_fn(lm.model, GenerationConfig(10, case.beams))
    ids, valid = jnp.asarray(src.numpy()), jnp.asarray(mask.numpy())
    ours = until_eos(np.asarray(fn(lm.params, Prefix(kv={DECODER: kv}), ids, valid)), family.eos)
    assert ours == hf_generate_unpadded(hf, src, mask, kv_torch, 10, case.beams, family.eos)
    assert any(row[-1] == family.eos for row in ours) and not all(len(row) < 3 for row in ours)
    assert ours != until_eos(np.asarray(fn(lm.params, NO_PREFIX, ids, valid)), family.eos)  # the prefix steers


@pytest.mark.parametrize("family, variant", [pytest.param(f, v, id=f"{f.name}-{v}") for f in FAMILIES
                                             for v in sorted(f.variants)])
def test_param_axes_match_every_leaf_exactly_once(family, variant, tiny_hf):
    """Each LM param matches one PARAM_AXES rule, with one logical axis per dimension; "layers" is the first axis
    of exactly the params of the scanned layer stacks."""
    _, lm = tiny_hf(family.name, variant)
    param_axes = sys.modules[type(lm.model).__module__].PARAM_AXES
    for path, leaf in jax.tree_util.tree_flatten_with_path(lm.params)[0]:
        name = path_name(path)
        rules = [axes for pattern, axes in param_axes if re.fullmatch(pattern, name)]
        assert len(rules) == 1, (name, rules)
        assert len(rules[0]) == leaf.ndim, (name, rules[0], leaf.shape)
        assert rules[0][0] == "layers" if re.match(family.stacked, name) else "layers" not in rules[0], (name, rules)
