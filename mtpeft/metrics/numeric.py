"""Numeric answer accuracy (GSM8K-style reasoning).

The predicted answer is the number after the last ``####`` (the GSM8K convention; the first number
there if more text follows), else the last number anywhere in the prediction. It is compared with the
gold ``answer`` as a number: thousands separators are ignored, ``20``, ``20.0``, ``+20`` and ``20.`` are
equal, ``-5`` is negative five. No number scores 0; a non-numeric gold must match the text exactly.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

from mtpeft.data.records import Record
from mtpeft.metrics.base import PerExampleMetric, check_lengths, clean

MARKER = "####"
NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
"""A number with optional sign, thousands separators and decimals."""


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
    """The answer text: after the last ``####`` if there is one, else the last number; None if neither."""
    if MARKER in prediction:
        tail = prediction.rsplit(MARKER, 1)[1].strip()
        if parse_number(tail.rstrip(".")) is not None:
            return tail.rstrip(".")
        first = NUMBER.search(tail)
        return first.group(0) if first else tail
    numbers = NUMBER.findall(prediction)
    return numbers[-1] if numbers else None


class NumericMatch(PerExampleMetric):
    """1.0 when the extracted answer equals the gold ``answer`` as a number, else 0.0."""

    name = "numeric_match"

    def score(self, predictions: Sequence[str], records: Sequence[Record]) -> list[float]:
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
