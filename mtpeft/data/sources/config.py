"""Source configuration: ``(format, location, options)`` checked once, with errors naming the key.

A data source is one entry of ``data.sources`` (a mapping ``key -> entry`` or a list of entries). Its
location is either ``files`` (local JSON / JSON Lines files, split by ``ratios``) or ``dataset`` (anything
``datasets.load_dataset`` reads: a hub id, a local directory, or a builder such as ``json``/``parquet``
with ``data_files``). ``SourceConfig`` is a typed model (``mtpeft.utils.schema``): unknown keys are
rejected with the list of valid ones, which includes the options of the source's format (e.g.
``keep_calculator`` for ``gsm8k``), and every error names the entry's dotted key (``data.sources.gsm8k``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from mtpeft.data.sources.formats import get_format
from mtpeft.utils.schema import (
    CONFIG,
    Bool,
    ConfigError,
    Int,
    NonNegativeFloat,
    PositiveInt,
    Str,
    field_names,
    parse,
    to_plain,
)

SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")

DEFAULT_FILE_RATIOS: tuple[float, ...] = (8.0, 1.0, 1.0)
"""Train/val/test ratios of ``files`` sources that give none."""

HYCAM_SPLIT_SEED = 2333
"""HyCAM's seed (docs/data.md 3.2); the default split seed, fixed so that every training seed sees the same test set."""

SplitName = Literal["train", "val", "test"]


RESERVED_TASK_NAMES: tuple[str, ...] = ("avg",)
"""Names no task may have: ``<split>/avg/score`` is the macro average over the tasks
(`mtpeft.metrics.tracker.AVG_TASK`), so a task named ``avg`` would have its score overwritten."""


def _reserved(name: str) -> str:
    return (
        f"task name {name!r} is reserved (<split>/{name}/score is the mean of the tasks' scores and would "
        "overwrite this task's score); give the task another name"
    )


def check_task_name(name: Any, where: str = "task") -> str:
    """A task name must be a non-empty string without ``/`` (it becomes part of metric keys), and not
    a reserved one (``avg``)."""
    if not isinstance(name, str) or not name.strip() or "/" in name:
        raise ValueError(f"{where}: task name must be a non-empty string without '/', got {name!r}")
    if name.strip() in RESERVED_TASK_NAMES:
        raise ValueError(f"{where}: {_reserved(name.strip())}")
    return name.strip()


def _task_name(name: str) -> str:
    if not name.strip() or "/" in name:
        raise ValueError(f"a task name must be a non-empty string without '/', got {name!r}")
    if name.strip() in RESERVED_TASK_NAMES:
        raise ValueError(_reserved(name.strip()))
    return name.strip()


TaskName = Annotated[Str, AfterValidator(_task_name)]
"""A non-empty task name without ``/`` (surrounding spaces dropped), not a reserved one (``avg``)."""
NonEmptyStr = Annotated[Str, Field(min_length=1)]


def _check_ratios(values: tuple[float, ...]) -> tuple[float, ...]:
    """Two (train, eval) or three (train, val, test) numbers >= 0 with a positive train share."""
    if len(values) not in (2, 3):
        raise ValueError(
            "ratios must be 2 numbers [train, eval] or 3 numbers [train, val, test], all >= 0, e.g. [7, 2] "
            f"(HyCAM) or [8, 1, 1]; got {list(values)!r}"
        )
    if values[0] <= 0:
        raise ValueError(f"the train ratio must be > 0, got {list(values)!r}")
    return values


def _as_list(value: Any) -> Any:
    """One path or name given alone stands for a list of one; null for none."""
    if value is None:
        return []
    return [value] if isinstance(value, str | Mapping) else value


def _file_entry(value: Any) -> Any:
    """A path string stands for ``{path: <it>}``."""
    return {"path": value} if isinstance(value, str) else value


def _none_as_empty(value: Any) -> Any:
    return {} if value is None else value


class FileEntry(BaseModel):
    """One local file of a ``files`` source (a path string, or ``{path, task}``)."""

    model_config = CONFIG

    path: Str
    """File path (relative paths are taken from the directory the run was started in)."""
    task: TaskName | None = None
    """Task of every record of this file (overrides the records' ``task`` field and the file stem)."""


