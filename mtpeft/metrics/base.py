"""The metric interface: score decoded generations against their records.

Every metric has ``compute(predictions, records) -> float`` in [0, 1] for a whole task. Per-example
metrics (exact match, F1, numeric, multiple choice, ROUGE, pass@k) derive from ``PerExampleMetric``
and also expose ``score(...) -> list[float]``, one value per record, whose mean is ``compute``.
Corpus metrics (BLEU, ``evaluate:<name>``) only have ``compute``. Under DDP the module gathers every
rank's predictions before computing, so each metric sees the whole split on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from mtpeft.data.records import Record


class Metric(Protocol):
    """``predictions[i]`` is the decoded generation (special tokens skipped) for ``records[i]``."""

    name: str
    uses_samples: bool
    """True: ``predictions[i]`` is the list of all sampled completions of record i (pass@k)."""

    def compute(self, predictions: Sequence[Any], records: Sequence[Record]) -> float:
        """The task-level value in [0, 1]."""
        ...


class PerExampleMetric:
    """A metric that is the mean of one score per record; subclasses implement ``score``."""

    name = "per_example"
    uses_samples = False

    def score(self, predictions: Sequence[Any], records: Sequence[Record]) -> list[float]:
        """One score in [0, 1] per prediction."""
        raise NotImplementedError(f"{type(self).__name__} must implement score()")

    def compute(self, predictions: Sequence[Any], records: Sequence[Record]) -> float:
        """Mean of ``score`` (0.0 for no records)."""
        values = self.score(predictions, records)
        return sum(values) / len(values) if values else 0.0


def clean(prediction: str) -> str:
    """The shared post-processing of a generation: strip surrounding whitespace."""
    return prediction.strip()


def golds(record: Record) -> list[str]:
    """Acceptable answers: ``meta["answers"]`` (e.g. every SQuAD annotation) when given, else ``answer``."""
    answers = record["meta"].get("answers")
    if answers:
        return [str(a) for a in answers]
    return [record["answer"]]


def check_lengths(name: str, predictions: Sequence[Any], records: Sequence[Record]) -> None:
    """Predictions and records must pair up one to one."""
    if len(predictions) != len(records):
        raise ValueError(
            f"metric {name!r}: got {len(predictions)} predictions for {len(records)} records; pass one per record"
        )
