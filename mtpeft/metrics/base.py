"""The metric interface: score decoded generations against records, one value in [0, 1] each."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from mtpeft.data.records import Record


class Metric(Protocol):
    """Scores text. ``predictions[i]`` is the decoded generation (special tokens skipped) for ``records[i]``."""

    name: str

    def score(self, predictions: Sequence[str], records: Sequence[Record]) -> list[float]:
        """One score in [0, 1] per prediction."""
        ...


def clean(prediction: str) -> str:
    """The shared post-processing of a generation: strip surrounding whitespace."""
    return prediction.strip()


def check_lengths(name: str, predictions: Sequence[str], records: Sequence[Record]) -> None:
    """Predictions and records must pair up one to one."""
    if len(predictions) != len(records):
        raise ValueError(
            f"metric {name!r}: got {len(predictions)} predictions for {len(records)} records; pass one per record"
        )
