"""The metric interface: ``torchmetrics`` metrics that score decoded generations against their records.

A metric object scores one task of one split. The module creates it fresh at the start of each
evaluation epoch, calls ``update(predictions, records)`` once per eval batch and ``compute()`` at the
end; ``compute`` returns a 0-d float tensor in [0, 1] and, under DDP, first merges every process's state
(torchmetrics' sync), so every rank reports the score of the whole split.

* ``PerExampleMetric`` (exact match, F1, numeric, multiple choice, ROUGE, pass@k): one score per record
  from the public ``score(predictions, records) -> list[float]``; the states are their sum and count.
* Corpus metrics (BLEU, ``evaluate:<name>``) keep what the corpus statistic needs (n-gram counts, or
  the texts themselves) and compute it over everything at the end.

``predictions[i]`` is the decoded generation for ``records[i]`` (special tokens skipped); for a metric
with ``uses_samples`` (pass@k) it is the list of every sampled completion of record i.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import Metric

from mtpeft.data.records import Record


class TextMetric(Metric):
    """Base of every mtpeft metric: ``update(predictions, records)``, ``compute() -> tensor`` in [0, 1]."""

    name: str = ""
    """Registry name, the ``<metric>`` in ``<split>/<task>/<metric>``."""
    uses_samples: bool = False
    """True: ``predictions[i]`` is the list of all sampled completions of record i (pass@k)."""
    is_differentiable = False
    higher_is_better = True
    full_state_update = False


class PerExampleMetric(TextMetric):
    """A metric that is the mean of one score per record; subclasses implement ``score``.

    States (``total``, ``count``) are float64 sums, so shards merge exactly: the metric over the union
    of two shards equals their merged states. ``last_scores`` holds the per-example scores of the latest
    ``update`` (not a state: never synced), which `mtpeft.metrics.tracker.EvalMetrics` records per example
    for the bootstrap statistics of `mtpeft.results.stats`.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.last_scores: list[float] = []
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    @abstractmethod
    def score(self, predictions: Sequence[Any], records: Sequence[Record]) -> list[float]:
        """One score in [0, 1] per prediction (does not touch the states)."""

    def update(self, predictions: Sequence[Any], records: Sequence[Record]) -> None:
        """Add one batch's scores; they stay readable as ``last_scores`` (per-example hook)."""
        values = self.score(predictions, records)
        self.last_scores = [float(v) for v in values]
        self.total += sum(values)
        self.count += len(values)

    def compute(self) -> torch.Tensor:
        """Mean score (0.0 when nothing was scored)."""
        return self.total / self.count if self.count > 0 else torch.zeros_like(self.total)


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
