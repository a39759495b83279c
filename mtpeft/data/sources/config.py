"""Source configuration: ``(format, location, options)`` checked once, with errors naming the key.

A data source is one entry of ``data.sources`` (a mapping ``key -> entry`` or a list of entries). Its
location is either ``files`` (local JSON / JSON Lines files, split by ``ratios``) or ``dataset`` (anything
``datasets.load_dataset`` reads: a hub id, a local directory, or a builder such as ``json``/``parquet``
with ``data_files``). Unknown keys are rejected with the list of valid ones, which includes the options
of the source's format (e.g. ``keep_calculator`` for ``gsm8k``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mtpeft.data.sources.formats import get_format
from mtpeft.data.sources.splits import check_ratios

SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")

DEFAULT_FILE_RATIOS: tuple[float, ...] = (8.0, 1.0, 1.0)
"""Train/val/test ratios of ``files`` sources that give none."""

HYCAM_SPLIT_SEED = 2333
"""HyCAM's seed (docs/data.md 3.2); the default split seed, fixed so that every training seed sees the same test set."""


@dataclass(frozen=True)
class FileEntry:
    """One local file of a ``files`` source."""

    path: str
    task: str | None = None
    """Task of every record of this file (overrides the records' ``task`` field and the file stem)."""


@dataclass(frozen=True)
class SourceConfig:
    """One data source: where the rows are, how they become records, how they are split."""

    label: str
    """Where the entry sits in the config (``data.sources.gsm8k``), used in every error message."""
    key: str | None = None
    """The mapping key of the entry; the task name of ``dataset`` sources unless ``task`` is set."""
    format: str = "alpaca"
    """Row schema (``mtpeft.data.sources.formats``): alpaca, gsm8k, mbpp, squad, commonsense_mc."""
    task: str | None = None
    """Task name of every record. Default: the record's ``task`` field, else the file stem (files) or the key."""
    files: tuple[FileEntry, ...] = ()
    """Local JSON / JSON Lines files (path strings or ``{path, task}``); split per file by ``ratios``."""
    dataset: str | None = None
    """``datasets.load_dataset`` path: hub id (``openai/gsm8k``), local directory, or builder (``json``)."""
    name: str | None = None
    """Dataset configuration (``main`` for GSM8K, ``full`` for MBPP)."""
    data_dir: str | None = None
    """``load_dataset(data_dir=...)``."""
    data_files: Any = None
    """``load_dataset(data_files=...)``; for builders, paths relative to ``local_dir`` when it is set."""
    revision: str | None = None
    """Hub revision (commit) to pin."""
    local_dir: str | None = None
    """A downloaded copy of the hub repository (``hf download --repo-type dataset <id> --local-dir <dir>``),
    used first when it exists."""
    hub_repo: str | None = None
    """Builder datasets only: the hub dataset repository holding ``data_files`` (fallback: the HF cache)."""
    cache_dir: str | None = None
    """``datasets`` cache directory (default: ``HF_DATASETS_CACHE``)."""
    splits: Mapping[str, str] | None = None
    """Our split -> dataset split (slices allowed, e.g. ``train[:-200]``); default: the format's."""
    ratios: tuple[float, ...] | None = None
    """Split one pool (each file, or the dataset's ``train``) by ratios: ``[train, eval]`` (eval = val = test,
    HyCAM's ``7,2``) or ``[train, val, test]``."""
    split_seed: int = HYCAM_SPLIT_SEED
    """Seed of the ratio split and of ``limit`` subsets (kept apart from the training seed)."""
    limit: Mapping[str, int | None] = field(default_factory=dict)
    """Split -> at most this many records per task (a seeded random subset); None = all."""
    dedup: bool = True
    """Drop val/test records whose prompt (instruction + input) equals a train record's."""
    metrics: tuple[str, ...] | None = None
    """Metric names (the first is the score); default: the format's."""
    max_new_tokens: int | None = None
    """Generation budget; default: tokens of the longest train target + EOS, capped."""
    fields: Mapping[str, str] = field(default_factory=dict)
    """Format column -> column in the data (``{output: response}`` reads Dolly's ``response``)."""
    options: Mapping[str, Any] = field(default_factory=dict)
    """The format's own options, defaults filled in."""

    @property
    def location(self) -> str:
        """Short description of where the rows come from."""
        if self.files:
            return ", ".join(f.path for f in self.files)
        extra = ", ".join(
            f"{k}={v!r}" for k, v in (("name", self.name), ("data_files", self.data_files)) if v
        )
        return f"{self.dataset}" + (f" ({extra})" if extra else "")


COMMON_KEYS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(SourceConfig) if f.name not in ("label", "key", "options")
)


def parse_sources(sources: Any) -> list[SourceConfig]:
    """``data.sources`` (mapping key -> entry, or list of entries) as checked ``SourceConfig`` objects."""
    if sources is None:
        return []
    if isinstance(sources, Mapping):
        return [parse_source(entry, f"data.sources.{key}", str(key)) for key, entry in sources.items()]
    if isinstance(sources, Sequence) and not isinstance(sources, str):
        return [parse_source(entry, f"data.sources[{i}]") for i, entry in enumerate(sources)]
    raise ValueError(f"data.sources must be a mapping name -> source or a list of sources, got {sources!r}")


