"""The optimizer of the trainable tree: AdamW, linear warmup/decay, clipping, masks built from config.

The optimizer only ever sees the prefix tree; the frozen LM is not an argument of anything here.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import optax

from prefix_jax.partitioning import path_name


def linear_schedule(peak_lr: float, total_steps: int, warmup_steps: int = 0) -> optax.Schedule:
    """Linear warmup 0 -> peak over `warmup_steps`, then linear decay to 0 at `total_steps` (the paper's)."""
    if total_steps < 1:
        raise ValueError(f"train.steps={total_steps} must be at least 1.")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"optim.warmup_steps={warmup_steps} must be in [0, train.steps={total_steps}].")
    decay = optax.linear_schedule(peak_lr, 0.0, max(total_steps - warmup_steps, 1))
    if warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, peak_lr, warmup_steps)
    return optax.join_schedules([warmup, decay], [warmup_steps])


def _leaf_names(params: Any) -> Any:
    """A tree like `params` whose leaves are their '/'-joined key paths ('decoder/mlp_in/kernel')."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path_name(path), params)


def decay_mask(params: Any) -> Any:
    """Weight decay only on MLP kernels: never on biases, virtual-token embeddings or direct prefixes."""
    return jax.tree.map(lambda name: name.endswith("kernel"), _leaf_names(params))


def frozen_mask(params: Any, patterns: Sequence[str]) -> Any:
    """True for leaves whose path matches any regex in `patterns` (kept fixed during training)."""
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"optim.frozen has an invalid regex {p!r}: {e}") from None
    names = _leaf_names(params)
    every = jax.tree.leaves(names)
    for pattern in compiled:
        if not any(pattern.search(name) for name in every):  # a typo would silently freeze nothing
            raise ValueError(f"optim.frozen has {pattern.pattern!r}, which matches no trainable parameter; the paths "
                             f"are {every[:8]}{' ...' if len(every) > 8 else ''}.")
    return jax.tree.map(lambda name: any(c.search(name) for c in compiled), names)


def make_optimizer(params: Any, *, learning_rate: float, total_steps: int, warmup_steps: int = 0,
                   weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   max_grad_norm: float | None = 1.0,
                   frozen: Sequence[str] = ()) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW on the trainable tree, as the paper trains the prefix; `frozen` paths get no update and no state."""
    if learning_rate <= 0:
        raise ValueError(f"optim.learning_rate={learning_rate} must be positive.")
    schedule = linear_schedule(learning_rate, total_steps, warmup_steps)
    adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    chain = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm else []
    tx = optax.chain(*chain, adamw)
    if frozen:
        labels = jax.tree.map(lambda f: "frozen" if f else "trained", frozen_mask(params, frozen))
        if all(label == "frozen" for label in jax.tree.leaves(labels)):
            raise ValueError(f"optim.frozen={list(frozen)} freezes every trainable parameter; nothing would train.")
        tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule
