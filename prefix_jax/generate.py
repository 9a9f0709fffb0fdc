"""Greedy and beam-search decoding with the prefix in the attention of every step.

Our decoding owns its cache: the prefix is an argument of every decoder call (never a cache entry
that a generation loop could drop), and it is unbatched, so expanding the batch into beams cannot
mis-size it. Beam search follows transformers' semantics (`early_stopping=False`, length penalty
on the number of generated tokens, EOS hypotheses taken from the top `num_beams` candidates), so its
outputs can be compared with `model.generate` token for token.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp

from prefix_jax import fingerprint, logits_processing, prefix_bank
from prefix_jax.config_fields import check_values, integer, is_int, is_number, number, option, valid_if
from prefix_jax.models import masks
from prefix_jax.models.attention import collect_kv, tokens_after_prefix
from prefix_jax.models.prefix_contract import DECODER, Prefix

_NEG = -1.0e9  # transformers' "impossible" score; finite, so sums stay ordered


_token_id = valid_if(lambda v: v is None or (is_int(v) and v >= 0), "a token id or None")


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings; each means what the transformers `generate` argument of the same name means."""

    max_new_tokens: int = option(64, "tokens generated at most", integer(1))
    num_beams: int = option(1, "1: greedy (or sampling)", integer(1))
    length_penalty: float = option(1.0, "score = sum log p / (generated tokens ** length_penalty)", number())
    min_new_tokens: int = option(0, "EOS is impossible before this many new tokens", integer(0))
    no_repeat_ngram_size: int = option(0, "no n-gram of this size twice in source+output (decoder-only) / output",
                                       integer(0, "0: off"))
    repetition_penalty: float = option(1.0, "> 1 discourages tokens already seen (CTRL)",
                                       number(0, above=True, note="1.0: off"))
    do_sample: bool = option(False, "sample instead of argmax (greedy only): temperature, top_k, top_p, seed")
    temperature: float = option(1.0, "sampling temperature", number(0, above=True, note="1.0: off"))
    top_k: int = option(0, "0: no top-k filter", integer(0, "0: off"))
    top_p: float = option(1.0, "1.0: no nucleus filter",
                          valid_if(lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1] (1.0: off)"))
    seed: int = option(0, "sampling seed when `generate` is given no rng")
    forced_bos_token_id: int | None = option(None, "first generated token (BART checkpoints use 0)", _token_id)
    forced_eos_token_id: int | None = option(None, "last token when max_new_tokens is reached", _token_id)

    def __post_init__(self) -> None:
        check_values(self, GenerationConfig, "generate")
        if self.do_sample and self.num_beams > 1:
            raise ValueError(f"generate.do_sample=True with generate.num_beams={self.num_beams}: beam sampling is "
                             "not supported; use num_beams=1 to sample or do_sample=False for beam search.")
        if not self.do_sample:
            for field, off in (("temperature", 1.0), ("top_k", 0), ("top_p", 1.0)):
                if getattr(self, field) != off:
                    raise ValueError(f"generate.{field}={getattr(self, field)!r} only applies when sampling; set "
                                     f"generate.do_sample=True or leave it at {off!r}.")

    @classmethod
    def from_config(cls, fields: Any) -> "GenerationConfig":
        """From a mapping (e.g. the `generate` ConfigDict); an unknown key is an error naming it."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = dict(fields)
        for key in values:
            if key not in known:
                raise ValueError(f"generate.{key} is not a decoding option; known: {sorted(known)}.")
        return cls(**values)


# A decoding step: (token ids [R], cache, step t) -> (next-token logits [R, V], cache); R = batch x beams.
StepFn = Callable[[jax.Array, Any, jax.Array], tuple[jax.Array, Any]]
# What `_greedy`/`_beam_search` need from a model: first tokens [R], cache, step, and the prompt history
# [R, C0] that n-gram blocking and the repetition penalty look at (see `logits_processing`).
Start = tuple[jax.Array, Any, StepFn, jax.Array]


def _repeat(x: jax.Array, times: int, axis: int = 0) -> jax.Array:
    """[B, ...] -> [B * times, ...] (B on `axis`), each row repeated `times` times in a row (beam layout)."""
    return jnp.repeat(x, times, axis=axis) if times > 1 else x


def _encoder_decoder_start(model: Any, lm_params: Any, prefix: Prefix, source_ids: jax.Array, source_mask: jax.Array,
                           cfg: GenerationConfig) -> Start:
    params = {"params": lm_params}
    encoded, encoded_mask = model.apply(params, source_ids=source_ids, source_mask=source_mask, prefix=prefix,
                                        method=model.encode)
    encoded, encoded_mask = _repeat(encoded, cfg.num_beams), _repeat(encoded_mask, cfg.num_beams)
    prefix = prefix_bank.repeat_rows(prefix, cfg.num_beams)  # a bank's row indices follow the beams
    rows = encoded.shape[0]
    cache = model.init_cache(rows, cfg.max_new_tokens)

    def step(tokens_R: jax.Array, cache: Any, t: jax.Array) -> tuple[jax.Array, Any]:
        written = jnp.broadcast_to(jnp.arange(cfg.max_new_tokens) <= t, (rows, cfg.max_new_tokens))
        logits, cache = model.apply(params, encoded=encoded, encoded_mask=encoded_mask, decoder_ids=tokens_R[:, None],
                                    decoder_mask=written, prefix=prefix, deterministic=True, cache=cache,
                                    method=model.decode)
        return logits[:, -1], cache

    start = jnp.full((rows,), model.config.decoder_start_token_id, jnp.int32)
    return start, cache, step, start[:, None]


def _prompt_as_kv(model: Any, params: Any, prompt_embeds_PxD: jax.Array) -> Prefix:
    """Input-layer prompt -> the K/V it produces in every layer. Exact for a causal LM: the prompt comes
    first, so its activations do not depend on the text after it."""
    one = jnp.ones((1, 1), jnp.int32)
    batch = {"source_ids": one, "source_mask": one, "target_ids": one, "target_mask": one}
    _, state = model.apply(params, batch, Prefix(prompt_embeds=prompt_embeds_PxD), mutable=["intermediates"])
    return Prefix(kv={DECODER: collect_kv(state["intermediates"], prompt_embeds_PxD.shape[0])[DECODER]})


def _decoder_only_start(model: Any, lm_params: Any, prefix: Prefix, source_ids: jax.Array, source_mask: jax.Array,
                        cfg: GenerationConfig) -> Start:
    """Prefills the (left- or right-padded) source, then decodes from the separator token."""
    params = {"params": lm_params}
    config = model.config
    prompt = prefix.prompt_embeds is not None  # virtual tokens always take positions 0..P-1
    if prompt:
        prefix = _prompt_as_kv(model, params, prefix.prompt_embeds)
    batch, source_len = source_ids.shape
    capacity = source_len + cfg.max_new_tokens
    prefix_len = prefix.length(DECODER)  # the longest of a bank's prefixes
    if prompt:  # the prompt's K/V: P virtual tokens in front, at positions 0..P-1
        where = config.text_positions(DECODER, source_len + cfg.max_new_tokens, prompt_len=prefix_len)
    else:
        where = config.text_positions(DECODER, source_len + cfg.max_new_tokens, prefix_len, infix=prefix.infix,
                                      before_tokens=tokens_after_prefix(prefix.kv.get(DECODER)))  # per row: bank
    if where.needed > config.max_positions:
        raise ValueError(f"prefix ({where.needed - source_len - cfg.max_new_tokens} positions) + source "
                         f"({source_len}) + generate.max_new_tokens ({cfg.max_new_tokens}) exceed the model's "
                         f"{config.max_positions} positions; shorten one.")
    source_positions = masks.token_positions(source_mask, where.source_offset)
    valid = jnp.concatenate([source_mask.astype(bool), jnp.zeros((batch, cfg.max_new_tokens), bool)], axis=1)
    # The source is prefilled once per example, then its cache copied to the example's beams.
    _, cache = model.apply(params, ids_BxQ=source_ids, positions_BxQ=source_positions, key_valid_BxC=valid,
                           prefix=prefix, cache=model.init_cache(batch, capacity), deterministic=True,
                           prefix_visible=not prefix.infix, method=model.decode)
    cache = jax.tree.map(lambda x: x if x.ndim < 2 else _repeat(x, cfg.num_beams, axis=1), cache)  # [L, B..]->[L, R..]
    first_target_position = _repeat(jnp.sum(source_mask, axis=1).astype(jnp.int32) + where.target_offset,
                                    cfg.num_beams)
    source_ids, source_mask, valid = (_repeat(x, cfg.num_beams) for x in (source_ids, source_mask, valid))
    prefix = prefix_bank.repeat_rows(prefix, cfg.num_beams)
    rows = source_ids.shape[0]

    def step(tokens_R: jax.Array, cache: Any, t: jax.Array) -> tuple[jax.Array, Any]:
        slots = source_len + t
        key_valid = valid | (jnp.arange(capacity) <= slots)[None] & (jnp.arange(capacity) >= source_len)[None]
        positions = (first_target_position + t)[:, None]
        logits, cache = model.apply(params, ids_BxQ=tokens_R[:, None], positions_BxQ=positions,
                                    key_valid_BxC=key_valid, prefix=prefix, cache=cache, deterministic=True,
                                    prefix_visible=True, method=model.decode)
        return logits[:, -1], cache

    start = jnp.full((rows,), config.separator_token_id, jnp.int32)
    # The real source tokens right-aligned (pads first, order kept), then the separator.
    order = jnp.argsort(source_mask != 0, axis=1, stable=True)
    aligned = jnp.where(jnp.take_along_axis(source_mask, order, axis=1) != 0,
                        jnp.take_along_axis(source_ids, order, axis=1), logits_processing.NO_TOKEN)
    return start, cache, step, jnp.concatenate([aligned.astype(jnp.int32), start[:, None]], axis=1)


# Cache entries that are the same for every beam of an example: the cross-attention K/V of an encoder-decoder,
# projected once from the encoder output. Beams only move within their example, so these need no gather.
_SAME_FOR_EVERY_BEAM = ("cross",)


def _reorder(cache: Any, rows_R: jax.Array) -> Any:
    """Gathers the batch axis (axis 1, after the layer axis) of every cache array but those the same for every
    beam of an example; layer indices stay. `rows_R` must only move rows within their example."""
    gather = lambda entry: jax.tree.map(lambda x: x if x.ndim < 2 else jnp.take(x, rows_R, axis=1), entry)
    if not isinstance(cache, dict):
        return gather(cache)
    return {name: entry if name in _SAME_FOR_EVERY_BEAM else gather(entry) for name, entry in cache.items()}


def _greedy(start: jax.Array, cache: Any, step: StepFn, prompt: jax.Array, cfg: GenerationConfig, eos: int,
            pad: int, rng: jax.Array) -> jax.Array:
    """Greedy search, or sampling with `cfg.do_sample` (one key per step, folded from `rng`)."""
    batch = start.shape[0]
    tokens = jnp.full((batch, cfg.max_new_tokens), pad, jnp.int32)

    def cond(carry):
        t, _, _, _, done = carry
        return (t < cfg.max_new_tokens) & ~jnp.all(done)

    def body(carry):
        t, logits, tokens, cache, done = carry
        scores = logits_processing.process(logits, prompt, tokens, t, cfg, eos, cfg.do_sample)
        if cfg.do_sample:
            chosen = jax.random.categorical(jax.random.fold_in(rng, t), scores, axis=-1)
        else:
            chosen = jnp.argmax(scores, axis=-1)
        token = jnp.where(done, pad, chosen.astype(jnp.int32))
        tokens = tokens.at[:, t].set(token)
        logits, cache = step(token, cache, t + 1)
        return t + 1, logits, tokens, cache, done | (token == eos)

    # The first step runs outside the loop: it adds the cross-attention memory to the cache.
    logits, cache = step(start, cache, jnp.zeros((), jnp.int32))
    carry = (jnp.zeros((), jnp.int32), logits, tokens, cache, jnp.zeros((batch,), bool))
    return jax.lax.while_loop(cond, body, carry)[2]


@flax.struct.dataclass
class BeamState:
    """What beam search carries from step to step: B examples, W = num_beams, T = max_new_tokens, V vocab."""

    step: jax.Array  # tokens generated so far (scalar)
    logits_RxV: jax.Array  # next-token logits of each alive beam (R = B * W rows, example-major)
    alive_seqs_BxWxT: jax.Array
    alive_scores_BxW: jax.Array  # sum of log-probabilities
    done_seqs_BxWxT: jax.Array  # the best finished hypotheses so far
    done_scores_BxW: jax.Array  # length-normalized; _NEG where none
    done_flags_BxW: jax.Array  # which done slots hold a real hypothesis
    cache: Any
    improvable_B: jax.Array  # can an alive beam still beat the worst done one
    all_stopped: jax.Array  # every candidate of the last step stopped (scalar)


def _beam_search(start: jax.Array, cache: Any, step: StepFn, prompt: jax.Array, cfg: GenerationConfig, eos: int,
                 pad: int, rng: jax.Array) -> jax.Array:
    W, T, lp = cfg.num_beams, cfg.max_new_tokens, cfg.length_penalty
    batch = start.shape[0] // W
    candidates = 2 * W
    top_w_mask = jnp.arange(candidates) < W  # only these candidates may finish (as transformers does)

    def cond(state: BeamState) -> jax.Array:
        return (state.step < T) & jnp.any(state.improvable_B) & ~state.all_stopped

    def body(state: BeamState) -> BeamState:
        t, alive_seqs, improvable = state.step, state.alive_seqs_BxWxT, state.improvable_B
        vocab = state.logits_RxV.shape[-1]
        log_probs = jax.nn.log_softmax(state.logits_RxV.astype(jnp.float32))  # processed after, as transformers
        log_probs = logits_processing.process(log_probs, prompt, alive_seqs.reshape(batch * W, T), t, cfg, eos,
                                              False).reshape(batch, W, vocab)
        flat = (log_probs + state.alive_scores_BxW[:, :, None]).reshape(batch, W * vocab)
        cand_scores, cand_index = jax.lax.top_k(flat, candidates)
        cand_beam, cand_token = cand_index // vocab, (cand_index % vocab).astype(jnp.int32)
        cand_seqs = jnp.take_along_axis(alive_seqs, cand_beam[:, :, None], axis=1).at[:, :, t].set(cand_token)
        stops = (cand_token == eos) | (t + 1 >= T)

        # The best W candidates that go on.
        go_on_scores, go_on = jax.lax.top_k(cand_scores + stops * _NEG, W)
        alive_seqs = jnp.take_along_axis(cand_seqs, go_on[:, :, None], axis=1)
        alive_beam = jnp.take_along_axis(cand_beam, go_on, axis=1)
        cache = _reorder(state.cache, (alive_beam + jnp.arange(batch)[:, None] * W).reshape(-1))

        # Finished hypotheses: merge the new ones (length-normalized) into the best W so far.
        generated = (t + 1).astype(jnp.float32)
        finish_scores = cand_scores / generated**lp
        finish_scores += (~(stops & top_w_mask[None])) * _NEG + (~improvable[:, None]) * _NEG
        merged_scores = jnp.concatenate([state.done_scores_BxW, finish_scores], axis=1)
        merged_seqs = jnp.concatenate([state.done_seqs_BxWxT, cand_seqs], axis=1)
        merged_flags = jnp.concatenate([state.done_flags_BxW, stops & top_w_mask[None]], axis=1)
        done_scores, keep = jax.lax.top_k(merged_scores, W)
        done_seqs = jnp.take_along_axis(merged_seqs, keep[:, :, None], axis=1)
        done_flags = jnp.take_along_axis(merged_flags, keep, axis=1)

        # transformers' early-stop heuristic (early_stopping=False): can the best alive beam still win?
        best_alive = go_on_scores[:, :1] / generated**lp
        worst_done = jnp.where(done_flags, jnp.min(done_scores, axis=1, keepdims=True), _NEG)
        improvable = improvable & jnp.any(best_alive > worst_done, axis=1)
        logits, cache = step(alive_seqs[:, :, t].reshape(-1), cache, t + 1)
        return BeamState(step=t + 1, logits_RxV=logits, alive_seqs_BxWxT=alive_seqs, alive_scores_BxW=go_on_scores,
                         done_seqs_BxWxT=done_seqs, done_scores_BxW=done_scores, done_flags_BxW=done_flags,
                         cache=cache, improvable_B=improvable, all_stopped=jnp.all(stops))

    empty = jnp.full((batch, W, T), pad, jnp.int32)
    logits, cache = step(start, cache, jnp.zeros((), jnp.int32))  # outside the loop, see _greedy
    state = BeamState(step=jnp.zeros((), jnp.int32), logits_RxV=logits, alive_seqs_BxWxT=empty,
                      alive_scores_BxW=jnp.tile(jnp.where(jnp.arange(W) == 0, 0.0, _NEG)[None], (batch, 1)),
                      done_seqs_BxWxT=empty, done_scores_BxW=jnp.full((batch, W), _NEG),
                      done_flags_BxW=jnp.zeros((batch, W), bool), cache=cache, improvable_B=jnp.ones((batch,), bool),
                      all_stopped=jnp.zeros((), bool))
    best = jax.lax.while_loop(cond, body, state).done_seqs_BxWxT[:, 0]
    # Everything after the first EOS is padding.
    after_eos = jnp.cumsum(best == eos, axis=1) - (best == eos) > 0
    return jnp.where(after_eos, pad, best)


def generate(model: Any, lm_params: Any, prefix: Prefix, source_ids: jax.Array, source_mask: jax.Array,
             cfg: GenerationConfig, rng: jax.Array | None = None) -> jax.Array:
    """Generated token ids `[B, max_new_tokens]` (EOS included, then padding). Jit with `make_generate_fn`.

    `rng` seeds sampling (default: `jax.random.key(cfg.seed)`); greedy and beam search ignore it.
    """
    config = model.config
    if cfg.forced_bos_token_id is not None and not config.is_encoder_decoder:
        raise ValueError("generate.forced_bos_token_id applies to encoder-decoder models (the first decoder "
                         f"token); a decoder-only {config.architecture} continues its source: leave it None.")
    begin = _encoder_decoder_start if config.is_encoder_decoder else _decoder_only_start
    start, cache, step, prompt = begin(model, lm_params, prefix, source_ids, source_mask, cfg)
    pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    search = _greedy if cfg.num_beams == 1 else _beam_search
    rng = jax.random.key(cfg.seed) if rng is None else rng
    return search(start, cache, step, prompt, cfg, config.eos_token_id, pad, rng)


def make_generate_fn(model: Any, cfg: GenerationConfig, lm_fingerprint: str | None = None) -> Callable:
    """`fn(lm_params, prefix, source_ids, source_mask, rng=None) -> tokens`, jitted; the LM stays an argument.

    `model`: the Flax module (`lm.model`) or the `models.PretrainedLM` itself (then errors name it). Each call
    first checks that the prefix fits the LM (`fingerprint.check_fits`): its shapes, and for a prefix read by
    `prefix.load_export` the architecture and weights it was trained on; a mismatch is a
    `fingerprint.PrefixMismatchError` naming both. The weights' fingerprint is computed once per `lm_params`,
    unless given: `lm_fingerprint`, for an LM whose params are not its checkpoint's (quantized: the float one's).
    """
    lm_name = getattr(model, "name_or_path", None)
    module = getattr(model, "model", model)
    jitted = jax.jit(lambda lm_params, prefix, source_ids, source_mask, rng=None: generate(
        module, lm_params, prefix, source_ids, source_mask, cfg, rng))
    seen: list[tuple[Any, str]] = []  # (lm_params, fingerprint) of the last LM checked

    def fn(lm_params: Any, prefix: Prefix, source_ids: jax.Array, source_mask: jax.Array,
           rng: jax.Array | None = None) -> jax.Array:
        known = None
        traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(lm_params))
        if lm_fingerprint is not None:
            known = lm_fingerprint
        elif prefix.trained_on is not None and prefix.trained_on.lm_fingerprint and not traced:
            if not (seen and seen[0][0] is lm_params):
                seen[:] = [(lm_params, fingerprint.lm_fingerprint(lm_params))]
            known = seen[0][1]
        fingerprint.check_fits(prefix, module.config, lm_name=lm_name, fingerprint=known)
        return jitted(lm_params, prefix, source_ids, source_mask, rng)

    def lower(lm_params: Any, prefix: Prefix, *args: Any, **kwargs: Any) -> Any:
        """`jax.jit(...).lower` of the same program (shapes checked; `lm_params` may be shapes only)."""
        fingerprint.check_shapes(prefix, module.config, lm_name or "the LM")
        return jitted.lower(lm_params, prefix, *args, **kwargs)

    fn.lower = lower  # type: ignore[attr-defined]
    return fn
