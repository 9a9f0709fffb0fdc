"""Train state, loss, and the jitted train/eval steps.

`train_step(state, lm_params, batch)` differentiates only `state.params` (the prefix tree). The
frozen LM arrives as an explicit argument: it is never closed over, so it is never baked into the
compiled program as a constant, and one compiled step serves any LM weights of the same shapes.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from prefix_jax import losses, prefix_bank
from prefix_jax.batch import Batch
from prefix_jax import prefix as prefix_lib


@flax.struct.dataclass
class TrainState:
    """Everything training changes. Nothing of the LM is in here."""

    step: jax.Array  # int32 scalar
    params: Any  # the trainable prefix tree
    opt_state: Any
    rng: jax.Array  # base key; step s uses fold_in(rng, s), so resuming replays the same randomness
    nonfinite_streak: jax.Array  # int32 scalar: steps skipped in a row for a non-finite loss, gradient or update


def init_state(params: Any, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng,
                      nonfinite_streak=jnp.zeros((), jnp.int32))


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def batch_loss(model: Any, spec: prefix_lib.PrefixSpec, params: Any, lm_params: Any, batch: Batch,
               rng: jax.Array | None, label_smoothing: float = 0.0,
               shard_prefix: Callable[[Any], Any] | None = None, loss_chunk_tokens: int = 0
               ) -> tuple[jax.Array, jax.Array]:
    """(summed loss, token count) of a batch; dropout (LM and prefix) on when `rng` is given.

    `shard_prefix` lays out the materialized prefix on the mesh (`prefix.constrain_kv`).
    `loss_chunk_tokens` > 0: the loss comes from the final hidden states at the target positions, through
    the LM head `loss_chunk_tokens` tokens at a time (`losses.chunked_token_cross_entropy`), so the float32
    `[B, T, V]` logits are never formed; 0: from the model's logits. Both give the same loss and gradient.
    """
    deterministic = rng is None
    prefix_rng, dropout_rng = jax.random.split(rng) if rng is not None else (None, None)
    prefix = prefix_bank.for_batch(prefix_lib.materialize(params, spec, prefix_rng, deterministic),
                                   batch.get("task_ids"))
    if shard_prefix is not None:
        prefix = shard_prefix(prefix)
    apply = functools.partial(model.apply, {"params": lm_params}, batch, prefix, deterministic=deterministic,
                              rngs=None if deterministic else {"dropout": dropout_rng})
    targets, mask = batch["target_ids"], batch["target_mask"]
    if loss_chunk_tokens > 0:
        h_BxTxD = apply(method=model.target_hidden_states)
        return losses.chunked_token_cross_entropy(h_BxTxD, losses.lm_head_for(model.config, lm_params), targets, mask,
                                                  label_smoothing, loss_chunk_tokens)
    return losses.token_cross_entropy(apply(), targets, mask, label_smoothing)


def micro_batches(batch: Batch, steps: int) -> Batch:
    """`[B, ...]` -> `[steps, B / steps, ...]`; micro-batch j holds rows j, j + steps, ... so that each
    one is spread over all batch shards (a contiguous split would put it on a few devices)."""
    def split(x: jax.Array) -> jax.Array:
        if x.shape[0] % steps:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into train.grad_accum_steps={steps}.")
        return jnp.swapaxes(x.reshape(x.shape[0] // steps, steps, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def summed_loss_and_grads(loss_sum_fn: Callable, params: Any, batch: Batch, rng: jax.Array,
                          steps: int) -> tuple[jax.Array, jax.Array, Any]:
    """Loss sum, token count and gradient of the loss sum over `steps` micro-batches (a `lax.scan`).

    Sums, not means: dividing the totals afterwards gives exactly the big batch's mean loss and gradient,
    however unevenly the real tokens fall into micro-batches. Micro-batch j draws dropout from fold_in(rng, j).
    """
    grad_fn = jax.value_and_grad(loss_sum_fn, has_aux=True)

    def body(carry, xs):
        total, count, grads = carry
        index, micro = xs
        (micro_total, micro_count), micro_grads = grad_fn(params, micro, jax.random.fold_in(rng, index))
        return (total + micro_total, count + micro_count, jax.tree.map(jnp.add, grads, micro_grads)), None

    zero = jnp.zeros((), jnp.float32)
    init = (zero, zero, jax.tree.map(jnp.zeros_like, params))
    (total, count, grads), _ = jax.lax.scan(body, init, (jnp.arange(steps), micro_batches(batch, steps)))
    return total, count, grads


def train_step(state: TrainState, lm_params: Any, batch: Batch, *, model: Any, spec: prefix_lib.PrefixSpec,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               label_smoothing: float = 0.0, grad_accum_steps: int = 1,
               shard_prefix: Callable[[Any], Any] | None = None, loss_chunk_tokens: int = 0
               ) -> tuple[TrainState, dict]:
    """One optimizer step on the prefix tree; returns the new state and scalar metrics.

    `loss_chunk_tokens` > 0 computes the loss without the `[B, T, V]` logits (see `batch_loss`).
    With `grad_accum_steps` > 1 the batch is processed in that many micro-batches (less activation
    memory), and the step equals one step on the whole batch. A step whose loss, gradient or updated
    parameters are not finite changes nothing but the step counter (the batch is skipped) and counts in
    `nonfinite_streak`; the loop stops the run when that grows too long.
    """
    rng = jax.random.fold_in(state.rng, state.step)

    if grad_accum_steps == 1:
        def loss_fn(params):
            total, count = batch_loss(model, spec, params, lm_params, batch, rng, label_smoothing, shard_prefix,
                                      loss_chunk_tokens)
            return total / jnp.maximum(count, 1.0), count

        (loss, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    else:
        def loss_sum_fn(params, micro, micro_rng):
            return batch_loss(model, spec, params, lm_params, micro, micro_rng, label_smoothing, shard_prefix,
                              loss_chunk_tokens)

        total, count, grads = summed_loss_and_grads(loss_sum_fn, state.params, batch, rng, grad_accum_steps)
        denominator = jnp.maximum(count, 1.0)
        loss = total / denominator
        grads = jax.tree.map(lambda g: g / denominator, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite(params) & _all_finite(opt_state)
    keep_if_finite = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(state.step), "tokens": count,
               "skipped": (~finite).astype(jnp.int32)}
    return state.replace(step=state.step + 1, params=keep_if_finite(params, state.params),
                         opt_state=keep_if_finite(opt_state, state.opt_state),
                         nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1)), metrics


def eval_step(params: Any, lm_params: Any, batch: Batch, *, model: Any, spec: prefix_lib.PrefixSpec,
              shard_prefix: Callable[[Any], Any] | None = None, loss_chunk_tokens: int = 0) -> dict:
    """Summed loss and token count of a batch, deterministic (sum across batches, then divide)."""
    total, count = batch_loss(model, spec, params, lm_params, batch, None, shard_prefix=shard_prefix,
                              loss_chunk_tokens=loss_chunk_tokens)
    return {"loss_sum": total, "tokens": count}


def jit_train_step(model: Any, spec: prefix_lib.PrefixSpec, tx: optax.GradientTransformation,
                   schedule: optax.Schedule, label_smoothing: float = 0.0, state_sharding: Any = None,
                   lm_sharding: Any = None, batch_sharding: Any = None, grad_accum_steps: int = 1,
                   shard_prefix: Callable[[Any], Any] | None = None, loss_chunk_tokens: int = 0) -> Callable:
    """`train_step` compiled with the train state donated and the LM as a non-donated, sharded argument.

    Shardings (a sharding or a tree of them each): state (replicated), LM (`partitioning.lm_shardings`),
    batch (`sharding.batch_sharding`); metrics come back replicated.
    """
    step = functools.partial(train_step, model=model, spec=spec, tx=tx, schedule=schedule,
                             label_smoothing=label_smoothing, grad_accum_steps=grad_accum_steps,
                             shard_prefix=shard_prefix, loss_chunk_tokens=loss_chunk_tokens)
    shardings = {}
    if state_sharding is not None:
        shardings = dict(in_shardings=(state_sharding, lm_sharding, batch_sharding),
                         out_shardings=(state_sharding, None))
    return jax.jit(step, donate_argnums=(0,), **shardings)


def jit_eval_step(model: Any, spec: prefix_lib.PrefixSpec, params_sharding: Any = None, lm_sharding: Any = None,
                  batch_sharding: Any = None, shard_prefix: Callable[[Any], Any] | None = None,
                  loss_chunk_tokens: int = 0) -> Callable:
    """`eval_step` compiled; with shardings given, on the same layout as the train step."""
    step = functools.partial(eval_step, model=model, spec=spec, shard_prefix=shard_prefix,
                             loss_chunk_tokens=loss_chunk_tokens)
    shardings = {}
    if params_sharding is not None:
        shardings = dict(in_shardings=(params_sharding, lm_sharding, batch_sharding), out_shardings=None)
    return jax.jit(step, **shardings)
