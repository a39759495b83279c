"""Any Hugging Face ``evaluate`` metric as a corpus metric: ``evaluate:<name or local path>[:<result key>]``.

``evaluate:sacrebleu:score`` loads ``evaluate.load("sacrebleu")`` and reports ``result["score"]``
(divided by 100 when it is above 1, so that every mtpeft score is a fraction). Without a key the
result's single numeric value, or its first, is used. References are the gold answers
(``meta["answers"]`` / ``answer`` / ``output``). Metrics are loaded lazily at the first evaluation;
offline, a metric that is not in the local ``evaluate`` cache fails with a message saying how to get it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mtpeft.data.records import Record
from mtpeft.metrics.base import check_lengths, clean
from mtpeft.metrics.overlap import references

PREFIX = "evaluate:"


class MetricNotAvailableError(RuntimeError):
    """An ``evaluate`` metric could not be loaded (offline and not cached, or unknown)."""


class EvaluateMetric:
    """A corpus metric backed by ``evaluate.load(path)``."""

    uses_samples = False

    def __init__(self, spec: str) -> None:
        body = spec.removeprefix(PREFIX)
        path, _, key = body.partition(":") if not body.startswith(("/", ".")) else (body, "", "")
        if not path:
            raise ValueError(
                f"metric {spec!r}: name the evaluate metric, e.g. evaluate:sacrebleu or evaluate:rouge:rougeL"
            )
        self.name, self.path, self.key = spec, path, key or None
        self._module: Any = None

    def _load(self) -> Any:
        if self._module is None:
            import evaluate

            try:
                self._module = evaluate.load(self.path)
            except Exception as err:  # evaluate raises many types (FileNotFoundError, ConnectionError, ...)
                raise MetricNotAvailableError(
                    f"metric {self.name!r}: evaluate.load({self.path!r}) failed ({type(err).__name__}: {err}). "
                    "Offline (HF_EVALUATE_OFFLINE=1) only metrics already in the evaluate cache or a local "
                    "metric directory/script load: run it once with network, or pass a local path "
                    "(evaluate:/path/to/metric), or use a built-in metric (rouge1, rouge2, rougeL, bleu, f1, ...)."
                ) from err
        return self._module

    def compute(self, predictions: Sequence[str], records: Sequence[Record]) -> float:
        check_lengths(self.name, predictions, records)
        module = self._load()
        result = module.compute(
            predictions=[clean(p) for p in predictions], references=[references(r) for r in records]
        )
        return self._pick(result)

    def _pick(self, result: dict[str, Any]) -> float:
        numeric = {k: v for k, v in result.items() if isinstance(v, int | float)}
        if self.key is not None:
            if self.key not in numeric:
                raise KeyError(
                    f"metric {self.name!r}: result has no numeric key {self.key!r}; keys: {sorted(numeric)}"
                )
            value = float(numeric[self.key])
        elif numeric:
            value = float(next(iter(numeric.values())))
        else:
            raise ValueError(
                f"metric {self.name!r}: result {result!r} has no numeric value; name one: {PREFIX}{self.path}:<key>"
            )
        return value / 100.0 if value > 1.0 else value
