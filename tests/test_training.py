"""Training properties: only the prefix learns, the LM stays bitwise frozen, the step's HLO carries no LM."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from transformers import T5Config

from prefix_jax import losses, optim, partitioning, train_steps
from prefix_jax import prefix as prefix_lib
from prefix_jax.models import t5

B, S, T = 8, 12, 6


def tiny_t5_config(vocab: int = 64, d_model: int = 32, d_ff: int = 64, layers: int = 2) -> t5.Config:
    hf = T5Config(vocab_size=vocab, d_model=d_model, d_kv=8, d_ff=d_ff, num_layers=layers, num_heads=4,
                  dropout_rate=0.0, decoder_start_token_id=0, relative_attention_num_buckets=8)
    return t5.Config.from_hf(hf, set())


def tiny_t5(vocab: int = 64, d_model: int = 32, d_ff: int = 64, layers: int = 2, seed: int = 0):
    cfg = tiny_t5_config(vocab, d_model, d_ff, layers)
    model = t5.Model(cfg)
    batch = fixed_answer_batch(np.random.default_rng(0), vocab)
    params = jax.jit(model.init)(jax.random.PRNGKey(seed), batch)["params"]  # eager init is slow
    return cfg, model, params


def fixed_answer_batch(rng: np.random.Generator, vocab: int = 64) -> dict:
    """A task a prefix can learn on a frozen random LM: whatever the source, answer one fixed sentence."""
    src = rng.integers(2, vocab, (B, S)).astype(np.int32)
    sentence = (np.arange(T) * 7 + 3) % vocab
    return {"source_ids": jnp.asarray(src), "source_mask": jnp.ones((B, S), jnp.int32),
            "target_ids": jnp.asarray(np.tile(sentence, (B, 1)).astype(np.int32)),
            "target_mask": jnp.ones((B, T), jnp.int32)}


def spec_for(cfg, method="prefix", length=4) -> prefix_lib.PrefixSpec:
    placements = ("encoder", "decoder", "cross")
    return prefix_lib.PrefixSpec(length=length, placements=placements, geometry=cfg.prefix_geometry(),
                                 hidden_size=cfg.d_model, method=method, mlp_hidden=32)


def make_step(model, spec, params, steps=100, lr=1e-2):
    tx, schedule = optim.make_optimizer(params, learning_rate=lr, total_steps=steps)
    return tx, train_steps.jit_train_step(model, spec, tx, schedule)


# (method, learning rate, loss after 40 steps must fall below this fraction of the first loss).
# Embedding-only prompts steer far less than per-layer prefixes, as the paper reports.
LEARNING = [("prefix", 3e-2, 0.2), ("prefix_direct", 1e-1, 0.2), ("embedding_only", 1e-1, 0.8)]


@pytest.mark.slow
@pytest.mark.parametrize("method,lr,fraction", LEARNING)
def test_only_the_prefix_learns_and_the_lm_stays_bitwise_frozen(method, lr, fraction):
    cfg, model, lm_params = tiny_t5()
    lm_before = jax.tree.map(np.array, lm_params)
    spec = spec_for(cfg, method)
    params = prefix_lib.init_params(spec, jax.random.PRNGKey(1))
    tx, step = make_step(model, spec, params, lr=lr)
    state = train_steps.init_state(params, tx, jax.random.PRNGKey(2))
    batch = fixed_answer_batch(np.random.default_rng(3))
    losses = []
    for _ in range(40):
        state, metrics = step(state, lm_params, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < fraction * losses[0], losses  # the prefix alone learns the task
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), lm_params, lm_before)

    # Optimizer state: only prefix-sized leaves (Adam moments of the trainable tree, counters).
    trainable_shapes = {x.shape for x in jax.tree.leaves(state.params)}
    opt_leaves = jax.tree.leaves(state.opt_state)
    assert all(x.shape in trainable_shapes or x.size == 1 for x in opt_leaves)
    assert sum(x.size for x in opt_leaves) <= 2 * prefix_lib.num_params(state.params) + 16
    assert prefix_lib.num_params(state.params) < prefix_lib.num_params(lm_params)


def test_frozen_paths_do_not_move():
    cfg, model, lm_params = tiny_t5()
    spec = spec_for(cfg)
    params = prefix_lib.init_params(spec, jax.random.PRNGKey(1))
    tx, schedule = optim.make_optimizer(params, learning_rate=1e-2, total_steps=10, frozen=("embedding",))
    step = train_steps.jit_train_step(model, spec, tx, schedule)
    state = train_steps.init_state(params, tx, jax.random.PRNGKey(2))
    before = jax.tree.map(np.array, state.params)
    for _ in range(3):
        state, _ = step(state, lm_params, fixed_answer_batch(np.random.default_rng(3)))
    for placement in spec.placements:
        np.testing.assert_array_equal(state.params[placement]["embedding"], before[placement]["embedding"])
        assert not np.array_equal(state.params[placement]["mlp_out"]["kernel"], before[placement]["mlp_out"]["kernel"])
    with pytest.raises(ValueError, match="optim.frozen"):
        optim.make_optimizer(params, learning_rate=1e-2, total_steps=10, frozen=(".*",))


@pytest.mark.parametrize("method", ["prefix", "prefix_direct"])
def test_adamw_equals_torch_adamw_with_decay_only_on_mlp_kernels(method):
    """Three steps of random gradients == torch's AdamW with weight decay on the MLP kernels alone (the HF
    convention: no decay on biases or embeddings; a direct prefix is all embedding, so it never decays)."""
    import torch

    cfg = tiny_t5_config()
    params = prefix_lib.init_params(spec_for(cfg, method), jax.random.PRNGKey(0))
    lr, wd, steps = 1e-2, 0.3, 3
    tx, schedule = optim.make_optimizer(params, learning_rate=lr, total_steps=10, weight_decay=wd, max_grad_norm=None)
    names = jax.tree_util.tree_map_with_path(lambda path, _: partitioning.path_name(path), params)
    mlp_kernels = {f"{p}/{layer}/kernel" for p in ("encoder", "decoder", "cross") for layer in ("mlp_in", "mlp_out")}
    flat_names = jax.tree.leaves(names)
    assert set(flat_names) >= mlp_kernels if method == "prefix" else not set(flat_names) & mlp_kernels

    theirs = {n: torch.tensor(np.array(x), requires_grad=True) for n, x in zip(flat_names, jax.tree.leaves(params))}
    torch_opt = torch.optim.AdamW([{"params": [theirs[n] for n in flat_names if n in mlp_kernels], "weight_decay": wd},
                                   {"params": [theirs[n] for n in flat_names if n not in mlp_kernels],
                                    "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.999), eps=1e-8)
    opt_state, rng = tx.init(params), np.random.default_rng(0)
    for step in range(steps):
        grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        for group in torch_opt.param_groups:
            group["lr"] = float(schedule(step))
        for n, g in zip(flat_names, jax.tree.leaves(grads)):
            theirs[n].grad = torch.tensor(np.asarray(g))
        torch_opt.step()
    for n, ours in zip(flat_names, jax.tree.leaves(params)):
        np.testing.assert_allclose(ours, theirs[n].detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=n)  # steps are ~1e-2


def test_step_hlo_does_not_grow_with_the_lm():
    """The frozen LM is an argument of the compiled step, never a constant inside it (DESIGN rule 2)."""
    sizes = {}
    for name, dims in {"small": dict(vocab=64, d_ff=64), "large": dict(vocab=8192, d_ff=1024)}.items():
        cfg, model, lm_params = tiny_t5(**dims)
        spec = spec_for(cfg)
        params = prefix_lib.init_params(spec, jax.random.PRNGKey(1))
        tx, step = make_step(model, spec, params)
        state = train_steps.init_state(params, tx, jax.random.PRNGKey(2))
        batch = fixed_answer_batch(np.random.default_rng(0))
        sizes[name] = len(step.lower(state, lm_params, batch).as_text())
        lm_bytes = sum(x.nbytes for x in jax.tree.leaves(lm_params))
        if name == "large":
            # Negative control: the same step closing over the LM inlines it (this is what the rule prevents).
            closed = jax.jit(functools.partial(
                lambda s, b, lm: train_steps.train_step(s, lm, b, model=model, spec=spec, tx=tx,
                                                     schedule=optim.linear_schedule(1e-2, 100)), lm=lm_params))
            closed_size = len(closed.lower(state, batch).as_text())
            assert closed_size > lm_bytes
    assert lm_bytes > 1_000_000
    assert sizes["large"] < 1.05 * sizes["small"] + 10_000, sizes
    assert sizes["large"] < lm_bytes / 4  # an inlined LM alone would be larger than lm_bytes


def test_label_smoothing_and_padding_in_the_loss():
    """Equal to transformers' own `LabelSmoother` (what its Trainer applies), pads ignored."""
    import torch
    from transformers.trainer_pt_utils import LabelSmoother

    logits = np.random.default_rng(0).normal(size=(2, 3, 5)).astype(np.float32)
    targets = np.asarray([[1, 2, 3], [4, 0, 0]])
    mask = np.asarray([[1, 1, 1], [1, 0, 0]])
    labels = torch.tensor(np.where(mask == 1, targets, -100))
    for epsilon in (0.0, 0.1):
        total, count = losses.token_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask),
                                                    label_smoothing=epsilon)
        if epsilon:
            expected = float(LabelSmoother(epsilon=epsilon)({"logits": torch.tensor(logits)}, labels))
        else:
            expected = float(torch.nn.functional.cross_entropy(torch.tensor(logits).reshape(-1, 5), labels.reshape(-1)))
        assert float(count) == 4
        np.testing.assert_allclose(float(total) / float(count), expected, rtol=1e-6)


