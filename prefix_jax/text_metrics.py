"""Corpus metrics the paper reports, computed offline by maintained packages.

  E2E      BLEU, NIST, METEOR, ROUGE-L, CIDEr   (metric group "e2e")
  WebNLG   BLEU, METEOR, TER                     (group "webnlg"; DART: group "dart", the same metrics)
  XSum     ROUGE-1/2/L                           (group "xsum" == "rouge")

Who computes what (README "Metrics" says how each relates to the official scripts):
  bleu       sacreBLEU corpus BLEU, 13a tokenisation, every reference of a source (x 100)
  nist       nltk `corpus_nist` (n=5) on 13a-tokenised text
  meteor     METEOR 1.5 (Java jar shipped in pycocoevalcap; `-l en -norm`) on PTB-tokenised text (x 100)
  rouge_l    pycocoevalcap ROUGE-L (beta 1.2, best reference) on PTB-tokenised text (x 100)
  cider      pycocoevalcap CIDEr(-D) on PTB-tokenised text (unscaled, as the paper reports it)
  ter        sacreBLEU TER (tercom's algorithm, case-insensitive), best reference per edit count (x 100)
  rouge      rouge-score ROUGE-1/2/L/Lsum F1, stemmed, best reference (x 100)
The PTB tokenizer and METEOR run on Java: without a `java` on PATH they raise `MetricUnavailable`.
"""

from __future__ import annotations

import functools
import shutil
from typing import Sequence

SINGLE = ("bleu", "rouge", "nist", "meteor", "rouge_l", "cider", "ter")
GROUPS = {
    "e2e": ("bleu_lc", "nist_lc", "meteor", "rouge_l", "cider"),
    "webnlg": ("bleu", "meteor", "ter"),
    "dart": ("bleu", "meteor", "ter"),
    "xsum": ("rouge",),
}
METRICS = SINGLE + tuple(GROUPS)  # every name `compute` (and eval.metrics) accepts


class MetricUnavailable(ValueError):
    """A metric whose runtime (Java, NLTK data) is missing here."""


def _check_lengths(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists.")


def _streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """sacreBLEU takes one stream per reference slot; a missing reference is None."""
    most = max((len(r) for r in references), default=0)
    return [[refs[i] if i < len(refs) else None for refs in references] for i in range(most)]


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]], lowercase: bool = False) -> float:
    """Corpus BLEU (sacreBLEU, 13a tokenization) against every reference of each source."""
    import sacrebleu

    _check_lengths(hypotheses, references)
    return float(sacrebleu.corpus_bleu(list(hypotheses), _streams(references), lowercase=lowercase).score)


def _tokenize_13a(text: str, lowercase: bool) -> list[str]:
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()(text.lower() if lowercase else text).split()


def nist(hypotheses: Sequence[str], references: Sequence[Sequence[str]], lowercase: bool = False) -> float:
    """Corpus NIST (n=5, nltk) on 13a-tokenized text, every reference of each source."""
    from nltk.translate.nist_score import corpus_nist

    _check_lengths(hypotheses, references)
    hyps = [_tokenize_13a(h, lowercase) for h in hypotheses]
    refs = [[_tokenize_13a(r, lowercase) for r in rs] for rs in references]
    return float(corpus_nist(refs, hyps, n=5))


def ter(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus TER (sacreBLEU's tercom reimplementation; lower is better), every reference of each source."""
    from sacrebleu.metrics import TER

    _check_lengths(hypotheses, references)
    return float(TER().corpus_score(list(hypotheses), _streams(references)).score)


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


def java_available() -> bool:
    return shutil.which("java") is not None


def _require_java(metric: str) -> None:
    if not java_available():
        raise MetricUnavailable(f"eval.metrics has {metric!r}, which runs on Java (pycocoevalcap's PTB tokenizer and "
                                "METEOR 1.5 jar), but no `java` is on PATH; install a JRE or drop the metric.")


def nltk_wordnet_available() -> bool:
    """NLTK's own METEOR needs the WordNet corpus, which `nltk.download` fetches from the internet."""
    try:
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
        return True
    except LookupError:
        return False


def _coco_inputs(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[dict, dict]:
    """PTB-tokenized (lowercased, punctuation removed) references and hypotheses, as COCOEvalCap feeds them."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    _check_lengths(hypotheses, references)
    tokenizer = PTBTokenizer()
    refs = tokenizer.tokenize({i: [{"caption": r} for r in rs] for i, rs in enumerate(references)})
    hyps = tokenizer.tokenize({i: [{"caption": h}] for i, h in enumerate(hypotheses)})
    return refs, hyps


@functools.cache
def _meteor_scorer():
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor()


def coco_scores(names: Sequence[str], hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """METEOR / ROUGE-L / CIDEr (pycocoevalcap, as the E2E challenge's script computes them) x 100 except CIDEr."""
    for name in names:
        _require_java(name)
    refs, hyps = _coco_inputs(hypotheses, references)
    # METEOR 1.5 hangs on an empty hypothesis; an empty output scores 0 against anything anyway.
    hyps = {i: [h[0] if h[0].strip() else "-"] for i, h in hyps.items()}
    out = {}
    for name in names:
        if name == "meteor":
            out["meteor"] = float(_meteor_scorer().compute_score(refs, hyps)[0]) * 100
        elif name == "rouge_l":
            from pycocoevalcap.rouge.rouge import Rouge

            out["rouge_l"] = float(Rouge().compute_score(refs, hyps)[0]) * 100
        elif name == "cider":
            from pycocoevalcap.cider.cider import Cider

            out["cider"] = float(Cider().compute_score(refs, hyps)[0])
    return out


def compute(names: Sequence[str], hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """The named metrics or groups as a flat dict (`bleu`, `nist`, `meteor`, `rouge_l`, `cider`, `ter`, `rouge1`...)."""
    wanted: list[str] = []
    for name in names:
        if name not in METRICS:
            raise ValueError(f"eval.metrics has {name!r}; choose from {METRICS}.")
        wanted.extend(GROUPS.get(name, (name,)))
    out: dict[str, float] = {}
    coco = []
    for name in dict.fromkeys(wanted):
        if name in ("bleu", "bleu_lc"):
            out[name] = bleu(hypotheses, references, lowercase=name == "bleu_lc")
        elif name in ("nist", "nist_lc"):
            out[name] = nist(hypotheses, references, lowercase=name == "nist_lc")
        elif name == "ter":
            out["ter"] = ter(hypotheses, references)
        elif name == "rouge":
            out.update(rouge(hypotheses, references))
        else:
            coco.append(name)
    if coco:
        out.update(coco_scores(coco, hypotheses, references))
    return out
