"""Validation shared by the generator configs."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def check_probabilities(config: Any, names: Iterable[str]) -> None:
    """Each named field of ``config`` is None (= derived from ``conflict``) or a probability in [0, 1]."""
    for name in names:
        value = getattr(config, name)
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"{type(config).__name__}.{name}={value} must be a probability in [0, 1]")
