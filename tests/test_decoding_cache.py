"""Decoding's cost: one compiled loop whatever `max_new_tokens`, a cache of real tokens only (the prefix read
in place, never concatenated into a step's keys), and no gather of what every beam of an example shares."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefix_jax import generate as gen
from prefix_jax.models import DECODER, KV, Prefix, load_pretrained
from prefix_jax.tiny import build_tiny_checkpoint

B, S, P = 2, 7, 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cache = {}

    def get(architecture: str):
        if architecture not in cache:
            path = build_tiny_checkpoint(tmp_path_factory.mktemp(architecture) / "lm", architecture)
            cache[architecture] = load_pretrained(str(path))
        return cache[architecture]

    return get


def random_prefix(lm, seed: int = 0) -> Prefix:
    rng = np.random.default_rng(seed)
    kv = {}
    for placement, g in lm.config.prefix_geometry().items():
        shape = (g.num_layers, g.num_heads, P, g.head_dim)
        kv[placement] = KV(*(jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(2)))
    return Prefix(kv=kv)


def lowered_generate(lm, new_tokens: int, beams: int) -> str:
    fn = gen.make_generate_fn(lm.model, gen.GenerationConfig(max_new_tokens=new_tokens, num_beams=beams))
    ids = jnp.full((B, S), 5, jnp.int32)
    return fn.lower(lm.params, random_prefix(lm), ids, jnp.ones((B, S), jnp.int32)).as_text()


def hlo_ops(text: str) -> list[str]:
    """The op names of a lowered module in order (shapes, constants and names stripped)."""
    return re.findall(r"= (?:\"?)([a-z_]+\.[a-z_]+)", text)


@pytest.mark.parametrize("architecture,beams", [("gpt2", 1), ("gpt2", 3), ("t5", 3), ("llama", 2)])
def test_generate_compiles_one_loop_whatever_max_new_tokens(tiny, architecture, beams):
    lm = tiny(architecture)
    short, long = lowered_generate(lm, 8, beams), lowered_generate(lm, 64, beams)
    assert "stablehlo.while" in short
    assert hlo_ops(short) == hlo_ops(long)  # the program does not grow with the number of steps
    assert len(hlo_ops(short)) > 100  # (the check sees a real program)


def key_shapes(text: str, rows: int, heads: int, head_dim: int) -> set[int]:
    """Every key-like length M of an `[rows, M, heads, head_dim]` or `[L, rows, M, heads, head_dim]` tensor."""
    found = re.findall(rf"tensor<(?:\d+x)?{rows}x(\d+)x{heads}x{head_dim}x", text)
    return {int(m) for m in found}


@pytest.mark.parametrize("architecture", ["gpt2", "llama", "t5"])
def test_decoding_keys_hold_real_tokens_only(tiny, architecture):
    """Keys and values of every decoding step hold the cache's real-token slots; the prefix is never put in front."""
    lm = tiny(architecture)
    new, beams = 5, 2
    text = lowered_generate(lm, new, beams)
    g = lm.config.prefix_geometry()[DECODER]
    lengths = key_shapes(text, B * beams, g.num_heads, g.head_dim) | key_shapes(text, B, g.num_heads, g.head_dim)
    capacity = new if lm.config.is_encoder_decoder else S + new
    assert capacity in lengths  # the cache (and the check can see it)
    assert not {capacity + P, S + P, P + 1} & lengths, lengths  # no prefix concatenated to a cache or step


def test_cross_attention_memory_is_never_gathered_on_beam_reorder(tiny):
    """T5's cache keeps the encoder K/V under `cross` (the same for every beam of an example): reordering beams
    passes it through untouched and gathers the self-attention cache."""
    lm = tiny("t5")
    beams, new = 2, 4
    rows = B * beams
    cache = lm.model.init_cache(rows, new)
    encoded = jnp.ones((rows, S, lm.config.d_model), jnp.float32)
    _, cache = lm.model.apply({"params": lm.params}, encoded=encoded, encoded_mask=jnp.ones((rows, S), bool),
                              decoder_ids=jnp.zeros((rows, 1), jnp.int32), decoder_mask=jnp.ones((rows, new), bool),
                              prefix=random_prefix(lm), cache=cache, method=lm.model.decode)
    assert set(cache) == {"self", "cross"}  # the name `generate._SAME_FOR_EVERY_BEAM` relies on
    assert cache["cross"].key.shape[1:3] == (rows, S)  # [L, R, S, H, K]: written once, from the encoder output
    swap = jnp.array([1, 0, 3, 2])  # beams swapped within each example
    reordered = gen._reorder(cache, swap)
    assert reordered["cross"] is cache["cross"]
    np.testing.assert_array_equal(reordered["self"]["key"], jnp.take(cache["self"]["key"], swap, axis=1))
