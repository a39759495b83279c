"""One evaluation epoch's bookkeeping: a fresh metric object per (task, metric) plus the per-task LM loss.

``MultiTaskModule`` builds an ``EvalMetrics`` when a val/test epoch starts, feeds it every eval batch
(``update_loss``, ``update``) and reads ``compute()`` at the end. Everything is a ``torchmetrics`` state,
so under DDP each value covers every process's examples. Keys (STYLE.md 8):

* ``<split>/<task>/<metric>`` for every metric of the task (``metric.name``: the configured name, except
  that ``evaluate:`` paths are shortened to their last part), ``<split>/<task>/score`` (its first metric),
  ``<split>/<task>/loss`` (token-weighted mean LM loss), for each task with at least one example;
* ``<split>/avg/score``: the mean of the tasks' scores (0.0 when no task was evaluated). The task name
  ``avg`` (`AVG_TASK`) is therefore reserved: `check_metric_names` rejects a task of that name, before
  training, whatever gave the name (a source's ``task``, a record's ``task`` field, a file stem, a key).

With ``num_samples`` > 1, metrics with ``uses_samples`` (pass@k) score all samples of a prompt and every
other metric scores the first. Under DDP every example is scored on exactly one rank: the datamodule's
val/test loaders use an unpadded distributed sampler (Lightning's default one would repeat examples to
even out the ranks, and the summed states would count them twice).

Per-example scores: ``update`` also keeps one row per example (split, task, dataset index, a digest of the
record, the prediction, and the score of every per-example metric; corpus metrics such as BLEU have none).
``example_rows()`` returns them for the whole split (under DDP gathered from every rank with
``all_gather_object``, so each rank holds every row) and ``write_example_scores`` writes them to the run's
``scores.jsonl.gz``, which `mtpeft.results.stats` bootstraps over. For a per-example metric the mean of
its column over a task's rows equals the logged ``<split>/<task>/<metric>``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torchmetrics.aggregation import MeanMetric, SumMetric

from mtpeft.data.records import Record
from mtpeft.metrics import get_metric, samples_needed
from mtpeft.metrics.base import PerExampleMetric, TextMetric
from mtpeft.metrics.external import EvaluateMetric

AVG_TASK = "avg"
"""The task slot of the macro average (``<split>/avg/score``): no task may have this name
(`mtpeft.data.sources.config.RESERVED_TASK_NAMES` rejects it where sources name their tasks)."""


def check_metric_names(metric_names: Mapping[str, Sequence[str]], num_samples: int) -> None:
    """No task is named ``avg`` and every task has metrics, each a known name computable from
    ``num_samples`` completions per prompt (``evaluate:`` metrics are loaded here, so a missing one fails
    before training)."""
    if AVG_TASK in metric_names:
        raise ValueError(
            f"a task is named {AVG_TASK!r}, which is reserved: <split>/{AVG_TASK}/score is the mean of the "
            f"tasks' scores and would overwrite that task's score; rename the task (a source's task: "
            "<name>, the records' task field, or the file name it was taken from)"
        )
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
        self.rows: list[dict[str, Any]] = []

    def update_loss(self, task: str, loss: torch.Tensor, tokens: torch.Tensor) -> None:
        """Add a batch's mean LM loss of ``task`` over ``tokens`` target tokens."""
        self.loss[task].update(loss.detach(), tokens)

    def update(
        self,
        task: str,
        samples: Sequence[Sequence[str]],
        records: Sequence[Record],
        indices: Sequence[int] | None = None,
    ) -> None:
        """Score one batch of ``task``: ``samples[i]`` holds the completions generated for ``records[i]``,
        whose position in the split's record list is ``indices[i]`` (kept in the per-example rows)."""
        first = [group[0] for group in samples]
        per_example: dict[str, list[float]] = {}
        for metric in self.metrics[task]:
            metric.update(samples if metric.uses_samples else first, records)
            if isinstance(metric, PerExampleMetric):
                per_example[metric.name] = metric.last_scores
        self.examples[task].update(float(len(records)))
        score_name = self.metrics[task][0].name
        for i, record in enumerate(records):
            scores = {name: values[i] for name, values in per_example.items()}
            self.rows.append(
                {
                    "split": self.split,
                    "task": task,
                    "index": int(indices[i]) if indices is not None else None,
                    "item": record_digest(record),
                    "prediction": first[i],
                    "score": scores.get(score_name),
                    "scores": scores,
                }
            )

    def example_rows(self) -> list[dict[str, Any]]:
        """Every per-example row of the split, from every process, ordered by task and index."""
        rows = list(self.rows)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[list[dict[str, Any]]] = [[] for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather_object(gathered, rows)
            rows = [row for part in gathered for row in part]
        order = {task: i for i, task in enumerate(self.metrics)}
        return sorted(
            rows, key=lambda r: (order.get(r["task"], len(order)), r["index"] is None, r["index"] or 0)
        )

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
        out[f"{self.split}/{AVG_TASK}/score"] = sum(scores) / len(scores) if scores else 0.0
        return out


SCORES_FILE = "scores.jsonl.gz"
"""Per-example scores of a run (next to its results.json): one JSON object per line, gzip-compressed."""


def record_digest(record: Record) -> str:
    """A short content digest of a record (prompt + gold answer): paired comparisons check that two runs
    scored the same test item under the same index."""
    text = json.dumps([record["task"], record["instruction"], record["input"], record["answer"]])
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def write_example_scores(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``rows`` (e.g. ``EvalMetrics.example_rows()`` of val and test) as gzipped JSON lines; the
    gzip header carries no time stamp, so the same rows give the same bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")  # renamed when complete: never a truncated file
    with partial.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as out:
        for row in rows:
            out.write((json.dumps(row, sort_keys=True) + "\n").encode())
    partial.replace(path)
    return path


def read_example_scores(path: Path) -> list[dict[str, Any]]:
    """The rows written by `write_example_scores`."""
    with gzip.open(path, "rt") as lines:
        return [json.loads(line) for line in lines if line.strip()]
