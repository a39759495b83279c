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

from mtpeft.metrics.base import PerExampleMetric, TextMetric
from mtpeft.metrics.choice import MultipleChoiceAccuracy
from mtpeft.metrics.exact_match import ExactMatch, TokenF1
from mtpeft.metrics.external import PREFIX as EVALUATE_PREFIX
from mtpeft.metrics.external import EvaluateMetric
from mtpeft.metrics.numeric import NumericMatch
from mtpeft.metrics.overlap import Bleu, Rouge
from mtpeft.metrics.pass_at_k import PassAtK
from mtpeft.utils.registry import Registry

PASS_AT = re.compile(r"pass@([1-9]\d*)")

METRICS: Registry[Callable[[], TextMetric]] = Registry(
    "metric", hints=("pass@<k>", f"{EVALUATE_PREFIX}<name>")
)
"""Fixed names -> factory; ``get_metric`` resolves the ``pass@<k>`` and ``evaluate:`` patterns itself."""


def register_metric(name: str, factory: Callable[[], TextMetric]) -> Callable[[], TextMetric]:
    """Add a metric under ``name`` (``factory()`` returns a fresh metric); a taken name is an error."""
    return METRICS.register(name, factory)


register_metric("exact_match", ExactMatch)
register_metric("f1", TokenF1)
register_metric("numeric_match", NumericMatch)
register_metric("mc_accuracy", MultipleChoiceAccuracy)
register_metric("rouge1", lambda: Rouge("rouge1"))
register_metric("rouge2", lambda: Rouge("rouge2"))
register_metric("rougeL", lambda: Rouge("rougeL"))
register_metric("bleu", Bleu)


def available_metrics() -> list[str]:
    """Names accepted by ``get_metric`` (patterns shown as ``pass@<k>`` and ``evaluate:<name>``)."""
    return METRICS.valid_names()


def get_metric(name: str) -> TextMetric:
    """A fresh metric object by name; an unknown name raises `UnknownNameError` listing the valid ones."""
    if name in METRICS:
        return METRICS.get(name)()
    match = PASS_AT.fullmatch(name)
    if match:
        return PassAtK(int(match.group(1)))
    if name.startswith(EVALUATE_PREFIX):
        return EvaluateMetric(name)
    raise METRICS.unknown(name)


def samples_needed(name: str) -> int:
    """Sampled completions per prompt that metric ``name`` needs (k for ``pass@k``, else 1)."""
    match = PASS_AT.fullmatch(name)
    return int(match.group(1)) if match else 1


__all__ = [
    "PerExampleMetric",
    "TextMetric",
    "available_metrics",
    "get_metric",
    "register_metric",
    "samples_needed",
]
