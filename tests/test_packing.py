"""Packed training rows (`data.pack`): several examples per row give the loss and gradients of the same examples
unpacked (each example sees the prefix and only its own tokens, at the positions it has alone); the packer
keeps batches addressed by step; what packing does not support is refused by name."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import F32_REORDERED_RTOL

from prefix_jax import data, run_setup, train_steps
from prefix_jax import prefix as prefix_lib
from prefix_jax.config_checks import ConfigError
from prefix_jax.models import CROSS, DECODER, ENCODER, bart, load_pretrained, masks, t5

WIDTH = 40


def random_split(vocab: int, n: int = 10, seed: int = 0) -> data.TokenizedSplit:
    """Ragged sources (3-12 tokens) and targets (2-9, ending in EOS) of random ids."""
    rng = np.random.default_rng(seed)
    src = [rng.integers(5, vocab, rng.integers(3, 13)).tolist() for _ in range(n)]
    tgt = [rng.integers(5, vocab, rng.integers(1, 9)).tolist() + [2] for _ in range(n)]
    return data.TokenizedSplit(src, tgt, [data.Example(f"s{i}", "t") for i in range(n)])


def unpacked_batch(split: data.TokenizedSplit) -> dict:
    src_ids, src_mask = data.pad(split.source_ids, 16, 0, left=True)
    tgt_ids, tgt_mask = data.pad(split.target_ids, 16, 0, left=False)
    return dict(source_ids=src_ids, source_mask=src_mask, target_ids=tgt_ids, target_mask=tgt_mask)


def loss_and_grads(lm, spec, params, batch):
    batch = {k: jnp.asarray(v) for k, v in batch.items()}

    def total(p):
        loss_sum, count = train_steps.batch_loss(lm.model, spec, p, lm.params, batch, None)
        return loss_sum, count

    (loss_sum, count), grads = jax.value_and_grad(total, has_aux=True)(params)
    return float(loss_sum), float(count), grads


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def lm_and_spec(request, tiny_checkpoint):
    lm = load_pretrained(str(tiny_checkpoint(request.param)))
    spec = prefix_lib.PrefixSpec(length=3, placements=(DECODER,), geometry=lm.config.prefix_geometry(),
                                 hidden_size=lm.config.hidden_size, mlp_hidden=8)
    return lm, spec, prefix_lib.init_params(spec, jax.random.PRNGKey(0))


TARGETS_PER_ROW = 16  # the loss reads 16 of a row's 40 slots


def packed_vs_unpacked(lm, spec, params, corrupt=lambda batch: batch) -> tuple[tuple, tuple]:
    split = random_split(lm.config.vocab_size)
    lengths = [len(s) + len(t) for s, t in zip(split.source_ids, split.target_ids)]
    rows = data.pack_rows(lengths, range(len(split)), WIDTH, [len(t) for t in split.target_ids], TARGETS_PER_ROW)
    assert max(len(r) for r in rows) >= 2  # rows really hold several examples
    packed = data.packed_batch(split, rows, WIDTH, lm.config.separator_token_id, 0, TARGETS_PER_ROW)
    assert packed["target_slots"].shape == (len(rows), TARGETS_PER_ROW)
    return (loss_and_grads(lm, spec, params, corrupt(packed)),
            loss_and_grads(lm, spec, params, unpacked_batch(split)))


def assert_close_trees(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=F32_REORDERED_RTOL,
                                   atol=F32_REORDERED_RTOL * float(np.abs(np.asarray(y)).max()))


def test_packed_rows_give_the_unpacked_loss_and_gradients(lm_and_spec):
    (p_sum, p_count, p_grads), (u_sum, u_count, u_grads) = packed_vs_unpacked(*lm_and_spec)
    assert p_count == u_count > 0
    assert abs(p_sum - u_sum) <= F32_REORDERED_RTOL * abs(u_sum)
    assert_close_trees(p_grads, u_grads)


@pytest.mark.parametrize("bug", ["attention crosses segments", "positions do not restart", "target slots shifted"])
def test_planted_packing_bugs_break_the_equality(lm_and_spec, monkeypatch, bug):
    corrupt = lambda batch: batch
    if bug == "attention crosses segments":
        real = masks.packed_attention_mask
        monkeypatch.setattr(masks, "packed_attention_mask", lambda seg, p: real((seg > 0).astype(seg.dtype), p))
    elif bug == "positions do not restart":
        monkeypatch.setattr(masks, "segment_positions",
                            lambda seg, start=0: jnp.asarray(start).reshape(-1, 1) + jnp.arange(seg.shape[1])[None])
    else:  # each target read from the next slot's hidden state
        corrupt = lambda batch: {**batch, "target_slots": np.minimum(batch["target_slots"] + 1, WIDTH - 1)}
    (p_sum, _, _), (u_sum, _, _) = packed_vs_unpacked(*lm_and_spec, corrupt)
    assert abs(p_sum - u_sum) > 10 * F32_REORDERED_RTOL * abs(u_sum)  # the equality test fails by far


BLOCK = 8  # query blocks of 8 slots: a row of 40 is 5 blocks, each reading a window of 4 (its own and 3 before)


def windowed_vs_unpacked(lm, spec, params, window_span=None) -> tuple[tuple, tuple]:
    split = random_split(lm.config.vocab_size)
    lengths = [len(s) + len(t) for s, t in zip(split.source_ids, split.target_ids)]
    span = masks.window_span(WIDTH, max(lengths), BLOCK)
    assert 1 < span < WIDTH // BLOCK  # windows really skip keys
    rows = data.pack_rows(lengths, range(len(split)), WIDTH, [len(t) for t in split.target_ids], TARGETS_PER_ROW)
    packed = data.packed_batch(split, rows, WIDTH, lm.config.separator_token_id, 0, TARGETS_PER_ROW, span, BLOCK)
    assert packed["window_segment_ids"].shape == (len(rows), WIDTH // BLOCK, span * BLOCK)
    if window_span is not None:  # a planted bug: windows narrower than the longest example
        packed["window_segment_ids"] = masks.key_windows(packed["segment_ids"], BLOCK, window_span)
    return (loss_and_grads(lm, spec, params, packed), loss_and_grads(lm, spec, params, unpacked_batch(split)))


def test_attention_in_query_blocks_over_key_windows_gives_the_unpacked_loss_and_gradients(lm_and_spec):
    (p_sum, p_count, p_grads), (u_sum, u_count, u_grads) = windowed_vs_unpacked(*lm_and_spec)
    assert p_count == u_count > 0
    assert abs(p_sum - u_sum) <= F32_REORDERED_RTOL * abs(u_sum)
    assert_close_trees(p_grads, u_grads)
    (b_sum, _, _), _ = windowed_vs_unpacked(*lm_and_spec, window_span=1)  # planted: a window of one block
    assert abs(b_sum - u_sum) > 10 * F32_REORDERED_RTOL * abs(u_sum)


def test_key_windows_and_block_mask():
    seg = np.asarray([[1, 1, 1, 2, 2, 2, 2, 0]])
    assert masks.window_blocks(4, 2) == 3  # segment 2's last query needs 3 slots before its own: 3 blocks of 2
    windows = masks.key_windows(seg, 2, 3)  # 4 blocks of 2 queries, each reading its block and the 2 before
    assert isinstance(windows, np.ndarray) and windows.tolist() == [[[0, 0, 0, 0, 1, 1], [0, 0, 1, 1, 1, 2],
                                                                     [1, 1, 1, 2, 2, 2], [1, 2, 2, 2, 2, 0]]]
    assert np.asarray(masks.key_windows(jnp.asarray(seg), 2, 3)).tolist() == windows.tolist()
    block = np.asarray(masks.packed_block_mask(jnp.asarray(seg), jnp.asarray(windows), 1).visible)[0]
    dense = np.asarray(masks.packed_attention_mask(jnp.asarray(seg), 1))[0, 0]
    for q in range(8):  # every query sees the same keys as in the dense mask, no more
        first = (q // 2 - 2) * 2
        seen = {first + c for c in range(6) if block[q // 2, q % 2, 1 + c]}
        assert seen == {k for k in range(8) if dense[q, 1 + k]} and block[q // 2, q % 2, 0]
    with pytest.raises(data.DataError, match="does not fit attention windows"):
        split = random_split(64, n=2)
        data.packed_batch(split, [[0, 1]], WIDTH, 1, 0, 0, window_span=1, block=BLOCK)


def test_segment_positions_and_mask():
    seg = jnp.asarray([[1, 1, 1, 2, 2, 0]])
    assert masks.segment_positions(seg, 5).tolist() == [[5, 6, 7, 5, 6, 5]]
    mask = np.asarray(masks.packed_attention_mask(seg, 2))[0, 0]
    assert mask.shape == (6, 8) and mask[:, :2].all()  # the prefix: visible to every slot
    assert mask[3, 2:].tolist() == [False, False, False, True, False, False]  # segment 2 starts alone
    assert mask[2, 2:].tolist() == [True, True, True, False, False, False]


def test_packed_batches_are_addressed_by_step_and_cover_the_epoch():
    split = random_split(1000, n=40, seed=1)
    make = lambda index=0, count=1: data.Batcher(split, 4, 16, 16, 0, True, seed=3, process_index=index,
                                                 process_count=count, pack_width=WIDTH, separator_id=1)
    batcher = make()
    rows = batcher.packed_epoch(0)
    lengths = [len(s) + len(t) for s, t in zip(split.source_ids, split.target_ids)]
    assert sorted(i for r in rows for i in r) == list(range(40))  # each example once
    assert all(sum(lengths[i] for i in r) <= WIDTH for r in rows)
    targets = [len(t) for t in split.target_ids]
    assert rows == data.pack_rows(lengths, np.random.default_rng([3, 0]).permutation(40), WIDTH)  # budget not binding
    assert max(sum(targets[i] for i in r) for r in rows) <= batcher.targets_per_row < WIDTH
    assert all(sum(targets[i] for i in r) <= batcher.targets_per_row for r in batcher.packed_epoch(1))
    assert batcher.steps_per_epoch == len(rows) // 4
    first = batcher.train_batch(1)
    assert all(np.array_equal(first[k], make().train_batch(1)[k]) for k in first)  # a fresh batcher: the same
    assert first["ids"].shape == (4, WIDTH) and first["segment_ids"].max() >= 2
    later = batcher.train_batch(batcher.steps_per_epoch)  # epoch 1 reshuffles
    assert not np.array_equal(later["ids"], batcher.train_batch(0)["ids"])
    halves = [make(i, 2).train_batch(1) for i in range(2)]  # two processes: each its own rows
    assert np.array_equal(np.concatenate([h["ids"] for h in halves]), first["ids"])
    with pytest.raises(data.DataError, match="data.pack_width=8"):
        data.pack_rows(lengths, range(40), 8)
    tight = data.pack_rows(lengths, range(40), WIDTH, targets, 12)  # a target budget closes rows early
    assert all(sum(targets[i] for i in r) <= 12 for r in tight) and len(tight) > len(data.pack_rows(
        lengths, range(40), WIDTH))


# --- Encoder-decoders: sources packed in the encoder's row, their targets in the decoder's (as T5X packs) ---

SOURCE_WIDTH = 32  # source tokens per packed encoder row (the test sources have 3-12)
_TINY = dict(vocab_size=64, d_model=16)
ENCODER_DECODERS = {  # tiny random models built from our configs: packing is ours against ours
    "t5-v1.0": lambda: t5.Config(**_TINY, d_kv=8, d_ff=32, num_heads=2, num_encoder_layers=2, num_decoder_layers=2,
                                 relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                 dropout_rate=0.0),
    "t5-v1.1": lambda: t5.Config(**_TINY, d_kv=8, d_ff=32, num_heads=2, num_encoder_layers=2, num_decoder_layers=1,
                                 relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                 dropout_rate=0.0, dense_act_fn="gelu_new", is_gated_act=True, tied_lm_head=False,
                                 scale_decoder_outputs=False),
    "bart": lambda: bart.Config(**_TINY, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                                decoder_attention_heads=4, encoder_ffn_dim=32, decoder_ffn_dim=32,
                                max_position_embeddings=64, dropout=0.0),
    "bart-positions-after-prefix": lambda: bart.Config(
        **_TINY, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64, dropout=0.0, positions_after_prefix=True),
}
ALL_PLACEMENTS = (ENCODER, DECODER, CROSS)


def encoder_decoder_case(name: str, placements=ALL_PLACEMENTS, method: str = "prefix"):
    """(model, spec, prefix params, LM params) of a tiny random encoder-decoder."""
    config = ENCODER_DECODERS[name]()
    model = (t5 if name.startswith("t5") else bart).Model(config)
    batch = {k: jnp.asarray(v) for k, v in unpacked_batch(random_split(64, n=2)).items()}
    lm_params = jax.jit(model.init)(jax.random.PRNGKey(0), batch)["params"]
    spec = prefix_lib.PrefixSpec(length=3, placements=placements, geometry=config.prefix_geometry(),
                                 hidden_size=config.d_model, mlp_hidden=8, method=method)
    return model, spec, prefix_lib.init_params(spec, jax.random.PRNGKey(1)), lm_params


def packed_encoder_decoder(split: data.TokenizedSplit) -> dict:
    rows = data.pack_rows([len(s) for s in split.source_ids], range(len(split)), SOURCE_WIDTH)
    assert max(len(r) for r in rows) >= 3  # rows really hold several examples
    target_width = -(-max(sum(len(split.target_ids[i]) for i in r) for r in rows) // 8) * 8
    return data.packed_encoder_decoder_batch(split, rows, SOURCE_WIDTH, target_width, 0)


def encoder_decoder_loss(case, batch, with_grads: bool):
    model, spec, params, lm_params = case
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    total = lambda p: train_steps.batch_loss(model, spec, p, lm_params, batch, None)
    if not with_grads:
        loss_sum, count = jax.jit(total)(params)
        return float(loss_sum), float(count), None
    (loss_sum, count), grads = jax.jit(jax.value_and_grad(total, has_aux=True))(params)
    return float(loss_sum), float(count), grads


def assert_packed_equals_unpacked(case) -> None:
    split = random_split(64)
    (p_sum, p_count, p_grads), (u_sum, u_count, u_grads) = (
        encoder_decoder_loss(case, batch, True) for batch in (packed_encoder_decoder(split), unpacked_batch(split)))
    assert p_count == u_count == sum(len(t) for t in split.target_ids)
    assert abs(p_sum - u_sum) <= F32_REORDERED_RTOL * abs(u_sum)
    assert_close_trees(p_grads, u_grads)


def test_packed_encoder_decoder_rows_give_the_unpacked_loss_and_gradients():
    """Every placement at once: the encoder's and the decoder's self-attention prefix and the cross-attention's
    (T5 here; the other variants, BART among them, in the slow set)."""
    assert_packed_equals_unpacked(encoder_decoder_case("t5-v1.0"))


@pytest.mark.slow
@pytest.mark.parametrize("name,placements,method", [
    ("bart", ALL_PLACEMENTS, "prefix"),
    ("t5-v1.1", ALL_PLACEMENTS, "prefix"),
    ("t5-v1.1", ALL_PLACEMENTS, "prefix_direct"),
    ("t5-v1.0", (ENCODER,), "prefix"),
    ("t5-v1.0", (DECODER,), "prefix"),
    ("t5-v1.0", (CROSS,), "prefix"),
    ("bart", (ENCODER, CROSS), "prefix"),
    ("bart-positions-after-prefix", ALL_PLACEMENTS, "prefix"),
    ("bart-positions-after-prefix", (DECODER,), "prefix_direct"),
])
def test_packed_encoder_decoder_equality_per_variant_and_placement(name, placements, method):
    assert_packed_equals_unpacked(encoder_decoder_case(name, placements, method))


@pytest.fixture(scope="module")
def t5_case_and_unpacked_loss():
    case = encoder_decoder_case("t5-v1.0")
    return case, encoder_decoder_loss(case, unpacked_batch(random_split(64)), False)[0]


@pytest.mark.parametrize("bug", ["cross-attention crosses segments", "encoder attention crosses segments",
                                 "positions do not restart", "targets shifted across segments"])
def test_planted_encoder_decoder_packing_bugs_break_the_equality(t5_case_and_unpacked_loss, monkeypatch, bug):
    case, unpacked_sum = t5_case_and_unpacked_loss
    real = masks.packed_attention_mask
    one_segment = lambda seg: (seg > 0).astype(seg.dtype)
    if bug == "cross-attention crosses segments":  # a target sees every example's source
        monkeypatch.setattr(masks, "packed_attention_mask", lambda seg, p=0, causal=True, key_segment_ids_BxC=None: (
            real(seg, p, causal) if key_segment_ids_BxC is None
            else real(one_segment(seg), p, causal, one_segment(key_segment_ids_BxC))))
    elif bug == "encoder attention crosses segments":
        monkeypatch.setattr(masks, "packed_attention_mask", lambda seg, p=0, causal=True, key_segment_ids_BxC=None: (
            real(one_segment(seg) if not causal and key_segment_ids_BxC is None else seg, p, causal,
                 key_segment_ids_BxC)))
    elif bug == "positions do not restart":
        monkeypatch.setattr(masks, "segment_positions", lambda seg, start=0: jnp.broadcast_to(
            jnp.asarray(start).reshape(-1, 1) + jnp.arange(seg.shape[1])[None], seg.shape))
    else:  # each example's first decoder input is the previous example's last target token
        monkeypatch.setattr(masks, "segment_shift_right", lambda ids, seg, start: masks.shift_right(ids, start))
    packed_sum = encoder_decoder_loss(case, packed_encoder_decoder(random_split(64)), False)[0]
    assert abs(packed_sum - unpacked_sum) > 10 * F32_REORDERED_RTOL * abs(unpacked_sum)  # fails the equality by far


def test_encoder_decoder_segment_masks():
    source, target = jnp.asarray([[1, 1, 2, 2, 2, 0]]), jnp.asarray([[1, 2, 2, 0]])
    cross = np.asarray(masks.packed_attention_mask(target, 1, causal=False, key_segment_ids_BxC=source))[0, 0]
    assert cross.shape == (4, 7) and cross[:, 0].all()  # the cross-attention prefix: visible to every slot
    assert cross[1, 1:].tolist() == [False, False, True, True, True, False]  # target 2 sees source 2 only
    assert not cross[3, 1:].any()  # padding sees no source
    encoder = np.asarray(masks.packed_attention_mask(source, 0, causal=False))[0, 0]
    assert encoder[0].tolist() == [True, True, False, False, False, False]
    assert masks.segment_shift_right(jnp.asarray([[7, 8, 9, 0]]), target, 5).tolist() == [[5, 5, 8, 5]]


def test_packed_encoder_decoder_batches_are_addressed_by_step():
    split = random_split(1000, n=40, seed=1)
    make = lambda index=0, count=1: data.Batcher(split, 4, 16, 16, 0, False, seed=3, process_index=index,
                                                 process_count=count, pack_width=SOURCE_WIDTH, encoder_decoder=True)
    batcher = make()
    rows = batcher.packed_epoch(0)
    sources, targets = [len(s) for s in split.source_ids], [len(t) for t in split.target_ids]
    assert sorted(i for r in rows for i in r) == list(range(40))  # each example once
    # The decoder row: the split's targets per SOURCE_WIDTH source tokens (at least its longest), a multiple of 8.
    share = SOURCE_WIDTH * sum(targets) / sum(sources)
    assert batcher.targets_per_row % 8 == 0 and max(share, max(targets)) <= batcher.targets_per_row < max(
        share, max(targets)) + 8
    assert rows == data.pack_rows(sources, np.random.default_rng([3, 0]).permutation(40), SOURCE_WIDTH, targets,
                                  batcher.targets_per_row)  # a row closes when either side is full
    assert all(sum(targets[i] for i in r) <= batcher.targets_per_row for r in batcher.packed_epoch(1))
    first = batcher.train_batch(1)
    assert all(np.array_equal(first[k], make().train_batch(1)[k]) for k in first)  # a fresh batcher (a resume)
    assert first["source_ids"].shape == (4, SOURCE_WIDTH)
    assert first["target_ids"].shape == (4, batcher.targets_per_row)
    assert np.array_equal(first["source_segment_ids"].max(1), first["target_segment_ids"].max(1))
    assert first["source_segment_ids"].max() >= 2
    row = rows[4]  # step 1's first row
    assert first["source_ids"][0, :sources[row[0]]].tolist() == split.source_ids[row[0]]
    assert first["target_ids"][0, :targets[row[0]]].tolist() == split.target_ids[row[0]]
    halves = [make(i, 2).train_batch(1) for i in range(2)]  # two processes: each its own rows
    assert all(np.array_equal(np.concatenate([h[k] for h in halves]), first[k]) for k in first)


@pytest.mark.slow
def test_train_py_packs_a_t5_run_and_resumes_it_exactly(tiny_t5_dir, tmp_path):
    """The tiny T5 trained on packed rows (`data.pack=True`), straight and stopped then resumed: the same losses."""
    from helpers import losses, small_config

    from prefix_jax import trainer
    from prefix_jax.metrics_file import read_metrics

    def config(name: str, **train):
        c = small_config(tiny_t5_dir, tmp_path / name, **train)
        c.data.pack, c.data.pack_width = True, 64  # sources of at most 32 tokens: two or more per row
        return c

    straight = trainer.run(config("straight"))
    assert trainer.run(config("resumed", stop_at=3))["final_step"] == 3
    second = trainer.run(config("resumed"))
    assert second["start_step"] == 3 and second["final_step"] == straight["final_step"] == 6
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert [a[s] for s in a] == [b[s] for s in a]  # bitwise: the same packed rows at each step
    assert np.isfinite(straight["eval_loss"]) and straight["eval_loss"] == second["eval_loss"]
    # More target tokens in a step than 4 unpacked examples can hold (4 rows x max_target_length 16).
    assert max(row["tokens"] for row in read_metrics(tmp_path / "straight") if "tokens" in row) > 4 * 16


@pytest.mark.parametrize("what,options,method", [
    ("multi-task", {"task_field": "task"}, "prefix"),
    ("infix", {}, "infix"),
    ("embedding-only prompt", {}, "embedding_only"),
])
def test_packing_refuses_what_it_does_not_support(what, options, method):
    o = types.SimpleNamespace(data=types.SimpleNamespace(task_field=options.get("task_field", "")))
    with pytest.raises(ConfigError, match="data.pack"):
        run_setup.check_packing(o, types.SimpleNamespace(method=method))


@pytest.mark.slow
@pytest.mark.parametrize("family, variant", [("gemma", "gemma2"), ("phi3", "phi3")])
def test_sliding_window_families_pack_exactly_with_and_without_key_windows(tiny_hf, family, variant):
    """Gemma 2 (soft-capped scores, sliding and global layers) and Phi-3 (a sliding window on every layer): their
    window narrows a packed row's mask, dense or in query blocks, as it narrows each example's alone."""
    _, lm = tiny_hf(family, variant)
    spec = prefix_lib.PrefixSpec(length=3, placements=(DECODER,), geometry=lm.config.prefix_geometry(),
                                 hidden_size=lm.config.hidden_size, mlp_hidden=8)
    params = prefix_lib.init_params(spec, jax.random.PRNGKey(0))
    for compare in (packed_vs_unpacked, windowed_vs_unpacked):
        (p_sum, p_count, p_grads), (u_sum, u_count, u_grads) = compare(lm, spec, params)
        assert p_count == u_count > 0
        assert abs(p_sum - u_sum) <= F32_REORDERED_RTOL * abs(u_sum)
        assert_close_trees(p_grads, u_grads)