class SourceConfig(BaseModel):
    """One data source: where the rows are, how they become records, how they are split."""

    model_config = CONFIG

    format: Str = "alpaca"
    """Row schema (``mtpeft.data.sources.formats``): alpaca, gsm8k, mbpp, squad, commonsense_mc."""
    task: TaskName | None = None
    """Task name of every record. Default: the record's ``task`` field, else the file stem (files) or the key."""
    files: Annotated[
        tuple[Annotated[FileEntry, BeforeValidator(_file_entry)], ...], BeforeValidator(_as_list)
    ] = ()
    """Local JSON / JSON Lines files (path strings or ``{path, task}``); split per file by ``ratios``."""
    dataset: Str | None = None
    """``datasets.load_dataset`` path: hub id (``openai/gsm8k``), local directory, or builder (``json``)."""
    name: Str | None = None
    """Dataset configuration (``main`` for GSM8K, ``full`` for MBPP)."""
    data_dir: Str | None = None
    """``load_dataset(data_dir=...)``."""
    data_files: Any = None
    """``load_dataset(data_files=...)``; for builders, paths relative to ``local_dir`` when it is set."""
    revision: Str | None = None
    """Hub revision (commit) to pin."""
    local_dir: Str | None = None
    """A downloaded copy of the hub repository (``hf download --repo-type dataset <id> --local-dir <dir>``),
    used first when it exists."""
    hub_repo: Str | None = None
    """Builder datasets only: the hub dataset repository holding ``data_files`` (fallback: the HF cache)."""
    cache_dir: Str | None = None
    """``datasets`` cache directory (default: ``HF_DATASETS_CACHE``)."""
    splits: Annotated[dict[SplitName, NonEmptyStr], Field(min_length=1)] | None = None
    """Our split -> dataset split (slices allowed, e.g. ``train[:-200]``); default: the format's."""
    ratios: Annotated[tuple[NonNegativeFloat, ...], AfterValidator(_check_ratios)] | None = None
    """Split one pool (each file, or the dataset's ``train``) by ratios: ``[train, eval]`` (eval = val = test,
    HyCAM's ``7,2``) or ``[train, val, test]``. Default for files: ``[8, 1, 1]``."""
    split_seed: Int = HYCAM_SPLIT_SEED
    """Seed of the ratio split and of ``limit`` subsets (kept apart from the training seed)."""
    limit: Annotated[dict[SplitName, PositiveInt | None], BeforeValidator(_none_as_empty)] = Field(
        default_factory=dict
    )
    """Split -> at most this many records per task (a seeded random subset); None = all."""
    dedup: Bool = True
    """Drop val/test records whose prompt (instruction + input) equals a train record's."""
    metrics: Annotated[tuple[NonEmptyStr, ...], Field(min_length=1), BeforeValidator(_as_list)] | None = None
    """Metric names (the first is the score); default: the format's."""
    max_new_tokens: PositiveInt | None = None
    """Generation budget; default: tokens of the longest train target + EOS, capped."""
    fields: Annotated[dict[Str, NonEmptyStr], BeforeValidator(_none_as_empty)] = Field(default_factory=dict)
    """Format column -> column in the data (``{output: response}`` reads Dolly's ``response``)."""

    _label: str = PrivateAttr("data.sources")
    _key: str | None = PrivateAttr(None)
    _options: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _default_file_ratios(cls, values: Any) -> Any:
        """Files without ``ratios`` are split 8:1:1."""
        if isinstance(values, Mapping) and values.get("files") and values.get("ratios") is None:
            return {**values, "ratios": DEFAULT_FILE_RATIOS}
        return values

    @field_validator("fields")
    @classmethod
    def _known_columns(cls, fields: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        """``fields`` renames columns the format reads."""
        columns = get_format(info.data.get("format", "alpaca")).columns
        for column in fields:
            if column not in columns:
                raise ValueError(
                    f"{column!r} is not a column of the {info.data.get('format')!r} format; its columns: "
                    f"{', '.join(columns)}"
                )
        return fields

    @model_validator(mode="after")
    def _check_location(self) -> SourceConfig:
        """Exactly one location; ``splits`` only for datasets and never with ``ratios``."""
        if bool(self.files) == bool(self.dataset):
            raise ValueError(
                "give exactly one location: files: [a.json, b.jsonl] (local files) or dataset: <hub id, "
                "local dir or builder such as json> (datasets.load_dataset)"
            )
        if self.files and self.splits is not None:
            raise ValueError("files are split by ratios; splits: applies to dataset sources only")
        if self.ratios is not None and self.splits is not None:
            raise ValueError("give ratios (split the dataset's train) or splits (its own splits), not both")
        return self

    @property
    def label(self) -> str:
        """Where the entry sits in the config (``data.sources.gsm8k``), used in every error message."""
        return self._label

    @property
    def key(self) -> str | None:
        """The mapping key of the entry; the task name of ``dataset`` sources unless ``task`` is set."""
        return self._key

    @property
    def options(self) -> Mapping[str, Any]:
        """The format's own options, defaults filled in."""
        return self._options

    @property
    def location(self) -> str:
        """Short description of where the rows come from."""
        if self.files:
            return ", ".join(f.path for f in self.files)
        extra = ", ".join(
            f"{k}={v!r}" for k, v in (("name", self.name), ("data_files", self.data_files)) if v
        )
        return f"{self.dataset}" + (f" ({extra})" if extra else "")


COMMON_KEYS: tuple[str, ...] = tuple(field_names(SourceConfig))
"""Keys every source accepts (a format adds its own options)."""


def parse_sources(sources: Any) -> list[SourceConfig]:
    """``data.sources`` (mapping key -> entry, or list of entries) as checked ``SourceConfig`` objects."""
    sources = to_plain(sources)
    if sources is None:
        return []
    if isinstance(sources, Mapping):
        return [parse_source(entry, f"data.sources.{key}", str(key)) for key, entry in sources.items()]
    if isinstance(sources, list):
        return [parse_source(entry, f"data.sources[{i}]") for i, entry in enumerate(sources)]
    raise ConfigError(f"data.sources must be a mapping name -> source or a list of sources, got {sources!r}")


def parse_source(raw: Any, label: str, key: str | None = None) -> SourceConfig:
    """Check one entry: known keys (the format's options included), one location, valid
    splits/ratios/limits/metrics/fields; every error names ``label``."""
    raw = to_plain(raw)
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{label} must be a mapping like {{format: alpaca, files: [a.json]}}, got {raw!r}")
    fmt_name = raw.get("format", "alpaca")
    try:
        fmt = get_format(str(fmt_name))
    except ValueError as err:
        raise ConfigError(f"{label}.format: {err}") from None
    options = {name: raw.get(name, default) for name, default in fmt.options.items()}
    common = {k: v for k, v in raw.items() if k not in fmt.options}
    try:
        cfg = parse(SourceConfig, common, label, extra_keys=fmt.options)
    except ConfigError as err:
        if not re.match(rf"unknown key {re.escape(label)}\.\w+:", str(err)):
            raise
        own = ", ".join(fmt.options) or "none"
        raise ConfigError(f"{err} (format {fmt.name!r}; its own options: {own})") from None
    cfg._label, cfg._key, cfg._options = label, key, options
    return cfg
