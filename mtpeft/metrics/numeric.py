"""Numeric answer match (reasoning): the number after the last ``####`` must equal the gold number.

GSM8K convention: the chain of thought ends in ``#### N``. The text after the last ``####``,
stripped, is compared with the gold answer as a number: thousands separators are ignored and
``20``, ``20.0`` and ``+20`` are equal; ``-5`` is negative five. No ``####``, or text that is not a
number, scores 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

from mtpeft.data.records import Record
from mtpeft.metrics.base import check_lengths, clean

MARKER = "####"


def parse_number(text: str) -> Decimal | None:
    """``text`` as a number after removing thousands separators and spaces; None when it is not one."""
    compact = text.replace(",", "").replace(" ", "").strip()
    if not compact:
        return None
    try:
        value = Decimal(compact)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def extract_answer(prediction: str) -> str | None:
    """The stripped text after the last ``####``, or None when there is no marker."""
    if MARKER not in prediction:
        return None
    return prediction.rsplit(MARKER, 1)[1].strip()


class NumericMatch:
    """1.0 when the number after the last ``####`` equals the gold ``answer``, else 0.0."""

    name = "numeric_match"

    def score(self, predictions: Sequence[str], records: Sequence[Record]) -> list[float]:
        """One 0/1 score per prediction."""
        check_lengths(self.name, predictions, records)
        return [self._one(clean(p), r["answer"]) for p, r in zip(predictions, records, strict=True)]

    @staticmethod
    def _one(prediction: str, gold: str) -> float:
        extracted = extract_answer(prediction)
        if extracted is None:
            return 0.0
        got, want = parse_number(extracted), parse_number(gold)
        if got is None or want is None:
            return float(want is None and extracted == gold.strip())
        return float(got == want)
