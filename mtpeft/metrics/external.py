"""Any Hugging Face ``evaluate`` metric as a corpus metric: ``evaluate:<name or local path>[:<key>]``.

* ``evaluate:sacrebleu`` runs ``evaluate.load("sacrebleu")`` once per process (when the module checks its
  metrics before training, else at the first update) and reports the first numeric value of its result;
  ``evaluate:rouge:rougeL`` reports ``result["rougeL"]``; ``evaluate:/path/to/metric_dir:score`` loads a
  local metric script (offline-safe).
* Every mtpeft score is a fraction in [0, 1]. Metrics that report percentages (sacrebleu, chrf, squad,
  squad_v2) are divided by 100; for any other percentage metric append ``%`` to the key
  (``evaluate:./my_metric:accuracy%``). A value outside [0, 1] is an error naming the key.
* Predictions are the stripped generations; each reference is the record's gold text (``meta["answers"]``
  / ``answer`` / ``output``), a plain string when every record has one reference, else a list per record.
* Logged as ``<split>/<task>/evaluate:<last path part>[:<key>]`` (no ``/`` inside the metric part).
* Corpus metric: the texts are kept until ``compute``. To sync them across processes they are stored as
  UTF-8 code units in tensors (``texts``) with one length per example (``sizes``), both concatenated.
* Offline (``HF_EVALUATE_OFFLINE=1``) only local paths and metrics already in the ``evaluate`` cache
  load; anything else fails at once with a message saying how to make the metric available.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics.utilities import dim_zero_cat

from mtpeft.data.records import Record
from mtpeft.metrics.base import TextMetric, check_lengths, clean
from mtpeft.metrics.overlap import references

PREFIX = "evaluate:"
PERCENT_METRICS = frozenset({"sacrebleu", "chrf", "squad", "squad_v2"})
"""``evaluate`` metrics whose values are percentages (divided by 100)."""
_KEY = re.compile(r"[A-Za-z_][\w.-]*%?")


class MetricNotAvailableError(RuntimeError):
    """An ``evaluate`` metric could not be loaded (offline and not cached, unknown, or no ``evaluate``)."""


@functools.cache
def load_evaluate_metric(path: str) -> Any:
    """``evaluate.load(path)``, once per process; a failure says how to make the metric available."""
    fix = (
        "Offline (HF_EVALUATE_OFFLINE=1 / HF_HUB_OFFLINE=1) only metrics already in the evaluate cache or a "
        "local metric directory/script load: run evaluate.load once with network, or pass a local path "
        "(evaluate:/path/to/metric_dir), or use a built-in metric (rouge1, rouge2, rougeL, bleu, exact_match, f1)."
    )
    try:
        import evaluate
    except ImportError as err:
        raise MetricNotAvailableError(
            f"metric '{PREFIX}{path}' needs the evaluate package: pip install evaluate"
        ) from err
    try:
        return evaluate.load(path)
    except Exception as err:  # evaluate raises many types (FileNotFoundError, ConnectionError, ...)
        raise MetricNotAvailableError(
            f"metric '{PREFIX}{path}': evaluate.load({path!r}) failed ({type(err).__name__}: {err}). {fix}"
        ) from err


def parse_spec(spec: str) -> tuple[str, str | None, bool]:
    """``evaluate:<path>[:<key>[%]]`` -> (path, key or None, value is a percentage)."""
    body = spec.removeprefix(PREFIX)
    head, sep, tail = body.rpartition(":")
    path, key = (head, tail) if sep and head and _KEY.fullmatch(tail) else (body, "")
    if not path:
        raise ValueError(
            f"metric {spec!r}: name the evaluate metric, e.g. evaluate:sacrebleu or evaluate:rouge:rougeL"
        )
    percent = key.endswith("%") or path.rstrip("/").rsplit("/", 1)[-1].removesuffix(".py") in PERCENT_METRICS
    return path, key.removesuffix("%") or None, percent


def _encode(text: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=dtype, device=device)


class EvaluateMetric(TextMetric):
    """A corpus metric backed by ``evaluate.load(path).compute(predictions=..., references=...)``."""

    def __init__(self, spec: str) -> None:
        super().__init__()
        self.spec = spec
        self.path, self.key, self.percent = parse_spec(spec)
        # logged name: a local path shortened to its last part, so keys stay <split>/<task>/<metric>
        base = self.path.rstrip("/").rsplit("/", 1)[-1].removesuffix(".py")
        self.name = f"{PREFIX}{base}" + (f":{self.key}" if self.key else "")
        self.add_state("texts", [], dist_reduce_fx="cat")
        self.add_state("sizes", [], dist_reduce_fx="cat")

    def update(self, predictions: Sequence[str], records: Sequence[Record]) -> None:
        """Keep the batch's prediction/reference pairs (loads the metric on first use, to fail early)."""
        check_lengths(self.name, predictions, records)
        self.load()
        for prediction, record in zip(predictions, records, strict=True):
            encoded = _encode(json.dumps([clean(prediction), references(record)]), self.dtype, self.device)
            self.texts.append(encoded)
            self.sizes.append(torch.tensor([len(encoded)], dtype=self.dtype, device=self.device))

    def load(self) -> Any:
        """The ``evaluate`` module (loaded once per process)."""
        return load_evaluate_metric(self.path)

    def pairs(self) -> list[tuple[str, list[str]]]:
        """Every (prediction, references) pair seen, in order (states are lists, or tensors once synced)."""
        if isinstance(self.sizes, list) and not self.sizes:
            return []
        data = bytes(dim_zero_cat(self.texts).to(torch.uint8).cpu().tolist())
        pairs, start = [], 0
        for size in dim_zero_cat(self.sizes).long().tolist():
            prediction, refs = json.loads(data[start : start + size].decode("utf-8"))
            pairs.append((prediction, refs))
            start += size
        return pairs

    def compute(self) -> torch.Tensor:
        """The metric over everything seen (0.0 when nothing was)."""
        pairs = self.pairs()
        if not pairs:
            return torch.tensor(0.0, dtype=torch.float64)
        refs = [r for _, r in pairs]
        flat = all(len(r) == 1 for r in refs)
        result = self.load().compute(
            predictions=[p for p, _ in pairs], references=[r[0] for r in refs] if flat else refs
        )
        return torch.tensor(self.pick(result), dtype=torch.float64)

    def pick(self, result: dict[str, Any]) -> float:
        """The reported value of an ``evaluate`` result as a fraction in [0, 1]."""
        numeric = {k: v for k, v in result.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        if self.key is not None:
            if self.key not in numeric:
                raise ValueError(
                    f"metric {self.name!r}: result has no numeric key {self.key!r}; keys: {sorted(numeric)}"
                )
            key = self.key
        elif numeric:
            key = next(iter(numeric))
        else:
            raise ValueError(
                f"metric {self.name!r}: result {result!r} has no numeric value; name one: {PREFIX}{self.path}:<key>"
            )
        value = float(numeric[key]) / (100.0 if self.percent else 1.0)
        if not 0.0 <= value <= 1.0:
            raise ValueError(
                f"metric {self.name!r}: {key!r} = {numeric[key]} is not a fraction in [0, 1]; if it is a percentage "
                f"write {PREFIX}{self.path}:{key}%, else pick another key ({sorted(numeric)})"
            )
        return value
