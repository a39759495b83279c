"""Metric registry: ``get_metric(name).compute(predictions, records) -> float`` in [0, 1].

Metrics score decoded text only (special tokens already skipped; each metric strips whitespace), so
they work the same for the tiny model and for hub models. Names: ``exact_match`` and ``f1`` (SQuAD
normalisation), ``numeric_match``, ``mc_accuracy``, ``rouge1`` / ``rouge2`` / ``rougeL``, ``bleu``,
``pass@<k>`` (any k; the unbiased estimator over ``evaluation.num_samples`` samples) and
``evaluate:<name or path>[:<key>]`` for any Hugging Face ``evaluate`` metric.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from types import MappingProxyType

from mtpeft.metrics.base import Metric
from mtpeft.metrics.choice import MultipleChoiceAccuracy
from mtpeft.metrics.exact_match import ExactMatch, TokenF1
from mtpeft.metrics.external import PREFIX as EVALUATE_PREFIX
from mtpeft.metrics.external import EvaluateMetric
from mtpeft.metrics.numeric import NumericMatch
from mtpeft.metrics.overlap import Bleu, Rouge
from mtpeft.metrics.pass_at_k import PassAtK

METRICS: MappingProxyType[str, Callable[[], Metric]] = MappingProxyType(
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


def get_metric(name: str) -> Metric:
    """A fresh metric object by name; an unknown name raises ValueError listing the valid ones."""
    if name in METRICS:
        return METRICS[name]()
    match = PASS_AT.fullmatch(name)
    if match:
        return PassAtK(int(match.group(1)))
    if name.startswith(EVALUATE_PREFIX):
        return EvaluateMetric(name)
    raise ValueError(f"unknown metric {name!r}; valid metrics: {', '.join(available_metrics())}")


__all__ = ["Metric", "available_metrics", "get_metric"]
