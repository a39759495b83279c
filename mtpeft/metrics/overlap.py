"""Text-overlap metrics for free-form tasks (HyCAM reports BLEU and ROUGE), from ``torchmetrics.text``.

* ``rouge1`` / ``rouge2`` / ``rougeL``: ROUGE F-measure per example, best over the references, averaged
  over the task: the number ``torchmetrics.text.ROUGEScore(rouge_keys=key, accumulate="best")`` reports
  (its default tokeniser: lower-case, non-alphanumerics become spaces, no stemming). Computed per
  example with torchmetrics' ``rouge_score`` and kept as a sum and a count, so the state syncs as two
  numbers instead of ROUGEScore's per-sentence lists.
* ``bleu``: corpus-level SacreBLEU (``torchmetrics.text.SacreBLEUScore``: 4-grams, uniform weights,
  ``13a`` tokenisation, case-sensitive, brevity penalty, no smoothing) over all predictions of the
  task, as a fraction in [0, 1]. Its states are n-gram and length counts, summed across processes.

The references are the gold answers (``meta["answers"]``, else ``answer``), or ``output`` when the
record has no answer (Alpaca-style free-form records). Nothing is downloaded: ROUGE-Lsum and stemming,
the parts of torchmetrics that need ``nltk`` data, are not used.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics.functional.text import rouge_score
from torchmetrics.text import SacreBLEUScore

from mtpeft.data.records import Record
from mtpeft.metrics.base import PerExampleMetric, TextMetric, check_lengths, clean, golds

ROUGE_KEYS: tuple[str, ...] = ("rouge1", "rouge2", "rougeL")


def references(record: Record) -> list[str]:
    """Gold texts of a free-form record (``output`` when no ``answer`` is set)."""
    found = [g for g in golds(record) if g.strip()]
    return found or [record["output"]]


class Rouge(PerExampleMetric):
    """ROUGE-N / ROUGE-L F-measure per example."""

    def __init__(self, key: str) -> None:
        if key not in ROUGE_KEYS:
            raise ValueError(f"unknown ROUGE variant {key!r}; valid: {', '.join(ROUGE_KEYS)}")
        super().__init__()
        self.name = self.key = key

    def score(self, predictions: Sequence[str], records: Sequence[Record]) -> list[float]:
        check_lengths(self.name, predictions, records)
        return [self._one(clean(p), references(r)) for p, r in zip(predictions, records, strict=True)]

    def _one(self, prediction: str, refs: list[str]) -> float:
        result = rouge_score(prediction, refs, rouge_keys=self.key, accumulate="best")
        return float(result[f"{self.key}_fmeasure"])


class Bleu(TextMetric, SacreBLEUScore):
    """Corpus SacreBLEU / 100 (float64 counts)."""

    name = "bleu"

    def __init__(self) -> None:
        super().__init__(n_gram=4, smooth=False, tokenize="13a", lowercase=False)
        self.set_dtype(torch.float64)

    def update(self, predictions: Sequence[str], records: Sequence[Record]) -> None:  # type: ignore[override]
        """Add one batch's n-gram statistics."""
        check_lengths(self.name, predictions, records)
        SacreBLEUScore.update(self, [clean(p) for p in predictions], [references(r) for r in records])

    def compute(self) -> torch.Tensor:
        """BLEU over everything seen (0.0 when nothing was)."""
        return SacreBLEUScore.compute(self).to(torch.float64)
