"""The prefix tree: layouts, tying, initialisations (incl. from real words), export, and every variant training."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_fixtures import save_tiny
from tolerances import F32_ATOL
from transformers import T5Config, T5ForConditionalGeneration

from prefix_jax import optim, prefix_init, train_steps
from prefix_jax import prefix as prefix_lib
from prefix_jax.models import CROSS, DECODER, ENCODER, load_pretrained
from prefix_jax.models.prefix_contract import StackGeometry

GEOMETRY = {ENCODER: StackGeometry(2, 4, 8), DECODER: StackGeometry(3, 4, 8), CROSS: StackGeometry(3, 4, 8)}


def spec(**kw) -> prefix_lib.PrefixSpec:
    base = dict(length=5, placements=(ENCODER, DECODER, CROSS), geometry=GEOMETRY, hidden_size=32, mlp_hidden=16)
    return prefix_lib.PrefixSpec(**{**base, **kw})


def test_flat_layout_is_peft_layer_major():
    g = StackGeometry(3, 2, 4)
    flat = jnp.arange(5 * g.kv_size, dtype=jnp.float32).reshape(5, g.kv_size)
    kv = prefix_lib.unflatten(flat, g)
    assert kv.key.shape == (3, 2, 5, 4)
    hk = g.num_heads * g.head_dim
    # Layer l's key is block 2l of each row, its value block 2l+1; head h is the h-th head_dim slice.
    np.testing.assert_array_equal(kv.key[1, 1, 2], flat[2, 2 * hk + 4: 2 * hk + 8])
    np.testing.assert_array_equal(kv.value[2, 0, 4], flat[4, 5 * hk: 5 * hk + 4])
    np.testing.assert_array_equal(prefix_lib.flatten(kv), flat)


def test_tied_placements_share_one_parameter_set():
    tied = spec(tie=((DECODER, CROSS),))
    params = prefix_lib.init_params(tied, jax.random.PRNGKey(0))
    assert set(params) == {ENCODER, "decoder+cross"}
    prefix = prefix_lib.materialize(params, tied)
    np.testing.assert_array_equal(prefix.kv[DECODER].key, prefix.kv[CROSS].key)
    separate = prefix_lib.init_params(spec(), jax.random.PRNGKey(0))
    assert prefix_lib.num_params(params) < prefix_lib.num_params(separate)
    with pytest.raises(ValueError, match="different shapes"):
        spec(tie=((ENCODER, DECODER),))
    with pytest.raises(ValueError, match="prefix.tie"):
        spec(tie=((DECODER, CROSS), (CROSS,)))


@pytest.mark.parametrize("method", ["prefix", "prefix_direct", "embedding_only"])
def test_initialisations(method):
    normal = prefix_lib.init_params(spec(method=method, init="normal"), jax.random.PRNGKey(0))
    uniform = prefix_lib.init_params(spec(method=method, init="uniform"), jax.random.PRNGKey(0))
    zero = spec(method=method, init="zero")
    free = {"prefix": "embedding", "prefix_direct": "kv", "embedding_only": "embedding"}[method]
    group = "prompt" if method == "embedding_only" else DECODER
    assert np.abs(np.asarray(uniform[group][free])).max() <= 0.5
    assert np.abs(np.asarray(normal[group][free])).max() > 1.0  # N(0, 1) over hundreds of values
    materialized = prefix_lib.materialize(prefix_lib.init_params(zero, jax.random.PRNGKey(0)), zero)
    for leaf in jax.tree.leaves(materialized):
        np.testing.assert_array_equal(leaf, 0.0)  # PEFT's init_weights="zero": the prefix starts as a no-op value


def test_bad_specs_name_the_field():
    for kwargs, field in [(dict(method="x"), "prefix.method"), (dict(init="x"), "prefix.init"),
                          (dict(length=0), "prefix.length"), (dict(dropout=1.0), "prefix.dropout"),
                          (dict(mlp_activation="nope"), "prefix.mlp_activation"),
                          (dict(placements=("nope",)), "prefix.placements"),
                          (dict(method="infix"), "prefix.method='infix'")]:
        with pytest.raises(ValueError, match=field.replace(".", r"\.").replace("(", r"\(")):
            spec(**kwargs)


def test_prefix_dropout_only_in_training():
    s = spec(dropout=0.5)
    params = prefix_lib.init_params(s, jax.random.PRNGKey(0))
    undropped = prefix_lib.materialize(params, spec(dropout=0.0)).kv[DECODER].key  # same params, no dropout
    np.testing.assert_array_equal(prefix_lib.materialize(params, s).kv[DECODER].key, undropped)  # eval: none
    a = prefix_lib.materialize(params, s, jax.random.PRNGKey(1), deterministic=False).kv[DECODER].key
    b = prefix_lib.materialize(params, s, jax.random.PRNGKey(2), deterministic=False).kv[DECODER].key
    kept = np.asarray(a) != 0
    assert 0.4 < 1 - kept.mean() < 0.6
    np.testing.assert_allclose(np.asarray(a)[kept], 2.0 * np.asarray(undropped)[kept], rtol=1e-6)  # kept / (1-p)
    assert (np.asarray(b) != 0).tolist() != kept.tolist()  # a fresh mask per rng


@pytest.fixture(scope="module")
def t5_pair(tmp_path_factory):
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0,
                   relative_attention_num_buckets=8, dropout_rate=0.0)
    hf = T5ForConditionalGeneration(cfg).eval()
    return hf, load_pretrained(str(save_tiny(hf, tmp_path_factory.mktemp("t5"))))


def test_words_init_takes_the_lms_own_keys_and_values(t5_pair):
    """`prefix_direct` from words == the K/V transformers computes for that text (encoder, decoder, cross)."""
    hf, lm = t5_pair
    text = [5, 17, 33, 9]
    captured = {}

    def hook(name):
        return lambda module, args, out: captured.__setitem__(name, out.detach())

    handles = [hf.encoder.block[i].layer[0].SelfAttention.k.register_forward_hook(hook(f"enc_k{i}")) for i in range(2)]
    handles += [hf.encoder.block[i].layer[0].SelfAttention.v.register_forward_hook(hook(f"enc_v{i}")) for i in range(2)]
    ids = torch.tensor([text])
    with torch.no_grad():
        out = hf(input_ids=ids, decoder_input_ids=ids, use_cache=True)
    for h in handles:
        h.remove()
    cache = out.past_key_values
    s = prefix_lib.PrefixSpec(length=4, placements=(ENCODER, DECODER, CROSS), geometry=lm.config.prefix_geometry(),
                              hidden_size=32, method="prefix_direct", init="words")
    params, _ = prefix_init.init_from_text(s, prefix_lib.init_params(s, jax.random.PRNGKey(0)), lm.model, lm.params,
                                           text)
    prefix = prefix_lib.materialize(params, s)
    heads = lambda x: x.view(1, -1, 4, 8).transpose(1, 2)[0].numpy()  # [S, H*K] -> [H, S, K]
    for layer in range(2):
        np.testing.assert_allclose(prefix.kv[ENCODER].key[layer], heads(captured[f"enc_k{layer}"]), atol=F32_ATOL)
        np.testing.assert_allclose(prefix.kv[ENCODER].value[layer], heads(captured[f"enc_v{layer}"]), atol=F32_ATOL)
        self_k = cache.self_attention_cache.layers[layer].keys[0].numpy()
        cross_v = cache.cross_attention_cache.layers[layer].values[0].numpy()
        np.testing.assert_allclose(prefix.kv[DECODER].key[layer], self_k, atol=F32_ATOL)
        np.testing.assert_allclose(prefix.kv[CROSS].value[layer], cross_v, atol=F32_ATOL)


def test_words_init_prefits_the_mlp(t5_pair):
    _, lm = t5_pair
    s = prefix_lib.PrefixSpec(length=3, placements=(ENCODER, DECODER), geometry=lm.config.prefix_geometry(),
                              hidden_size=32, method="prefix", mlp_hidden=64, init="words")
    params, report = prefix_init.init_from_text(s, prefix_lib.init_params(s, jax.random.PRNGKey(0)), lm.model,
                                                lm.params, [3, 4, 5], fit_steps=300, fit_learning_rate=1e-2)
    for group in (ENCODER, DECODER):
        assert report[group]["mse_after"] < 0.1 * report[group]["mse_before"], report
    with pytest.raises(ValueError, match="prefix.length"):
        prefix_init.init_from_text(s, params, lm.model, lm.params, [3, 4])


def test_words_init_of_an_embedding_only_prompt_is_the_text_embedding(t5_pair):
    _, lm = t5_pair
    s = prefix_lib.PrefixSpec(length=2, placements=(), geometry=lm.config.prefix_geometry(), hidden_size=32,
                              method="embedding_only", init="words")
    params, _ = prefix_init.init_from_text(s, prefix_lib.init_params(s, jax.random.PRNGKey(0)), lm.model, lm.params,
                                           [7, 8])
    np.testing.assert_array_equal(params["prompt"]["embedding"], np.asarray(lm.params["shared"]["embedding"])[[7, 8]])


@pytest.fixture(scope="module")
def gpt2_lm(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=4, embd_pdrop=0.0,
                                    resid_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=1)).eval()
    # HF's std-0.02 init makes a random tiny GPT-2 flat (logits) and position-wise (attention barely mixes), so
    # nothing at the input could steer it: give token rows norm ~1 and let the layers mix.
    with torch.no_grad():
        hf.transformer.wte.weight *= 10.0
        for name, weight in hf.named_parameters():
            if weight.dim() == 2 and not name.startswith(("transformer.wte", "transformer.wpe")):
                weight *= 8.0
    return load_pretrained(str(save_tiny(hf, tmp_path_factory.mktemp("gpt2"))))


def test_gpt2_prefix_from_words_is_the_text_in_the_input(gpt2_lm):
    """With positions after the prefix, a prefix of a text's own K/V == that text written before the source."""
    lm = gpt2_lm
    text = [7, 3, 11]
    s = prefix_lib.PrefixSpec(length=3, placements=(DECODER,), geometry=lm.config.prefix_geometry(), hidden_size=32,
                              method="prefix_direct", init="words")
    params, _ = prefix_init.init_from_text(s, prefix_lib.init_params(s, jax.random.PRNGKey(0)), lm.model, lm.params,
                                           text)
    rng = np.random.default_rng(1)
    source = rng.integers(2, 64, (2, 5)).astype(np.int32)
    target = rng.integers(2, 64, (2, 4)).astype(np.int32)
    ones = lambda x: jnp.ones(x.shape, jnp.int32)
    batch = {"source_ids": jnp.asarray(source), "source_mask": ones(source), "target_ids": jnp.asarray(target),
             "target_mask": ones(target)}
    with_text = np.concatenate([np.tile(text, (2, 1)), source], axis=1).astype(np.int32)
    written = dict(batch, source_ids=jnp.asarray(with_text), source_mask=ones(with_text))
    a = lm.model.apply({"params": lm.params}, batch, prefix_lib.materialize(params, s))
    b = lm.model.apply({"params": lm.params}, written)
    np.testing.assert_allclose(a, b, atol=F32_ATOL)


