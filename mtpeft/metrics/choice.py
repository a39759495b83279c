"""Multiple-choice accuracy (the commonsense_170k convention of LLM-Adapters / DoRA).

The model answers in words (``the correct answer is answer2``); the first label of the task's label set
(``meta["choices"]``, e.g. ``answer1..answer5``, ``true/false``, ``option1/option2``, ``solution1/2``,
``ending1..4``) found in the prediction is its choice, and it must equal the gold ``answer``. Without a
label set, the first token shaped like such a label (a word ending in a digit, or true/false/yes/no, or
a lone capital A-E) is taken.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from mtpeft.data.records import Record
from mtpeft.metrics.base import PerExampleMetric, check_lengths

GENERIC_LABEL = re.compile(r"\b(?:[a-z]+\d|true|false|yes|no|[A-E])\b")


def first_choice(prediction: str, choices: Sequence[str] | None) -> str | None:
    """The first label of ``choices`` (case-insensitive, whole word) in ``prediction``; None if none."""
    if choices:
        pattern = r"\b(" + "|".join(re.escape(c) for c in sorted(choices, key=len, reverse=True)) + r")\b"
        found = re.search(pattern, prediction, flags=re.IGNORECASE)
        return found.group(1).lower() if found else None
    found = GENERIC_LABEL.search(prediction)
    return found.group(0).lower() if found else None


class MultipleChoiceAccuracy(PerExampleMetric):
    """1.0 when the first label in the prediction is the gold ``answer`` (case-insensitive)."""

    name = "mc_accuracy"

    def score(self, predictions: Sequence[str], records: Sequence[Record]) -> list[float]:
        check_lengths(self.name, predictions, records)
        return [
            float(first_choice(p, r["meta"].get("choices")) == r["answer"].strip().lower())
            for p, r in zip(predictions, records, strict=True)
        ]