@pytest.mark.slow
def test_step_compiles_once_per_lm_shape_not_per_lm_value():
    """One compiled step serves any LM weights of the same shapes and dtypes (they are data, not code); an LM
    of another dtype is another program, and one of other shapes is refused, not reinterpreted."""
    from flax.errors import ScopeParamShapeError

    cfg, model, lm_a = tiny_t5(seed=0)
    _, _, lm_b = tiny_t5(seed=1)
    spec = spec_for(cfg)
    params = prefix_lib.init_params(spec, jax.random.PRNGKey(1))
    tx, step = make_step(model, spec, params)
    batch = fixed_answer_batch(np.random.default_rng(0))
    fresh = lambda: train_steps.init_state(jax.tree.map(jnp.copy, params), tx, jax.random.PRNGKey(2))  # donated
    _, m_a = step(fresh(), lm_a, batch)
    _, m_b = step(fresh(), lm_b, batch)
    assert step._cache_size() == 1
    assert float(m_a["loss"]) != float(m_b["loss"])
    _, m_bf16 = step(fresh(), jax.tree.map(lambda x: x.astype(jnp.bfloat16), lm_a), batch)
    assert step._cache_size() == 2
    np.testing.assert_allclose(float(m_bf16["loss"]), float(m_a["loss"]), rtol=0.05)
    _, _, lm_wide = tiny_t5(d_ff=96)
    with pytest.raises(ScopeParamShapeError):
        step(fresh(), lm_wide, batch)


@pytest.mark.slow
def test_train_step_makes_no_hidden_transfers():
    """Once state, LM and batch are on device, a step moves nothing between host and device implicitly."""
    cfg, model, lm_params = tiny_t5()
    spec = spec_for(cfg)
    params = prefix_lib.init_params(spec, jax.random.PRNGKey(1))
    tx, step = make_step(model, spec, params)
    state = jax.device_put(train_steps.init_state(params, tx, jax.random.PRNGKey(2)))
    lm_params = jax.device_put(lm_params)
    batch = jax.device_put(fixed_answer_batch(np.random.default_rng(0)))
    state, _ = step(state, lm_params, batch)  # compile outside the guard
    with jax.transfer_guard("disallow"):
        for _ in range(2):
            state, metrics = step(state, lm_params, batch)
    assert np.isfinite(float(metrics["loss"]))
