"""Initialising a prefix from the frozen LM's own activations on a real text (the paper's low-data init).

Run the LM on a text such as "table-to-text:" and take, per placement and layer, the keys and
values its attention computes for those tokens:
  ENCODER: encoder self-attention over the encoded text;  DECODER: decoder self-attention with the
  text as decoder input (decoder-only: the text as the prompt);  CROSS: cross-attention over the
  encoded text. `prefix_direct` starts from them exactly; `prefix`/`infix` fit their MLP to them by a
  short MSE pre-fit (the paper's code: Adam, 500 steps); `embedding_only` starts from the text's
  input embeddings.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax

from prefix_jax.models.attention import collect_kv
from prefix_jax.models.prefix_contract import KV
from prefix_jax.prefix import PrefixSpec, flatten, mlp


def text_activations(model: Any, lm_params: Any, token_ids: Sequence[int]) -> dict[str, KV]:
    """Per placement, the LM's keys/values for `token_ids`: `KV` of `[layers, H, P, K]`."""
    ids = jnp.asarray([list(token_ids)], jnp.int32)
    ones = jnp.ones_like(ids)
    params = {"params": lm_params}
    config = model.config
    if config.is_encoder_decoder:
        def run(module):
            encoded, encoded_mask = module.encode(ids, ones)
            return module.decode(encoded, encoded_mask, ids, ones)
    else:
        batch = {"source_ids": ids, "source_mask": ones, "target_ids": ids[:, :1], "target_mask": ones[:, :1]}
        run = lambda module: module(batch)  # the text is the source; its K/V are the first P slots
    _, state = model.apply(params, method=run, mutable=["intermediates"])
    return collect_kv(state["intermediates"], len(token_ids))


def fit_mlp(group: dict, target_PxE: jax.Array, activation: str, steps: int,
            learning_rate: float) -> tuple[dict, float]:
    """Adam on `MSE(MLP(embedding), target)` over the whole group (embedding and MLP); returns (group, final MSE)."""
    tx = optax.adam(learning_rate)

    def loss_fn(g):
        return jnp.mean(jnp.square(mlp(g, activation) - target_PxE))

    @jax.jit
    def run(g):
        def step(carry, _):
            g, opt = carry
            loss, grads = jax.value_and_grad(loss_fn)(g)
            updates, opt = tx.update(grads, opt, g)
            return (optax.apply_updates(g, updates), opt), loss

        (g, _), _ = jax.lax.scan(step, (g, tx.init(g)), None, length=steps)
        return g, loss_fn(g)

    fitted, loss = run(group)
    return fitted, float(loss)


def init_from_text(spec: PrefixSpec, params: dict, model: Any, lm_params: Any, token_ids: Sequence[int],
                   fit_steps: int = 500, fit_learning_rate: float = 1e-3) -> tuple[dict, dict]:
    """`params` with each group started from the LM's activations on `token_ids`; and a report (fit MSEs)."""
    if len(token_ids) != spec.length:
        raise ValueError(f"prefix.init_text has {len(token_ids)} tokens but prefix.length={spec.length}; set "
                         f"prefix.length={len(token_ids)} (or 0, which means: as many as the text has).")
    params = dict(params)
    report: dict = {}
    if spec.method == "embedding_only":
        embeds = model.apply({"params": lm_params}, jnp.asarray(token_ids, jnp.int32), method=model.embed)
        params["prompt"] = {"embedding": jnp.asarray(embeds, jnp.float32)}
        return params, report
    activations = text_activations(model, lm_params, token_ids)
    for name, placements in spec.groups().items():
        target = flatten(activations[placements[0]]).astype(jnp.float32)  # a tied group starts from its first
        if spec.method == "prefix_direct":
            params[name] = {"kv": target}
            continue
        before = float(jnp.mean(jnp.square(mlp(params[name], spec.mlp_activation) - target)))
        params[name], after = fit_mlp(params[name], target, spec.mlp_activation, fit_steps, fit_learning_rate)
        report[name] = {"mse_before": before, "mse_after": after}
    return params, report

