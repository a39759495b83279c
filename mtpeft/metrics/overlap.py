"""Text-overlap metrics for free-form tasks (HyCAM reports BLEU and ROUGE), from torchmetrics.

* ``rouge1`` / ``rouge2`` / ``rougeL``: per-example ROUGE F-measure (torchmetrics' default tokeniser:
  lower-case alphanumeric tokens, no stemming), averaged over the task, best over ``meta["answers"]``.
* ``bleu``: corpus-level SacreBLEU (4-grams, ``13a`` tokenisation, brevity penalty, no smoothing) over all
  predictions of the task, as a fraction in [0, 1]; references are the gold answers.

The reference is ``answer`` (falling back to ``output`` when ``answer`` is empty). Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence

from torchmetrics.functional.text import rouge_score, sacre_bleu_score

from mtpeft.data.records import Record
from mtpeft.metrics.base import PerExampleMetric, check_lengths, clean, golds

ROUGE_KEYS: tuple[str, ...] = ("rouge1", "rouge2", "rougeL")


def references(record: Record) -> list[str]:
    """Gold texts of a free-form record (``output`` when no ``answer`` is set)."""
    found = [g for g in golds(record) if g.strip()]
    return found or [record["output"]]


class Rouge(PerExampleMetric):
    """ROUGE-N / ROUGE-L F-measure per example."""

    uses_samples = False

    def __init__(self, key: str) -> None:
        if key not in ROUGE_KEYS:
            raise ValueError(f"unknown ROUGE variant {key!r}; valid: {', '.join(ROUGE_KEYS)}")
        self.name = self.key = key

    def score(self, predictions: Sequence[str], records: Sequence[Record]) -> list[float]:
        check_lengths(self.name, predictions, records)
        return [self._one(clean(p), references(r)) for p, r in zip(predictions, records, strict=True)]

    def _one(self, prediction: str, refs: list[str]) -> float:
        result = rouge_score(prediction, refs, rouge_keys=self.key, accumulate="best")
        return float(result[f"{self.key}_fmeasure"])


class Bleu:
    """Corpus SacreBLEU / 100."""

    name = "bleu"
    uses_samples = False

    def compute(self, predictions: Sequence[str], records: Sequence[Record]) -> float:
        check_lengths(self.name, predictions, records)
        if not records:
            return 0.0
        refs = [references(r) for r in records]
        width = max(len(r) for r in refs)
        padded = [r + [r[0]] * (width - len(r)) for r in refs]  # torchmetrics needs equal reference counts
        return float(sacre_bleu_score([clean(p) for p in predictions], padded, tokenize="13a"))
