"""Corpus metrics the paper reports: BLEU (table-to-text, all references) and ROUGE-1/2/L (summarization)."""

from __future__ import annotations

from typing import Sequence

METRICS = ("bleu", "rouge")


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (sacreBLEU, 13a tokenization) against every reference of each source."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists.")
    most = max((len(r) for r in references), default=0)
    # sacreBLEU takes one stream per reference slot; a missing reference is None.
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(most)]
    return float(sacrebleu.corpus_bleu(list(hypotheses), streams).score)


def rouge(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F1 x 100 (stemmed), each hypothesis scored against its best reference."""
    from rouge_score import rouge_scorer, scoring

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    aggregator = scoring.BootstrapAggregator()
    for hypothesis, refs in zip(hypotheses, references, strict=True):
        # rougeLsum splits summaries on newlines; one sentence per line as the usual XSum scripts do.
        split = lambda text: text.replace(". ", ".\n")
        aggregator.add_scores(scorer.score_multi([split(r) for r in refs], split(hypothesis)))
    result = aggregator.aggregate()
    return {name: float(score.mid.fmeasure * 100) for name, score in result.items()}


def compute(names: Sequence[str], hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """The named metrics as a flat dict (`bleu`, `rouge1`, `rouge2`, `rougeL`, `rougeLsum`)."""
    out: dict[str, float] = {}
    for name in names:
        if name == "bleu":
            out["bleu"] = bleu(hypotheses, references)
        elif name == "rouge":
            out.update(rouge(hypotheses, references))
        else:
            raise ValueError(f"eval.metrics has {name!r}; choose from {METRICS}.")
    return out
