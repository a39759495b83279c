"""Loading a source: rows -> records -> per-task train/val/test, de-duplicated, limited and checked.

``load_sources`` returns one ``SourceTask`` per task (a source may yield several: one per file, or per
``task`` field). Each carries its metrics and generation budget, so the datamodule keeps its own task
table and nothing is registered globally. Order of operations per task: split (per file by ratios, or
the dataset's own splits), drop eval records whose prompt is in train (``dedup``), take ``limit``
subsets. Every step is logged with counts; a split that was asked for but ends up empty is an error.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from mtpeft.data.budgets import MAX_NEW_TOKENS_CAP, target_lengths
from mtpeft.data.records import Record
from mtpeft.data.sources.config import SPLIT_NAMES, SourceConfig, check_task_name
from mtpeft.data.sources.files import read_rows
from mtpeft.data.sources.formats import Format, get_format, to_record
from mtpeft.data.sources.hub import load_split
from mtpeft.data.sources.splits import drop_seen_prompts, ratio_split, requested_splits, take
from mtpeft.data.templates import Template

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceTask:
    """A task loaded from a source: its records and how it is scored (TaskSpec-like, per datamodule)."""

    name: str
    metrics: tuple[str, ...]
    """Metric names; the first is the task's score."""
    max_new_tokens: int | None
    """Generation budget; None until derived from the tokenised targets (``default_max_new_tokens``)."""
    splits: Mapping[str, list[Record]] = field(repr=False)
    source: str = ""
    """The config entry it came from (``data.sources.<key>``)."""
    description: str = ""

    @property
    def metric(self) -> str:
        """The primary metric (the task's ``score``)."""
        return self.metrics[0]


def load_sources(configs: Iterable[SourceConfig]) -> list[SourceTask]:
    """Load every source; two sources yielding the same task name is an error naming both."""
    tasks: dict[str, SourceTask] = {}
    for cfg in configs:
        for task in load_source(cfg):
            if task.name in tasks:
                raise ValueError(
                    f"task {task.name!r} comes from both {tasks[task.name].source} and {task.source}; give one "
                    "of them another task name (task: <name>)"
                )
            tasks[task.name] = task
    return list(tasks.values())


def load_source(cfg: SourceConfig) -> list[SourceTask]:
    """The tasks of one source, split, de-duplicated, limited and checked."""
    fmt = get_format(cfg.format)
    if cfg.files:
        per_task, requested = _from_files(cfg, fmt)
    else:
        per_task, requested = _from_dataset(cfg, fmt)
    metrics = cfg.metrics or fmt.metrics
    out = []
    for name, splits in per_task.items():
        _finish(cfg, name, splits, requested)
        out.append(
            SourceTask(name, metrics, cfg.max_new_tokens, splits, cfg.label, f"{cfg.format}: {cfg.location}")
        )
    return out


def source_splits(cfg: SourceConfig) -> tuple[str, ...]:
    """The splits source ``cfg`` is asked to fill (loading fails if one of them ends up empty).

    Known from the config alone, so a run can check before loading anything that val and test will have
    records: a ratio split fills the splits with a positive share, a dataset source the splits it maps.
    """
    if cfg.ratios is not None:
        return requested_splits(cfg.ratios)
    return tuple(cfg.splits or get_format(cfg.format).splits)


def _from_files(cfg: SourceConfig, fmt: Format) -> tuple[dict[str, dict[str, list[Record]]], tuple[str, ...]]:
    """Each file is split on its own (HyCAM's per-file 7:2), then its records join their tasks."""
    assert cfg.ratios is not None
    per_task: dict[str, dict[str, list[Record]]] = {}
    for entry in cfg.files:
        records = _convert(cfg, fmt, read_rows(entry.path), entry.task or cfg.task, Path(entry.path).stem)
        for split, part in ratio_split(records, cfg.ratios, cfg.split_seed).items():
            for record in part:
                per_task.setdefault(record["task"], {s: [] for s in SPLIT_NAMES})[split].append(record)
    return per_task, source_splits(cfg)


def _from_dataset(
    cfg: SourceConfig, fmt: Format
) -> tuple[dict[str, dict[str, list[Record]]], tuple[str, ...]]:
    """The dataset's own splits (``splits``), or its train split cut by ``ratios``."""
    default_task = cfg.key or fmt.name
    if cfg.ratios is not None:
        records = _convert(cfg, fmt, _dataset_rows(cfg, fmt, "train"), cfg.task, default_task)
        by_split = ratio_split(records, cfg.ratios, cfg.split_seed)
    else:
        by_split = {
            split: _convert(cfg, fmt, _dataset_rows(cfg, fmt, spec), cfg.task, default_task)
            for split, spec in (cfg.splits or fmt.splits).items()
        }
    requested = source_splits(cfg)
    per_task: dict[str, dict[str, list[Record]]] = {}
    for split, records in by_split.items():
        for record in records:
            per_task.setdefault(record["task"], {s: [] for s in SPLIT_NAMES})[split].append(record)
    return per_task, requested


def _dataset_rows(cfg: SourceConfig, fmt: Format, spec: str) -> list[tuple[Any, str]]:
    rows = load_split(cfg, spec, tuple(c for c in fmt.required))
    where = f"{cfg.label} ({cfg.dataset} split {spec!r})"
    return [(row, f"{where} row {i}") for i, row in enumerate(rows)]


def _convert(
    cfg: SourceConfig, fmt: Format, rows: Sequence[tuple[Any, str]], forced: str | None, fallback: str
) -> list[Record]:
    """Rows -> records; the task is ``forced``, else the row's ``task`` field, else ``fallback``."""
    task_column = cfg.fields.get("task", "task")
    records = []
    for raw, where in rows:
        task = forced
        if task is None and isinstance(raw, Mapping) and raw.get(task_column) not in (None, ""):
            task = check_task_name(raw[task_column], f"{where}: field {task_column!r}")
        records.append(to_record(fmt, raw, where, task or fallback, cfg.fields, cfg.options))
    return records


def _finish(cfg: SourceConfig, name: str, splits: dict[str, list[Record]], requested: Sequence[str]) -> None:
    """Dedup, limit and check one task's splits in place; log what happened."""
    dropped = drop_seen_prompts(splits) if cfg.dedup else {}
    if any(dropped.values()):
        log.warning(
            "%s: task %r: dropped %d val and %d test records whose prompt (instruction + input) is also in train",
            cfg.label,
            name,
            dropped["val"],
            dropped["test"],
        )
    for split in SPLIT_NAMES:
        splits[split] = take(splits[split], cfg.limit.get(split), cfg.split_seed, name, split)
        if split in requested and not splits[split]:
            after = (
                f" after dropping {dropped[split]} duplicates of train prompts (dedup: false keeps them)"
                if dropped.get(split)
                else ""
            )
            raise ValueError(
                f"{cfg.label}: task {name!r} has no {split} records{after} (source {cfg.location}); an empty "
                "task cannot be trained or scored: add records or change ratios/splits"
            )
    log.info(
        "%s: task %r: %s records (%s)",
        cfg.label,
        name,
        ", ".join(f"{s} {len(splits[s])}" for s in SPLIT_NAMES),
        cfg.location,
    )


def default_max_new_tokens(
    records: Sequence[Record],
    tokenizer: PreTrainedTokenizerBase,
    template: Template,
    cap: int = MAX_NEW_TOKENS_CAP,
) -> int:
    """Tokens of the longest rendered target in ``records`` plus one for EOS, at most ``cap``."""
    return min(max(target_lengths(records, tokenizer, template), default=1), cap)