def parse_source(raw: Any, label: str, key: str | None = None) -> SourceConfig:
    """Check one entry: known keys, one location, valid splits/ratios/limits/metrics/fields."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"{label} must be a mapping like {{format: alpaca, files: [a.json]}}, got {raw!r}")
    raw = dict(raw)
    fmt = get_format(str(raw.get("format", "alpaca")))
    unknown = sorted(set(raw) - set(COMMON_KEYS) - set(fmt.options))
    if unknown:
        valid = ", ".join(sorted({*COMMON_KEYS, *fmt.options}))
        raise ValueError(f"{label}: unknown key {unknown[0]!r} for format {fmt.name!r}; valid keys: {valid}")
    options = {name: raw.pop(name, default) for name, default in fmt.options.items()}
    if bool(raw.get("files")) == bool(raw.get("dataset")):
        raise ValueError(
            f"{label}: give exactly one location: files: [a.json, b.jsonl] (local files) or dataset: <hub id, "
            "local dir or builder such as json> (datasets.load_dataset)"
        )
    values = {
        **raw,
        "files": _files(raw.get("files"), label),
        "ratios": None if raw.get("ratios") is None else check_ratios(raw["ratios"], f"{label}.ratios"),
        "splits": _splits(raw.get("splits"), label),
        "limit": _limit(raw.get("limit"), label),
        "metrics": _metrics(raw.get("metrics"), label),
        "fields": _fields(raw.get("fields"), fmt.columns, label),
    }
    _check_combination(values, label)
    if values["files"] and values["ratios"] is None:
        values["ratios"] = DEFAULT_FILE_RATIOS
    return SourceConfig(label=label, key=key, options=options, **values)


def _check_combination(values: dict[str, Any], label: str) -> None:
    """Location-dependent keys and the scalar options (``task`` is normalised in place)."""
    if values["files"] and values["splits"] is not None:
        raise ValueError(f"{label}: files are split by ratios; splits: applies to dataset sources only")
    if values["ratios"] is not None and values["splits"] is not None:
        raise ValueError(
            f"{label}: give ratios (split the dataset's train) or splits (its own splits), not both"
        )
    mnt = values.get("max_new_tokens")
    if mnt is not None and (not isinstance(mnt, int) or isinstance(mnt, bool) or mnt < 1):
        raise ValueError(f"{label}.max_new_tokens must be an int >= 1 or null, got {mnt!r}")
    if not isinstance(values.get("split_seed", 0), int):
        raise ValueError(f"{label}.split_seed must be an int, got {values['split_seed']!r}")
    if not isinstance(values.get("dedup", True), bool):
        raise ValueError(f"{label}.dedup must be true or false, got {values['dedup']!r}")
    if values.get("task") is not None:
        values["task"] = check_task_name(values["task"], f"{label}.task")


def check_task_name(name: Any, where: str) -> str:
    """A task name must be a non-empty string without ``/`` (it becomes part of metric keys)."""
    if not isinstance(name, str) or not name.strip() or "/" in name:
        raise ValueError(f"{where}: task name must be a non-empty string without '/', got {name!r}")
    return name.strip()


def _files(files: Any, label: str) -> tuple[FileEntry, ...]:
    if not files:
        return ()
    if isinstance(files, str) or not isinstance(files, Sequence):
        files = [files]
    entries = []
    for i, item in enumerate(files):
        if isinstance(item, str):
            entries.append(FileEntry(item))
        elif (
            isinstance(item, Mapping) and isinstance(item.get("path"), str) and set(item) <= {"path", "task"}
        ):
            task = (
                None
                if item.get("task") is None
                else check_task_name(item["task"], f"{label}.files[{i}].task")
            )
            entries.append(FileEntry(item["path"], task))
        else:
            raise ValueError(f"{label}.files[{i}] must be a path or {{path: ..., task: ...}}, got {item!r}")
    return tuple(entries)


def _splits(splits: Any, label: str) -> dict[str, str] | None:
    if splits is None:
        return None
    if not isinstance(splits, Mapping) or not splits:
        raise ValueError(
            f"{label}.splits must map our splits to dataset splits, e.g. {{train: train, test: test}}"
        )
    for split, spec in splits.items():
        if split not in SPLIT_NAMES:
            raise ValueError(
                f"{label}.splits: unknown split {split!r}; valid splits: {', '.join(SPLIT_NAMES)}"
            )
        if not isinstance(spec, str) or not spec:
            raise ValueError(
                f"{label}.splits.{split} must be a dataset split such as 'train[:1000]', got {spec!r}"
            )
    return dict(splits)


def _limit(limit: Any, label: str) -> dict[str, int | None]:
    if limit is None:
        return {}
    if not isinstance(limit, Mapping):
        raise ValueError(f"{label}.limit must map splits to record counts, e.g. {{val: 200}}, got {limit!r}")
    for split, n in limit.items():
        if split not in SPLIT_NAMES:
            raise ValueError(
                f"{label}.limit: unknown split {split!r}; valid splits: {', '.join(SPLIT_NAMES)}"
            )
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise ValueError(f"{label}.limit.{split} must be an int >= 1 or null, got {n!r}")
    return dict(limit)


def _metrics(metrics: Any, label: str) -> tuple[str, ...] | None:
    if metrics is None:
        return None
    if isinstance(metrics, str):
        metrics = [metrics]
    if not metrics or not all(isinstance(m, str) and m for m in metrics):
        raise ValueError(f"{label}.metrics must be a non-empty list of metric names, got {metrics!r}")
    return tuple(metrics)


def _fields(fields: Any, columns: Sequence[str], label: str) -> dict[str, str]:
    if fields is None:
        return {}
    if not isinstance(fields, Mapping):
        raise ValueError(f"{label}.fields must map format columns to your columns, got {fields!r}")
    for column, source in fields.items():
        if column not in columns:
            raise ValueError(
                f"{label}.fields: {column!r} is not a column of this format; its columns: {', '.join(columns)}"
            )
        if not isinstance(source, str) or not source:
            raise ValueError(f"{label}.fields.{column} must be a column name, got {source!r}")
    return dict(fields)
