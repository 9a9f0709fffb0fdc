"""The paper's metrics on a small fixed E2E-like example, against numbers recorded from the packages' own runs
(sacreBLEU 2.6.0, nltk 3.10.4, pycocoevalcap 1.2 with its METEOR 1.5 jar on OpenJDK 17, rouge-score 0.1.2)."""

from __future__ import annotations

import pytest

from prefix_jax import text_metrics

HYPS = ["the eagle is a coffee shop in the city centre .", "Blue Spice serves cheap Chinese food near the river.",
        "Zizzi is a pub ."]
REFS = [["The Eagle is a coffee shop in the city centre.",
         "In the city centre there is a coffee shop called The Eagle."],
        ["Blue Spice is a cheap Chinese restaurant by the riverside.",
         "Cheap Chinese food is served at Blue Spice near the river."],
        ["Zizzi is a family friendly pub.", "There is a pub called Zizzi.", "Zizzi, a pub."]]
needs_java = pytest.mark.skipif(not text_metrics.java_available(), reason="METEOR/ROUGE-L/CIDEr (pycocoevalcap) need java")


def test_python_metrics_match_recorded_values():
    got = text_metrics.compute(("bleu", "nist", "ter", "xsum"), HYPS, REFS)
    assert got["bleu"] == pytest.approx(61.88298405541168, abs=1e-9)
    assert got["nist"] == pytest.approx(4.371908107293239, abs=1e-9)
    assert got["ter"] == pytest.approx(37.735849056603776, abs=1e-9)
    assert got["rouge1"] == pytest.approx(91.9047619047619, abs=1e-9)
    assert got["rouge2"] == pytest.approx(68.5185185185185, abs=1e-9)
    assert got["rougeL"] == pytest.approx(81.90476190476191, abs=1e-9)
    # mteval-style lowercasing (the E2E group) changes BLEU here: "the eagle" vs "The Eagle".
    assert text_metrics.bleu(HYPS, REFS, lowercase=True) == pytest.approx(73.04277831657177, abs=1e-9)
    assert text_metrics.nist(HYPS, REFS, lowercase=True) == pytest.approx(4.9960879939400815, abs=1e-9)


def test_perfect_and_disjoint_outputs():
    refs = [["a cheap pub in the centre"], ["a coffee shop near the river"]]
    same = text_metrics.compute(("bleu", "ter"), [r[0] for r in refs], refs)
    assert same == {"bleu": pytest.approx(100.0), "ter": pytest.approx(0.0)}
    assert text_metrics.bleu(["w x y z", "q r s t"], refs) == pytest.approx(0.0)
    # The best of several references counts.
    assert text_metrics.bleu(["the cat sat on the mat"], [["different words", "the cat sat on the mat"]]) == \
        pytest.approx(100.0)


@pytest.mark.slow  # starts the METEOR jar in a JVM (~20 s); the Python metrics above run by default
@needs_java
def test_java_metrics_match_recorded_values():
    got = text_metrics.compute(("e2e",), HYPS, REFS)
    assert set(got) == {"bleu_lc", "nist_lc", "meteor", "rouge_l", "cider"}
    assert got["meteor"] == pytest.approx(50.01917953555605, abs=1e-6)
    assert got["rouge_l"] == pytest.approx(86.31239935587762, abs=1e-9)
    assert got["cider"] == pytest.approx(4.8237667607876205, abs=1e-9)
    webnlg = text_metrics.compute(("webnlg",), HYPS, REFS)
    assert set(webnlg) == {"bleu", "meteor", "ter"} and webnlg["meteor"] == got["meteor"]


@pytest.mark.slow  # a METEOR JVM
@needs_java
def test_empty_hypothesis_does_not_hang_meteor():
    assert text_metrics.compute(("meteor",), ["", HYPS[0]], REFS[:2])["meteor"] < 60


def test_missing_java_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(text_metrics.shutil, "which", lambda name: None)
    with pytest.raises(text_metrics.MetricUnavailable, match=r"'meteor', which runs on Java .* no `java` is on PATH"):
        text_metrics.compute(("meteor",), HYPS, REFS)
    assert text_metrics.compute(("bleu",), HYPS, REFS)["bleu"] > 0  # pure-Python metrics still work


def test_unknown_metric_names_the_field():
    with pytest.raises(ValueError, match=r"eval.metrics has 'bleurt'"):
        text_metrics.compute(("bleurt",), HYPS, REFS)


def test_wordnet_detection_answers_without_network():
    assert text_metrics.nltk_wordnet_available() in (True, False)
