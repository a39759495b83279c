"""Exact match (extractive QA): the stripped prediction must equal the stripped gold answer."""

from __future__ import annotations

from collections.abc import Sequence

from mtpeft.data.records import Record
from mtpeft.metrics.base import check_lengths, clean


class ExactMatch:
    """1.0 when ``prediction.strip() == answer.strip()``, else 0.0 (case- and space-sensitive inside)."""

    name = "exact_match"

    def score(self, predictions: Sequence[str], records: Sequence[Record]) -> list[float]:
        """One 0/1 score per prediction."""
        check_lengths(self.name, predictions, records)
        return [float(clean(p) == r["answer"].strip()) for p, r in zip(predictions, records, strict=True)]
