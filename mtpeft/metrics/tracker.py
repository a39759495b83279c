"""One evaluation epoch's bookkeeping: a fresh metric object per (task, metric) plus the per-task LM loss.

``MultiTaskModule`` builds an ``EvalMetrics`` when a val/test epoch starts, feeds it every eval batch
(``update_loss``, ``update``) and reads ``compute()`` at the end. Everything is a ``torchmetrics`` state,
so under DDP each value covers every process's examples. Keys (STYLE.md 8):

* ``<split>/<task>/<metric>`` for every metric of the task (``metric.name``: the configured name, except
  that ``evaluate:`` paths are shortened to their last part), ``<split>/<task>/score`` (its first metric),
  ``<split>/<task>/loss`` (token-weighted mean LM loss), for each task with at least one example;
* ``<split>/avg/score``: the mean of the tasks' scores (0.0 when no task was evaluated).

With ``num_samples`` > 1, metrics with ``uses_samples`` (pass@k) score all samples of a prompt and every
other metric scores the first. Under DDP every example is scored on exactly one rank: the datamodule's
val/test loaders use an unpadded distributed sampler (Lightning's default one would repeat examples to
even out the ranks, and the summed states would count them twice).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import torch
from torchmetrics.aggregation import MeanMetric, SumMetric

from mtpeft.data.records import Record
from mtpeft.metrics import get_metric, samples_needed
from mtpeft.metrics.base import TextMetric
from mtpeft.metrics.external import EvaluateMetric


def check_metric_names(metric_names: Mapping[str, Sequence[str]], num_samples: int) -> None:
    """Every task has metrics, each a known name computable from ``num_samples`` completions per prompt
    (``evaluate:`` metrics are loaded here, so a missing one fails before training)."""
    for task, names in metric_names.items():
        if not names:
            raise ValueError(f"task {task!r} has no metrics; give it at least one (its score)")
        for name in names:
            metric = get_metric(name)  # unknown names raise, listing the valid ones
            if isinstance(metric, EvaluateMetric):
                metric.load()  # offline and not cached: fail now, not after training
            needed = samples_needed(name)
            if needed > num_samples:
                raise ValueError(
                    f"task {task!r}: metric {name!r} needs {needed} sampled completions per prompt but "
                    f"evaluation.num_samples={num_samples}; set evaluation.num_samples>={needed}"
                )


class EvalMetrics:
    """Metrics, loss and example counts of every task of one split, for one evaluation epoch."""

    def __init__(
        self,
        split: str,
        metric_names: Mapping[str, Sequence[str]],
        num_samples: int = 1,
        device: torch.device | str = "cpu",
    ) -> None:
        self.split = split
        self.metric_names = {task: tuple(names) for task, names in metric_names.items()}
        check_metric_names(self.metric_names, num_samples)
        self.metrics: dict[str, list[TextMetric]] = {
            task: [get_metric(name).to(device) for name in dict.fromkeys(names)]
            for task, names in self.metric_names.items()
        }
        for task, metrics in self.metrics.items():
            labels = [metric.name for metric in metrics]
            if len(set(labels)) < len(labels):
                raise ValueError(
                    f"task {task!r}: metrics {self.metric_names[task]} log under the same name {labels}"
                )
        self.loss = {task: MeanMetric().set_dtype(torch.float64).to(device) for task in self.metric_names}
        self.examples = {task: SumMetric().to(device) for task in self.metric_names}

    def update_loss(self, task: str, loss: torch.Tensor, tokens: torch.Tensor) -> None:
        """Add a batch's mean LM loss of ``task`` over ``tokens`` target tokens."""
        self.loss[task].update(loss.detach(), tokens)

    def update(self, task: str, samples: Sequence[Sequence[str]], records: Sequence[Record]) -> None:
        """Score one batch of ``task``: ``samples[i]`` holds the completions generated for ``records[i]``."""
        first = [group[0] for group in samples]
        for metric in self.metrics[task]:
            metric.update(samples if metric.uses_samples else first, records)
        self.examples[task].update(float(len(records)))

    def compute(self) -> dict[str, float]:
        """Every value of the split (synced across processes), in task order."""
        out: dict[str, float] = {}
        scores = []
        with warnings.catch_warnings():  # a process that saw no example of a task still has to sync it
            warnings.filterwarnings("ignore", message=r".*was called before the ``update`` method.*")
            for task, metrics in self.metrics.items():
                if float(self.examples[task].compute()) == 0:
                    continue
                for metric in metrics:
                    out[f"{self.split}/{task}/{metric.name}"] = float(metric.compute())
                score = out[f"{self.split}/{task}/score"] = out[f"{self.split}/{task}/{metrics[0].name}"]
                loss = float(self.loss[task].compute())
                if not math.isnan(loss):
                    out[f"{self.split}/{task}/loss"] = loss
                scores.append(score)
        out[f"{self.split}/avg/score"] = sum(scores) / len(scores) if scores else 0.0
        return out
