"""Reading, linearizing, tokenizing and batching: exact strings on the bundled files, static deterministic batches."""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from prefix_jax import data
from prefix_jax.tiny_checkpoints import bundled_gpt2_tokenizer

REPO = Path(__file__).resolve().parent.parent
E2E_DEV, E2E_TEST = REPO / "data/e2e/devset.csv", REPO / "data/e2e/testset_w_refs.csv"
DART_DEV = REPO / "data/dart/dart-v1.1.1-full-dev.json"


def test_e2e_linearization_and_references():
    examples = data.read_e2e_csv(E2E_DEV)
    assert len(examples) == 4672 and len({e.source for e in examples}) == 547
    first = examples[0]
    assert first.source == "name : Alimentum | area : city centre | familyFriendly : no"
    assert first.target == "There is a place in the city centre, Alimentum, that is not family-friendly."
    assert first.target in first.references and len(first.references) == sum(
        e.source == first.source for e in examples)
    assert data.linearize_e2e("name[The Eagle], eatType[coffee shop], priceRange[less than £20]") == \
        "name : The Eagle | eatType : coffee shop | priceRange : less than £20"
    test = data.read_e2e_csv(E2E_TEST)
    assert len(test) == 4693 and len({e.source for e in test}) == 630
    with pytest.raises(data.DataError, match="meaning representation"):
        data.linearize_e2e("no slots here")


def test_dart_linearization_and_references():
    examples = data.read_dart_json(DART_DEV)
    assert len(examples) == 6980
    assert examples[0].source == "Mars Hill College : JOINED : 1973 | Mars Hill College : LOCATION : Mars Hill, North Carolina"
    assert examples[0].target == "A school from Mars Hill, North Carolina, joined in 1973."
    records = json.loads(DART_DEV.read_text())
    assert len(examples) == sum(len(r["annotations"]) for r in records)  # one example per annotation
    by_source = {e.source: set(e.references) for e in examples}
    for record in records:  # every annotation is a reference of its own linearized tripleset
        texts = {a["text"].strip() for a in record["annotations"]}
        assert texts <= by_source[data.linearize_triples(record["tripleset"])]
    many = [e for e in examples if len(e.references) > 1][0]
    assert len(set(many.references)) > 1


def test_webnlg_and_hub_layouts():
    import datasets

    webnlg = datasets.Dataset.from_list([{"input": ["Aarhus_Airport | cityServed | Aarhus", "Aarhus | country | Denmark"],
                                          "target": "Aarhus Airport serves Aarhus, Denmark."}])
    (example,) = data.table_to_text_examples("webnlg", webnlg, "train")
    assert example.source == "Aarhus_Airport : cityServed : Aarhus | Aarhus : country : Denmark"
    e2e = datasets.Dataset.from_list([{"meaning_representation": "name[Zizzi], eatType[pub]", "human_reference": "Zizzi is a pub."}])
    assert data.table_to_text_examples("e2e", e2e, "train")[0].source == "name : Zizzi | eatType : pub"


def fields_config(tmp_path: Path, **kw) -> ml_collections.ConfigDict:
    rows = [{"doc": f"document {i}", "sum": f"summary {i}"} for i in range(5)]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    c = ml_collections.ConfigDict(dict(name="", config_name="", data_files={"train": str(path)}, format="fields",
                                       source_field="doc", target_field="sum"))
    c.update(kw)
    return c


def test_local_jsonl_with_configurable_fields(tmp_path):
    examples = data.read_examples(fields_config(tmp_path), "train")
    assert [(e.source, e.target) for e in examples[:2]] == [("document 0", "summary 0"), ("document 1", "summary 1")]
    with pytest.raises(data.DataError, match="data.source_field"):
        data.read_examples(fields_config(tmp_path, source_field="text"), "train")
    with pytest.raises(data.DataError, match="'validation'"):
        data.read_examples(fields_config(tmp_path), "validation")


def test_offline_hub_dataset_is_a_clear_error():
    c = ml_collections.ConfigDict(dict(name="EdinburghNLP/xsum", config_name="", data_files={}, format="fields",
                                       source_field="document", target_field="summary"))
    with pytest.raises(data.DataError, match="data.data_files"):
        data.read_examples(c, "train")


def test_tokenization_for_both_model_kinds():
    examples = data.read_e2e_csv(E2E_DEV)[:3]
    decoder_only = data.tokenize(examples, bundled_gpt2_tokenizer(False, False), 64, 8, encoder_decoder=False,
                                 target_prefix=" ")
    tok = bundled_gpt2_tokenizer(False, False)
    assert decoder_only.source_ids[0] == tok(examples[0].source)["input_ids"]
    assert decoder_only.target_ids[0][-1] == tok.eos_token_id and len(decoder_only.target_ids[0]) == 8  # truncated
    encoder_decoder = data.tokenize(examples, bundled_gpt2_tokenizer(True, True), 64, 64, encoder_decoder=True,
                                    source_prefix="describe: ")
    assert encoder_decoder.source_ids[0][-1] == tok.eos_token_id  # the tokenizer's own end token
    assert encoder_decoder.source_ids[0][:2] == tok("describe:")["input_ids"][:2]


def make_batcher(n=10, batch=4, **kw) -> data.Batcher:
    split = data.TokenizedSplit([[i + 1] * (i % 3 + 1) for i in range(n)], [[i + 1, 99] for i in range(n)],
                                [data.Example(str(i), str(i)) for i in range(n)])
    return data.Batcher(split, batch, source_width=4, target_width=3, pad_id=0, left_pad_source=kw.pop("left", False),
                        seed=kw.pop("seed", 0), **kw)


def test_batches_are_static_deterministic_and_split_over_processes():
    b = make_batcher()
    assert b.steps_per_epoch == 2
    first = b.train_batch(0)
    assert first["source_ids"].shape == (4, 4) and first["target_ids"].shape == (4, 3)
    np.testing.assert_array_equal(first["source_ids"], make_batcher().train_batch(0)["source_ids"])  # same seed
    assert not np.array_equal(b.train_batch(0)["source_ids"], b.train_batch(2)["source_ids"])  # epoch 2 reshuffled
    assert not np.array_equal(first["source_ids"], make_batcher(seed=1).train_batch(0)["source_ids"])
    assert b.position(5) == {"epoch": 2, "batch": 1}
    halves = [make_batcher(process_index=i, process_count=2).train_batch(3) for i in range(2)]
    whole = b.train_batch(3)
    np.testing.assert_array_equal(np.concatenate([h["source_ids"] for h in halves]), whole["source_ids"])
    left = make_batcher(left=True).train_batch(0)
    assert (left["source_mask"][:, -1] == 1).all() and (first["source_mask"][:, 0] == 1).all()


def test_eval_batches_cover_every_example_once():
    b = make_batcher(n=10, batch=4)
    batches = list(b.eval_batches())
    assert len(batches) == 3 and all(x["source_ids"].shape == (4, 4) for x in batches)
    rows = [(tuple(ids[m == 1]), tuple(t[tm == 1])) for x in batches
            for ids, m, t, tm in zip(x["source_ids"], x["source_mask"], x["target_ids"], x["target_mask"])
            if m.any()]
    expected = [(tuple(s), tuple(t)) for s, t in zip(b.split.source_ids, b.split.target_ids)]
    assert rows == expected  # each example once, in order; the filler rows are fully masked
