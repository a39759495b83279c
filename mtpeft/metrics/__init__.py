"""Metric registry: ``get_metric(name)`` -> a fresh ``torchmetrics`` metric for one (split, task).

Usage (what ``MultiTaskModule`` does per eval epoch)::

    metric = get_metric("f1")
    for predictions, records in batches:
        metric.update(predictions, records)
    value = float(metric.compute())  # in [0, 1]; under DDP, over every process's examples

Per-example metrics also have ``score(predictions, records) -> list[float]``. Metrics score decoded
text only (special tokens already skipped; each metric strips whitespace), so they work the same for
the tiny model and for hub models. Names: ``exact_match`` and ``f1`` (SQuAD normalisation),
``numeric_match``, ``mc_accuracy``, ``rouge1`` / ``rouge2`` / ``rougeL``, ``bleu``, ``pass@<k>`` (any k;
the unbiased estimator over ``evaluation.num_samples`` samples) and ``evaluate:<name or path>[:<key>]``
for any Hugging Face ``evaluate`` metric.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from types import MappingProxyType

from mtpeft.metrics.base import PerExampleMetric, TextMetric
from mtpeft.metrics.choice import MultipleChoiceAccuracy
from mtpeft.metrics.exact_match import ExactMatch, TokenF1
from mtpeft.metrics.external import PREFIX as EVALUATE_PREFIX
from mtpeft.metrics.external import EvaluateMetric
from mtpeft.metrics.numeric import NumericMatch
from mtpeft.metrics.overlap import Bleu, Rouge
from mtpeft.metrics.pass_at_k import PassAtK

METRICS: MappingProxyType[str, Callable[[], TextMetric]] = MappingProxyType(
    {
        "exact_match": ExactMatch,
        "f1": TokenF1,
        "numeric_match": NumericMatch,
        "mc_accuracy": MultipleChoiceAccuracy,
        "rouge1": lambda: Rouge("rouge1"),
        "rouge2": lambda: Rouge("rouge2"),
        "rougeL": lambda: Rouge("rougeL"),
        "bleu": Bleu,
    }
)
"""Read-only registry of fixed names -> factory (plus the ``pass@<k>`` and ``evaluate:`` patterns)."""

PASS_AT = re.compile(r"pass@([1-9]\d*)")


def available_metrics() -> list[str]:
    """Names accepted by ``get_metric`` (patterns shown as ``pass@<k>`` and ``evaluate:<name>``)."""
    return sorted([*METRICS, "pass@<k>", f"{EVALUATE_PREFIX}<name>"])


def get_metric(name: str) -> TextMetric:
    """A fresh metric object by name; an unknown name raises ValueError listing the valid ones."""
    if name in METRICS:
        return METRICS[name]()
    match = PASS_AT.fullmatch(name)
    if match:
        return PassAtK(int(match.group(1)))
    if name.startswith(EVALUATE_PREFIX):
        return EvaluateMetric(name)
    raise ValueError(f"unknown metric {name!r}; valid metrics: {', '.join(available_metrics())}")


def samples_needed(name: str) -> int:
    """Sampled completions per prompt that metric ``name`` needs (k for ``pass@k``, else 1)."""
    match = PASS_AT.fullmatch(name)
    return int(match.group(1)) if match else 1


__all__ = ["PerExampleMetric", "TextMetric", "available_metrics", "get_metric", "samples_needed"]
