"""Metric registry: ``get_metric(name).score(predictions, records) -> list[float]`` (one value in [0, 1] each).

Metrics score decoded text only (special tokens already skipped; each metric strips whitespace),
so they work the same for the tiny model and for hub models.
"""

from __future__ import annotations

from collections.abc import Callable
from types import MappingProxyType

from mtpeft.metrics.base import Metric
from mtpeft.metrics.code_exec import PassAtOne
from mtpeft.metrics.exact_match import ExactMatch
from mtpeft.metrics.numeric import NumericMatch

METRICS: MappingProxyType[str, Callable[[], Metric]] = MappingProxyType(
    {"exact_match": ExactMatch, "numeric_match": NumericMatch, "pass@1": PassAtOne}
)
"""Read-only registry: metric name -> factory."""


def available_metrics() -> list[str]:
    """Names accepted by ``get_metric``."""
    return sorted(METRICS)


def get_metric(name: str) -> Metric:
    """A fresh metric object by name; an unknown name raises ValueError listing the valid ones."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; valid metrics: {', '.join(available_metrics())}")
    return METRICS[name]()


__all__ = ["Metric", "available_metrics", "get_metric"]
