"""``method=none``: the frozen base model, for the zero-shot row of every results table."""

from __future__ import annotations

from mtpeft.adapters.base import AdaptedModel, MethodConfig
from mtpeft.adapters.registry import register_method
from mtpeft.utils.schema import config_dataclass


@config_dataclass
class NoneConfig(MethodConfig):
    """No options: nothing is trained."""


@register_method("none")
class NoAdapter(AdaptedModel):
    """Leaves the base model untouched; zero trainable parameters, so training is skipped."""

    config_class = NoneConfig
    bench_variants = {}  # nothing to train, so no training step to time

    def adapt(self) -> None:
        """Nothing to attach."""

    def expected_trainable_parameters(self) -> int:
        return 0