VARIANTS = {
    "prefix": dict(method="prefix"),
    "prefix_direct": dict(method="prefix_direct", init="uniform"),
    "embedding_only": dict(method="embedding_only"),
    "tied_decoder_cross": dict(method="prefix", tie=((DECODER, CROSS),)),
    "zero_init": dict(method="prefix", init="zero"),
    "words_init": dict(method="prefix", init="words"),
    "prefix_dropout": dict(method="prefix", dropout=0.2),
}
GPT2_VARIANTS = {
    "prefix": dict(method="prefix"),
    "infix": dict(method="infix"),
    "embedding_only": dict(method="embedding_only"),
    "words_init_direct": dict(method="prefix_direct", init="words"),
}
# One variant per architecture by default; the rest of the matrix is slow (one train-step compile each).
DEFAULT_CASES = {("t5", "prefix"), ("gpt2", "infix")}
CASES = [pytest.param(arch, v, marks=() if (arch, v) in DEFAULT_CASES else pytest.mark.slow)
         for arch, variants in (("t5", VARIANTS), ("gpt2", GPT2_VARIANTS)) for v in sorted(variants)]


@pytest.mark.parametrize("arch,variant", CASES)
def test_every_variant_trains_and_keeps_the_lm_frozen(arch, variant, request):
    lm = request.getfixturevalue("t5_pair")[1] if arch == "t5" else request.getfixturevalue("gpt2_lm")
    kwargs = (VARIANTS if arch == "t5" else GPT2_VARIANTS)[variant]
    placements = (ENCODER, DECODER, CROSS) if arch == "t5" else (DECODER,)
    s = prefix_lib.PrefixSpec(length=4, placements=placements, geometry=lm.config.prefix_geometry(),
                              hidden_size=32, mlp_hidden=32, **kwargs)
    params = prefix_lib.init_params(s, jax.random.PRNGKey(0))
    if s.init == "words":
        params, _ = prefix_init.init_from_text(s, params, lm.model, lm.params, [3, 9, 27, 17], fit_steps=50)
    lm_before = jax.tree.map(np.array, lm.params)
    lr = 3e-2 if s.uses_mlp else 1e-1
    tx, schedule = optim.make_optimizer(params, learning_rate=lr, total_steps=100)
    step = train_steps.jit_train_step(lm.model, s, tx, schedule)
    state = train_steps.init_state(params, tx, jax.random.PRNGKey(1))
    rng = np.random.default_rng(0)
    batch = {"source_ids": jnp.asarray(rng.integers(2, 64, (8, 10)), jnp.int32),
             "source_mask": jnp.ones((8, 10), jnp.int32),
             "target_ids": jnp.tile(jnp.asarray([[5, 12, 19, 26, 33, 1]], jnp.int32), (8, 1)),
             "target_mask": jnp.ones((8, 6), jnp.int32)}
    losses = []
    for _ in range(30):
        state, metrics = step(state, lm.params, batch)
        losses.append(float(metrics["loss"]))
    # An input-layer prompt steers a frozen LM much less than per-layer K/V (the paper's embedding-only ablation).
    assert losses[-1] < (0.9 if s.method == "embedding_only" else 0.8) * losses[0], losses
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), lm.params, lm_before)
    # What a checkpoint records of the variant reads back as the same spec (the Orbax round trip of a
    # trained state is tested once, in test_pipeline and test_trust).
    assert prefix_lib.PrefixSpec.from_json(json.loads(json.dumps(s.to_json()))) == s
