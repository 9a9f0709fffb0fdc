"""Length buckets for evaluation and decoding (`eval.length_buckets`): batches padded to the smallest of a few widths
give the eval loss and the decoded tokens of the unbucketed batches (padded to the split's longest), with a bounded
number of shapes; a planted bug (rows put in a bucket narrower than they are) breaks the equality."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from tolerances import F32_REORDERED_RTOL

from prefix_jax import data, evaluation, sharding, train_steps
from prefix_jax import prefix as prefix_lib
from prefix_jax.data import batcher as batcher_lib, buckets
from prefix_jax.generate import GenerationConfig, make_generate_fn
from prefix_jax.models import DECODER, load_pretrained


def ragged_split(vocab: int, n: int = 13) -> data.TokenizedSplit:
    """Sources of 2-20 tokens and targets of 1-14 (ending in EOS): several buckets' worth of lengths."""
    rng = np.random.default_rng(4)
    src = [rng.integers(5, vocab, rng.integers(2, 21)).tolist() for _ in range(n)]
    tgt = [rng.integers(5, vocab, rng.integers(0, 14)).tolist() + [2] for _ in range(n)]
    return data.TokenizedSplit(src, tgt, [data.Example(f"s{i}", "t") for i in range(n)])


def test_bucket_widths_follow_the_lengths_up_to_the_longest():
    assert buckets.bucket_widths([3, 5, 9, 17, 30], 40, 3) == (16, 24, 32)  # quantiles 1/3, 2/3, 1: 9, 17, 30
    assert buckets.bucket_widths(list(range(1, 65)), 64, 4) == (24, 40, 56, 64)  # 17, 33, 49, 64 rounded up
    assert buckets.bucket_widths([3, 4, 70], 64, 2) == (8, 64) and buckets.bucket_widths([3, 5], 24, 0) == (24,)
    assert buckets.bucket_of(17, (16, 32)) == 32 and buckets.bucket_of(16, (16, 32)) == 16


@pytest.fixture(scope="module")
def gpt2_setup(tiny_checkpoint):
    lm = load_pretrained(str(tiny_checkpoint("gpt2")))
    spec = prefix_lib.PrefixSpec(length=3, placements=(DECODER,), geometry=lm.config.prefix_geometry(),
                                 hidden_size=lm.config.hidden_size, mlp_hidden=8)
    return lm, spec, prefix_lib.init_params(spec, jax.random.PRNGKey(0)), sharding.make_mesh()


def eval_batcher(split, buckets: int) -> data.Batcher:
    widths = data.padded_lengths(split, 64, 64)
    return data.Batcher(split, 4, *widths, 0, left_pad_source=True, length_buckets=buckets)


@pytest.mark.parametrize("bug", [None, "rows put in the narrowest bucket"])
def test_bucketed_eval_loss_and_decoding_equal_unbucketed(gpt2_setup, monkeypatch, tmp_path, bug):
    lm, spec, params, mesh = gpt2_setup
    split = ragged_split(lm.config.vocab_size)
    eval_fn = jax.jit(lambda p, lm_params, b: train_steps.eval_step(p, lm_params, b, model=lm.model, spec=spec))
    generate_fn = make_generate_fn(lm.model, GenerationConfig(max_new_tokens=5))
    plain, bucketed = eval_batcher(split, 0), eval_batcher(split, 2)
    (sources, targets) = bucketed.bucket_widths
    assert len(sources) == 2 and len(targets) <= 2 and sources[-1] <= plain.source_width  # bounded: 2 a side
    if bug:  # every row padded (or cut) to the narrowest width
        monkeypatch.setattr(batcher_lib, "bucket_of", lambda length, widths: widths[0])
    shapes = {(b["source_ids"].shape[1], b["target_ids"].shape[1]) for b in bucketed.eval_batches()}
    assert 1 + (not bug) <= len(shapes) <= 4 and bucketed.num_eval_batches >= plain.num_eval_batches
    expected, got = (evaluation.loss(b, mesh, params, lm.params, eval_fn) for b in (plain, bucketed))

    same = (got["eval_tokens"] == expected["eval_tokens"]
            and abs(got["eval_loss"] - expected["eval_loss"]) <= F32_REORDERED_RTOL * abs(expected["eval_loss"]))
    assert same != bool(bug)
    if bug:
        return
    decoded = {}
    ids_text = type("Ids", (), {"batch_decode": staticmethod(lambda rows, **_: [" ".join(map(str, r)) for r in rows])})
    for name, b in (("plain", plain), ("bucketed", bucketed)):
        path = tmp_path / f"{name}.jsonl"
        evaluation.generate_and_score(b, mesh, ids_text, spec, params, lm.params, generate_fn, (), predictions_path=path)
        decoded[name] = [json.loads(line)["prediction"] for line in path.read_text().splitlines()]
    assert decoded["plain"] == decoded["bucketed"] and len(decoded["plain"]) == len(split)


@pytest.mark.slow
def test_train_py_with_packing_and_length_buckets_runs_end_to_end(tiny_gpt2_dir, tmp_path, caplog):
    """The demo's settings on the tiny GPT-2: packed training rows (target slots), bucketed eval and decoding."""
    from configs import gpt2_e2e_offline

    from prefix_jax import trainer

    c = gpt2_e2e_offline.get_config()
    c.model.name_or_path, c.model.create_tiny = str(tiny_gpt2_dir), ""
    c.data.max_train_examples, c.data.max_eval_examples = 32, 12
    c.data.max_source_length, c.data.max_target_length = 32, 16
    c.data.pack, c.data.pack_width, c.eval.length_buckets = True, 64, 2
    c.eval.max_generate, c.generate.max_new_tokens = 4, 6
    c.train.workdir, c.train.steps, c.train.batch_size, c.train.log_every = str(tmp_path), 2, 2, 1
    c.optim.warmup_steps = 1
    with caplog.at_level("INFO", logger="prefix_jax"):
        summary = trainer.run(c)
    assert summary["final_step"] == 2 and summary["generated"] == 4 and np.isfinite(summary["eval_loss"])
    assert any("eval loss:" in r.message and "shapes" in r.message for r in caplog.records)
