"""`prefix_jax.models.dropout`: the same masks as `jax.random.bernoulli` / `flax.linen.Dropout`, bit for bit,
without JAX's rolled Threefry loop; whole training steps unchanged; sharding does not change a mask."""

import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefix_jax import train_steps
from prefix_jax import prefix as prefix_lib
from prefix_jax.models import attention, bart, dropout, gpt2, llama, load_pretrained, t5

SHAPES = [(), (1,), (7,), (3, 5), (4, 1, 3), (2, 3, 4, 5), (8, 4, 16, 94)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bernoulli_equals_jax_random_bernoulli(shape):
    """Raw and typed keys, several probabilities, eager and jitted: the same booleans."""
    jitted = jax.jit(dropout.bernoulli, static_argnums=(1, 2))
    for seed in (0, 1, 12345):
        for key in (jax.random.PRNGKey(seed), jax.random.key(seed)):
            for p in (0.9, 0.5, 0.123, 1e-3):
                expected = np.asarray(jax.random.bernoulli(key, p, shape))
                np.testing.assert_array_equal(np.asarray(dropout.bernoulli(key, p, shape)), expected)
                np.testing.assert_array_equal(np.asarray(jitted(key, p, shape)), expected)


def test_bernoulli_is_straight_line_code():
    """The point of the module: no `random_bits` (Threefry as a rolled while loop on CPU) in the program."""
    def hlo(fn):
        return jax.jit(lambda k: fn(k, 0.9, (4, 8))).lower(jax.random.PRNGKey(0)).compile().as_text()

    assert " while(" in hlo(jax.random.bernoulli) and " while(" not in hlo(dropout.bernoulli)
    assert "random_bits" not in str(jax.make_jaxpr(lambda k: dropout.bernoulli(k, 0.9, (4, 8)))(jax.random.PRNGKey(0)))


def test_other_prng_implementations_take_jax_random():
    key = jax.random.key(3, impl="rbg")
    np.testing.assert_array_equal(np.asarray(dropout.bernoulli(key, 0.7, (5, 6))),
                                  np.asarray(jax.random.bernoulli(key, 0.7, (5, 6))))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dropout_module_equals_flax_dropout(dtype):
    x = jax.random.normal(jax.random.PRNGKey(3), (4, 6, 10)).astype(dtype)
    for rate in (0.0, 0.1, 0.5, 1.0):
        for broadcast_dims in ((), (1,), (0, 2)):
            for deterministic in (False, True):
                rngs = {"dropout": jax.random.PRNGKey(5)}
                ours = dropout.Dropout(rate, broadcast_dims).apply({}, x, deterministic=deterministic, rngs=rngs)
                theirs = nn.Dropout(rate, broadcast_dims).apply({}, x, deterministic=deterministic, rngs=rngs)
                assert ours.dtype == theirs.dtype
                np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(theirs, np.float32))


DROPOUT_FIELDS = {"gpt2": dict(resid_pdrop=0.2, embd_pdrop=0.2, attn_pdrop=0.2),
                  "t5": dict(dropout_rate=0.2),
                  "bart": dict(dropout=0.2, attention_dropout=0.2, activation_dropout=0.2),
                  "llama": dict(attention_dropout=0.2)}


@pytest.mark.parametrize("arch", [  # t5: the encoder-decoder shell; gpt2: attention dropout
    pytest.param(a, marks=[pytest.mark.slow] if a in ("bart", "llama") else []) for a in sorted(DROPOUT_FIELDS)])
def test_training_loss_equals_flax_dropout(arch, tiny_checkpoint, monkeypatch):
    """A training loss with every dropout on (LM and prefix) is bitwise what it was with `flax.linen.Dropout` and
    `jax.random.bernoulli`: the same rng paths, the same masks (so the same gradients)."""
    lm = load_pretrained(str(tiny_checkpoint(arch)), **DROPOUT_FIELDS[arch])
    placements = ("decoder",) if arch in ("gpt2", "llama") else ("encoder", "decoder", "cross")
    spec = prefix_lib.PrefixSpec(length=3, placements=placements, geometry=lm.config.prefix_geometry(),
                                 hidden_size=lm.config.hidden_size, mlp_hidden=16, dropout=0.2)
    params = prefix_lib.init_params(spec, jax.random.PRNGKey(1))
    rng = np.random.default_rng(0)
    vocab = lm.config.vocab_size
    batch = {"source_ids": rng.integers(3, vocab, (2, 7)).astype(np.int32), "source_mask": np.ones((2, 7), np.int32),
             "target_ids": rng.integers(3, vocab, (2, 5)).astype(np.int32), "target_mask": np.ones((2, 5), np.int32)}

    def loss(rng):  # a fresh jit each call: traced with whatever Dropout is in place now
        summed = lambda p: train_steps.batch_loss(lm.model, spec, p, lm.params, batch, rng)[0]
        return float(jax.jit(summed)(params))

    ours = loss(jax.random.PRNGKey(7))
    for module in (attention, bart, gpt2, llama, t5):
        monkeypatch.setattr(module, "Dropout", nn.Dropout)
    monkeypatch.setattr(dropout, "bernoulli", jax.random.bernoulli)
    assert ours == loss(jax.random.PRNGKey(7))
    assert ours != loss(None)  # dropout really was on


_SHARDED = textwrap.dedent("""
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from prefix_jax.models import dropout
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 6, 16))
    apply = lambda x: dropout.Dropout(0.3).apply({}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(9)})
    expected = np.asarray(apply(x))
    for spec in (P("data"), P("data", None, "model"), P(None, "model")):
        sharded = jax.jit(apply, in_shardings=NamedSharding(mesh, spec), out_shardings=NamedSharding(mesh, spec))
        np.testing.assert_array_equal(np.asarray(sharded(x)), expected)
    print("same masks")
""")


def test_masks_do_not_depend_on_sharding():
    """On 8 CPU devices, an input split over batch and feature axes gets the unsplit input's mask."""
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"}
    out = subprocess.run([sys.executable, "-c", _SHARDED], env=env, capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0 and "same masks" in out.stdout, out.stderr[-3000:]
