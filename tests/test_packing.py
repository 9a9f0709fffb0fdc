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
from prefix_jax.models import DECODER, load_pretrained, masks

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


@pytest.mark.parametrize("what,options,config,method", [
    ("encoder-decoder", {}, dict(is_encoder_decoder=True, architecture="t5"), "prefix"),
    ("multi-task", {"task_field": "task"}, dict(is_encoder_decoder=False, architecture="gpt2"), "prefix"),
    ("infix", {}, dict(is_encoder_decoder=False, architecture="gpt2"), "infix"),
])
def test_packing_refuses_what_it_does_not_support(what, options, config, method):
    o = types.SimpleNamespace(data=types.SimpleNamespace(task_field=options.get("task_field", "")))
    with pytest.raises(ConfigError, match="data.pack"):
        run_setup.check_packing(o, types.SimpleNamespace(**config), types.SimpleNamespace(method=method))
