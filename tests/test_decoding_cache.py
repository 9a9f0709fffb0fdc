"""Decoding's cost: one compiled loop whatever `max_new_tokens`, a cache of real tokens only (the prefix read
in place, never concatenated into a step's keys), and no gather of what every beam of an example shares."""

from __future__ import annotations

import functools
import re
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefix_jax import generate as gen
from prefix_jax import models
from prefix_jax.models import DECODER, KV, Prefix

B, S, P = 2, 7, 3


def hf_config(architecture: str):
    """A tiny random config of each architecture (vocabulary 64; Llama with grouped-query attention)."""
    import transformers

    common = dict(vocab_size=64, pad_token_id=0, eos_token_id=1)
    if architecture == "t5":
        return transformers.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                     relative_attention_num_buckets=8, decoder_start_token_id=0, **common)
    if architecture == "gpt2":
        return transformers.GPT2Config(n_positions=128, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, **common)
    return transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, **common)


@functools.cache
def tiny(architecture: str) -> SimpleNamespace:
    """A random tiny model: `lm.model`, `lm.config`, and `lm.params` as shapes only (all lowering needs)."""
    arch = models.architecture(architecture)
    config = arch.Config.from_hf(hf_config(architecture), set())
    model = arch.Model(config)
    ones = jnp.ones((1, 4), jnp.int32)
    batch = {"source_ids": ones, "source_mask": ones, "target_ids": ones, "target_mask": ones}
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), batch)["params"])
    return SimpleNamespace(model=model, config=config, params=params,
                           init=jax.jit(lambda: model.init(jax.random.key(0), batch)["params"]))


def random_prefix(lm, seed: int = 0) -> Prefix:
    rng = np.random.default_rng(seed)
    kv = {}
    for placement, g in lm.config.prefix_geometry().items():
        shape = (g.num_layers, g.num_heads, P, g.head_dim)
        kv[placement] = KV(*(jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(2)))
    return Prefix(kv=kv)


@functools.cache
def lowered_generate(architecture: str, new_tokens: int, beams: int) -> str:
    lm = tiny(architecture)
    fn = gen.make_generate_fn(lm.model, gen.GenerationConfig(max_new_tokens=new_tokens, num_beams=beams))
    ids = jnp.full((B, S), 5, jnp.int32)
    return fn.lower(lm.params, random_prefix(lm), ids, jnp.ones((B, S), jnp.int32)).as_text()


def hlo_ops(text: str) -> list[str]:
    """The op names of a lowered module in order (shapes, constants and names stripped)."""
    return re.findall(r"= (?:\"?)([a-z_]+\.[a-z_]+)", text)


NEW, BEAMS = 8, 3
slow = pytest.mark.slow


@pytest.mark.parametrize("architecture,beams", [("gpt2", BEAMS), pytest.param("gpt2", 1, marks=slow),
                                                pytest.param("t5", BEAMS, marks=slow),
                                                pytest.param("llama", BEAMS, marks=slow)])
def test_generate_compiles_one_loop_whatever_max_new_tokens(architecture, beams):
    short, long = lowered_generate(architecture, NEW, beams), lowered_generate(architecture, 64, beams)
    assert "stablehlo.while" in short
    assert hlo_ops(short) == hlo_ops(long)  # the program does not grow with the number of steps
    assert len(hlo_ops(short)) > 100  # (the check sees a real program)


def key_shapes(text: str, rows: int, heads: int, head_dim: int) -> set[int]:
    """Every key-like length M of an `[rows, M, heads, head_dim]` or `[L, rows, M, heads, head_dim]` tensor."""
    found = re.findall(rf"tensor<(?:\d+x)?{rows}x(\d+)x{heads}x{head_dim}x", text)
    return {int(m) for m in found}


@pytest.mark.parametrize("architecture", ["gpt2", "t5", pytest.param("llama", marks=slow)])
def test_decoding_keys_hold_real_tokens_only(architecture):
    """Keys and values of every decoding step hold the cache's real-token slots; the prefix is never put in front."""
    lm = tiny(architecture)
    text = lowered_generate(architecture, NEW, BEAMS)
    g = lm.config.prefix_geometry()[DECODER]
    lengths = key_shapes(text, B * BEAMS, g.num_heads, g.head_dim) | key_shapes(text, B, g.num_heads, g.head_dim)
    capacity = NEW if lm.config.is_encoder_decoder else S + NEW
    assert capacity in lengths  # the cache (and the check can see it)
    assert not {capacity + P, S + P, P + 1} & lengths, lengths  # no prefix concatenated to a cache or step


def test_cross_attention_memory_is_never_gathered_on_beam_reorder():
    """T5's cache keeps the encoder K/V under `cross` (the same for every beam of an example): reordering beams
    passes it through untouched and gathers the self-attention cache."""
    lm = tiny("t5")
    beams, new = 2, 4
    rows = B * beams
    cache = lm.model.init_cache(rows, new)
    encoded = jnp.ones((rows, S, lm.config.d_model), jnp.float32)
    decode = jax.jit(lambda params, cache: lm.model.apply(
        {"params": params}, encoded=encoded, encoded_mask=jnp.ones((rows, S), bool),
        decoder_ids=jnp.zeros((rows, 1), jnp.int32), decoder_mask=jnp.ones((rows, new), bool),
        prefix=random_prefix(lm), cache=cache, method=lm.model.decode)[1])
    cache = decode(lm.init(), cache)
    assert set(cache) == {"self", "cross"}  # the name `generate._SAME_FOR_EVERY_BEAM` relies on
    assert cache["cross"].key.shape[1:3] == (rows, S)  # [L, R, S, H, K]: written once, from the encoder output
    swap = jnp.array([1, 0, 3, 2])  # beams swapped within each example
    reordered = gen._reorder(cache, swap)
    assert reordered["cross"] is cache["cross"]
    np.testing.assert_array_equal(reordered["self"]["key"], jnp.take(cache["self"]["key"], swap, axis=1))
