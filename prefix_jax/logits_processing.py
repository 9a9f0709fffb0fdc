"""Next-token score processing inside the jitted decoding loop, with transformers' semantics.

The order and the rules are those of `transformers`' `generate` (its `_get_logits_processor`):
repetition penalty, n-gram blocking, minimum new tokens, forced BOS, forced EOS, then — when sampling —
temperature, top-k, top-p. Greedy search processes the raw logits; beam search processes the
log-softmax of the logits (as transformers does), which matters for the repetition penalty.

"History" is what transformers calls `input_ids` at a step: for an encoder-decoder the decoder start
token and the tokens generated so far; for a decoder-only LM the real source tokens, the separator
and the tokens generated so far. We keep it as `[R, C]` with the prompt right-aligned (`-1` where a
row has no token) followed by the generated tokens, so every row's tokens are contiguous. Unlike
transformers, padding never counts as a token (it does not for left-padded prompts there either).

Shapes (`prefix_jax.shapes`): R rows (batch x beams), V vocabulary, C0 prompt width, T max new tokens.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

NO_TOKEN = -1  # an empty history slot; never equal to a token id


def history(prompt_RxC0: jax.Array, generated_RxT: jax.Array) -> jax.Array:
    """The tokens seen so far as one array `[R, C0 + T]` (slots after step t are read as unwritten)."""
    return jnp.concatenate([prompt_RxC0, generated_RxT], axis=1)


def _written(prompt_RxC0: jax.Array, t: jax.Array, width: int) -> jax.Array:
    """`[R, C0 + T]`: which history slots hold a token before choosing generated token `t`."""
    c0 = prompt_RxC0.shape[1]
    slots = jnp.arange(width)[None]
    prompt_ok = jnp.pad(prompt_RxC0 != NO_TOKEN, ((0, 0), (0, width - c0)))
    return prompt_ok | ((slots >= c0) & (slots < c0 + t))


def repetition_penalty(scores_RxV: jax.Array, seq_RxC: jax.Array, written_RxC: jax.Array, penalty: float) -> jax.Array:
    """CTRL's penalty: scores of tokens already seen are divided by `penalty` (multiplied when negative)."""
    vocab = scores_RxV.shape[-1]
    rows = jnp.arange(seq_RxC.shape[0])[:, None]
    ids = jnp.where(written_RxC, seq_RxC, vocab)  # out of range: dropped
    seen = jnp.zeros(scores_RxV.shape, bool).at[rows, ids].set(True, mode="drop")
    penalized = jnp.where(scores_RxV < 0, scores_RxV * penalty, scores_RxV / penalty)
    return jnp.where(seen, penalized, scores_RxV)


def no_repeat_ngram(scores_RxV: jax.Array, seq_RxC: jax.Array, written_RxC: jax.Array, end_R: jax.Array,
                    n: int) -> jax.Array:
    """Bans every token that would complete an n-gram already present in the row's history.

    `end_R` is one past the last written slot. A window starting at slot j is an earlier n-gram when
    all its n slots are written; it bans `seq[j + n - 1]` when its first n-1 tokens equal the last n-1.
    """
    width = seq_RxC.shape[1]
    if width < n:
        return scores_RxV
    windows = width - n + 1
    starts = jnp.arange(windows)[None]
    complete = (starts + n - 1 < end_R[:, None]) & written_RxC[:, :windows]
    match = complete
    for i in range(n - 1):
        last_i = jnp.take_along_axis(seq_RxC, jnp.maximum(end_R - (n - 1) + i, 0)[:, None], axis=1)
        match = match & (seq_RxC[:, i:i + windows] == last_i)
    vocab = scores_RxV.shape[-1]
    banned = jnp.where(match, seq_RxC[:, n - 1:n - 1 + windows], vocab)
    rows = jnp.arange(seq_RxC.shape[0])[:, None]
    ban = jnp.zeros(scores_RxV.shape, bool).at[rows, banned].set(True, mode="drop")
    return jnp.where(ban, -jnp.inf, scores_RxV)


def force(scores_RxV: jax.Array, token: int, now: jax.Array) -> jax.Array:
    """When `now`, every score is -inf except `token`'s, which is 0 (transformers' forced BOS/EOS)."""
    forced = jnp.where(jnp.arange(scores_RxV.shape[-1]) == token, 0.0, -jnp.inf).astype(scores_RxV.dtype)
    return jnp.where(now, forced[None], scores_RxV)


def top_k(scores_RxV: jax.Array, k: int) -> jax.Array:
    """Keeps the k best scores (ties with the k-th kept too), the rest -inf."""
    k = min(k, scores_RxV.shape[-1])
    kth = jax.lax.top_k(scores_RxV, k)[0][:, -1:]
    return jnp.where(scores_RxV < kth, -jnp.inf, scores_RxV)


def top_p(scores_RxV: jax.Array, p: float, min_keep: int = 1) -> jax.Array:
    """Nucleus filter: drops the least likely tokens whose total probability is at most 1 - p."""
    order = jnp.argsort(scores_RxV, axis=-1)  # ascending, as transformers sorts
    ascending = jnp.take_along_axis(scores_RxV, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    drop_sorted = cumulative <= (1 - p)
    drop_sorted = drop_sorted.at[:, -min_keep:].set(False)
    rows = jnp.arange(scores_RxV.shape[0])[:, None]
    drop = jnp.zeros_like(drop_sorted).at[rows, order].set(drop_sorted)
    return jnp.where(drop, -jnp.inf, scores_RxV)


def process(scores_RxV: jax.Array, prompt_RxC0: jax.Array, generated_RxT: jax.Array, t: jax.Array, cfg: Any,
            eos: int, sampling: bool) -> jax.Array:
    """Applies every option of `cfg` (a `GenerationConfig`) before choosing generated token `t` (0-based)."""
    scores = scores_RxV.astype(jnp.float32)
    if cfg.repetition_penalty != 1.0 or cfg.no_repeat_ngram_size > 0:
        seq = history(prompt_RxC0, generated_RxT)
        written = _written(prompt_RxC0, t, seq.shape[1])
        if cfg.repetition_penalty != 1.0:
            scores = repetition_penalty(scores, seq, written, cfg.repetition_penalty)
        if cfg.no_repeat_ngram_size > 0:
            end = jnp.full((seq.shape[0],), prompt_RxC0.shape[1] + t, jnp.int32)
            scores = no_repeat_ngram(scores, seq, written, end, cfg.no_repeat_ngram_size)
    if cfg.min_new_tokens > 0:
        too_early = (jnp.arange(scores.shape[-1]) == eos)[None] & (t < cfg.min_new_tokens)
        scores = jnp.where(too_early, -jnp.inf, scores)
    if cfg.forced_bos_token_id is not None:
        scores = force(scores, cfg.forced_bos_token_id, t == 0)
    if cfg.forced_eos_token_id is not None:
        scores = force(scores, cfg.forced_eos_token_id, t == cfg.max_new_tokens - 1)
    if sampling:
        if cfg.temperature != 1.0:
            scores = scores / cfg.temperature
        if cfg.top_k > 0:
            scores = top_k(scores, cfg.top_k)
        if cfg.top_p < 1.0:
            scores = top_p(scores, cfg.top_p)
    return scores
