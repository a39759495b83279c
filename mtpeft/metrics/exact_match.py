"""Exact match and token F1 with the official SQuAD v1.1 answer normalisation.

``normalize_answer``: lower-case, drop punctuation, drop the articles ``a``/``an``/``the``, collapse
whitespace (``evaluate-v1.1.py``). With several gold answers (``meta["answers"]``) a prediction gets its
best score over them, as in the SQuAD script. An empty normalised gold and prediction count as a match.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

from mtpeft.data.records import Record
from mtpeft.metrics.base import PerExampleMetric, check_lengths, golds

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, gold: str) -> float:
    """Harmonic mean of token precision and recall after normalisation (bag of tokens)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


class ExactMatch(PerExampleMetric):
    """1.0 when the normalised prediction equals a normalised gold answer, else 0.0."""

    name = "exact_match"

    def score(self, predictions: Sequence[str], records: Sequence[Record]) -> list[float]:
        check_lengths(self.name, predictions, records)
        return [
            max(float(normalize_answer(p) == normalize_answer(g)) for g in golds(r))
            for p, r in zip(predictions, records, strict=True)
        ]


class TokenF1(PerExampleMetric):
    """SQuAD token F1, best over the gold answers."""

    name = "f1"

    def score(self, predictions: Sequence[str], records: Sequence[Record]) -> list[float]:
        check_lengths(self.name, predictions, records)
        return [max(token_f1(p, g) for g in golds(r)) for p, r in zip(predictions, records, strict=True)]
