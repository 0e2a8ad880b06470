"""Metrics of generated answers against their labels: exact match, normalised accuracy, BLEU, ROUGE.

``exact_match`` compares the texts as they are (outer whitespace aside). ``accuracy`` compares
them through :func:`normalize_answer`, the short-answer normaliser: case, punctuation, articles
and spacing do not count ("The circle." equals "circle"), and where the label is a choice letter
("B", "(B)", "B.") the prediction's choice letter is read from its usual spellings ("B",
"(B) a square", "Answer: B", "The answer is B."). BLEU is sacrebleu's corpus BLEU (its 13a
tokeniser, its ``zh`` tokeniser where the labels are Chinese); ROUGE-1/2/L are the mean
F-measures of Google's ``rouge-score``. Scores are percentages, as both libraries report them.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from typing import Any

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation + "。，、！？：；（）")
#: a label that is a choice letter: "B", "(B)", "B.", "B)"
_CHOICE_LABEL = re.compile(r"^\s*\(?([A-Za-z])\s*[).:]?\s*$")
#: where a prediction states its choice letter, tried in order
_CHOICE_PATTERNS = (
    re.compile(r"^\s*(?:\(([A-Za-z])\)|([A-Z])(?:[).:]|\s*$))"),  # "B", "B.", "(b) ...", "B: ..." (not "A cat")
    re.compile(r"\banswer\s*(?:is|:)?\s*\(?([A-Z])\b", re.IGNORECASE),  # "Answer: B", "the answer is (B)"
    re.compile(r"\boption\s*\(?([A-Z])\b", re.IGNORECASE),  # "option B"
)
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")


def choice_letter(text: str) -> str | None:
    """The choice letter ``text`` states (see the module), upper case, or None."""
    for pattern in _CHOICE_PATTERNS:
        match = pattern.search(text)
        if match:
            return next(g for g in match.groups() if g).upper()
    return None


def normalize_answer(text: str) -> str:
    """Lower case, punctuation and the articles a / an / the removed, spaces collapsed."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def answers_match(prediction: str, label: str) -> bool:
    """Whether ``prediction`` gives the answer ``label`` gives, through the normaliser: for a
    choice-letter label, the prediction's choice letter; else the normalised texts."""
    choice = _CHOICE_LABEL.match(label)
    if choice:
        return choice_letter(prediction) == choice.group(1).upper()
    return normalize_answer(prediction) == normalize_answer(label)


def _bleu(predictions: Sequence[str], labels: Sequence[str]) -> float:
    import sacrebleu

    tokenize = "zh" if any(_CJK.search(label) for label in labels) else "13a"
    return float(sacrebleu.corpus_bleu(list(predictions), [list(labels)], tokenize=tokenize).score)


def _rouge(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measures. Text in a script without spaces between words (Chinese,
    Japanese) is split into characters first: ``rouge-score``'s tokeniser keeps only ASCII
    letters and digits."""
    from rouge_score import rouge_scorer

    def words(text: str) -> str:
        return " ".join(_CJK.sub(lambda m: f" {ord(m.group(0))} ", text).split())

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for prediction, label in zip(predictions, labels):
        scores = scorer.score(words(label), words(prediction))
        for key in totals:
            totals[key] += scores[key].fmeasure
    n = max(1, len(predictions))
    return {"rouge-1": 100 * totals["rouge1"] / n, "rouge-2": 100 * totals["rouge2"] / n,
            "rouge-l": 100 * totals["rougeL"] / n}


def compute_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """``exact_match`` and ``accuracy`` (fractions in [0, 1]), ``bleu-4`` and ``rouge-1/2/l``
    (percentages) of ``predictions`` against ``labels`` (equal lengths); ``labelled_samples``
    is their count. No pair: the count alone."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    out: dict[str, Any] = {"labelled_samples": len(labels)}
    if not labels:
        return out
    n = len(labels)
    out["exact_match"] = sum(p.strip() == label.strip() for p, label in zip(predictions, labels)) / n
    out["accuracy"] = sum(answers_match(p, label) for p, label in zip(predictions, labels)) / n
    out["bleu-4"] = _bleu(predictions, labels)
    out.update(_rouge(predictions, labels))
    return out
