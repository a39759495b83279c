"""Pre-flight checks: every mistake that can be seen in the config is an error before any model is loaded.

``preflight(cfg)`` is the first thing a run does (`mtpeft.run.run`; the entry point `mtpeft.train` calls it
before it even imports `mtpeft.run`, so an error in the top-level keys or run settings comes in about a
second, not after ~5 s of torch/Lightning imports). It needs no model, tokenizer or data beyond a look at
the data files, and each error names the key (or file and line) and the fix. Every
node is checked by its typed schema (`mtpeft.utils.schema`: unknown keys rejected with the valid ones,
strict types, ranges), so no key goes unchecked:

* **top-level keys**: a key the configs do not declare (``+seeed=1``) is rejected with the valid ones
  (``allowed_top_level_keys``: the keys of conf/train.yaml, its groups and ``@package _global_`` options);
* **run settings** (`RunSettings`): ``seed`` is an integer, ``train``/``test``/``save_adapter`` are
  booleans, ``warmup_ratio`` is in [0, 1), ...;
* **plain nodes of conf/train.yaml** (``NODE_SCHEMAS``: `EvaluationConfig`): sampled evaluation
  (``evaluation.num_samples > 1``) needs ``evaluation.temperature > 0`` and ``0 < evaluation.top_p <= 1``;
* **instantiated nodes** (``optimizer``, ``scheduler``, ``data``, ``trainer``, ``callbacks.*``,
  ``logger.*``): every key is an argument of the ``_target_`` (``_partial_``/``_target_`` themselves are
  Hydra's); their values are checked by the target when it is instantiated;
* **method**: the options parse into the method's ``@config_dataclass`` (unknown keys, types, ranges);
* **model**: the node parses into its ``kind``'s spec (`mtpeft.models.config`);
* **cache**: the model cache directory (``$MTPEFT_CACHE_DIR``) is a directory;
* **data**: the datamodule's settings against its typed signature, generator tasks (split sizes, knobs),
  ``data.sources`` entries (`SourceConfig`), every local data file reads (exists, is a file, is UTF-8
  JSON or JSON Lines with records), and the val split (and the test split when ``test=true``) will have
  records.

``run_cli(main)`` runs a Hydra entry point so that a failure's last line on stderr is ``Error: <message>``
(after Hydra's traceback; ``HYDRA_FULL_ERROR=1`` still prints the full one).
"""

from __future__ import annotations

import inspect
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any

import yaml
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf
from pydantic import AfterValidator, BaseModel, Field, Strict, model_validator

from mtpeft.models.cache import check_cache_dir
from mtpeft.utils.schema import (
    CONFIG,
    Bool,
    Float,
    Int,
    PositiveInt,
    Str,
    arguments_model,
    did_you_mean,
    parse,
    to_plain,
)

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
"""The config directory of ``python -m mtpeft.train`` (``conf/train.yaml`` and its groups)."""

OPTIONAL_TOP_LEVEL: Mapping[str, str] = {
    "cluster": "cluster settings (partition, account, ...) that conf/launcher/*.yaml read with oc.select",
    "hydra": "Hydra's own settings",
}
"""Top-level keys that no config file sets but configs read when present (documented allow-list)."""


# -- entry points ---------------------------------------------------------------------------------
def preflight(cfg: DictConfig, conf_dir: Path = CONF_DIR) -> None:
    """Run every check that needs no model; raise ValueError (or an OSError subclass) on the first failure."""
    check_top_level_keys(cfg, conf_dir)
    check_run_settings(cfg)
    check_declared_nodes(cfg)
    check_targets(cfg)
    check_method(cfg)
    check_model(cfg)
    check_cache_dir((cfg.get("model") or {}).get("cache_dir"))
    check_data(cfg.data, test=bool(cfg.get("test", True)))


def run_cli(main: Callable[[], Any]) -> None:
    """Call a ``@hydra.main`` function; on failure end stderr with one line ``Error: <message>``.

    Hydra prints a shortened traceback and exits with status 1 (the original exception is the exit's
    ``__context__``); with ``HYDRA_FULL_ERROR=1`` the exception itself arrives here, and its full
    traceback is printed before the line.
    """
    try:
        main()
    except SystemExit as exit_:
        if exit_.code not in (0, None) and isinstance(exit_.__context__, Exception):
            print(error_line(exit_.__context__), file=sys.stderr)
        raise
    except Exception as err:  # noqa: BLE001 - HYDRA_FULL_ERROR=1: report it whole, then the one line
        traceback.print_exc()
        print(error_line(err), file=sys.stderr)
        sys.exit(1)


def error_line(err: BaseException) -> str:
    """``Error: <message>`` on one line (the message's whitespace and line breaks collapsed)."""
    message = " ".join(str(err).split()) or type(err).__name__
    return f"Error: {message}"


# -- top-level keys -------------------------------------------------------------------------------
def allowed_top_level_keys(conf_dir: Path = CONF_DIR) -> set[str]:
    """Top-level keys a run may have: those of conf/train.yaml, its config groups, the keys that
    ``@package _global_`` group options set (e.g. ``ablation`` from an experiment), and
    ``OPTIONAL_TOP_LEVEL``. Computed from the files, so a key declared in any config is valid."""
    base = _yaml(conf_dir / "train.yaml")
    keys = {k for k in base if k != "defaults"} | set(OPTIONAL_TOP_LEVEL)
    keys |= {_group_name(entry) for entry in base.get("defaults", []) if isinstance(entry, dict)}
    for path in conf_dir.glob("*/**/*.yaml"):
        package = _package(path)
        if package == "_global_":
            keys |= {k for k in _yaml(path) if k != "defaults"}
        elif package is not None and package.startswith("_global_."):
            keys.add(package.split(".")[1])
    return keys


def check_top_level_keys(cfg: DictConfig, conf_dir: Path = CONF_DIR) -> None:
    """Reject top-level keys no config declares (typically a misspelt ``+key=value`` override)."""
    if not (conf_dir / "train.yaml").is_file():
        return  # an installed copy without the config tree: Hydra's own checks only
    allowed = allowed_top_level_keys(conf_dir)
    unknown = sorted(set(cfg.keys()) - allowed)
    if unknown:
        raise ValueError(
            f"unknown top-level key {unknown[0]!r}{did_you_mean(unknown[0], allowed)} (was it added with "
            f"+{unknown[0]}=...?); valid top-level keys: {', '.join(sorted(allowed))}. A new top-level key "
            "must be declared in conf/train.yaml or in a config group option first"
        )


# -- scalar run settings ----------------------------------------------------------------------------
def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must be a non-empty name (logs/<task_name>/...)")
    return value


class RunSettings(BaseModel):
    """Schema of the top-level settings the run reads (values: conf/train.yaml); a key absent from the
    config is not checked. Other top-level keys are nodes with their own schema or ``_target_``."""

    model_config = CONFIG

    seed: Int | None = None
    """Seeds Python, numpy, torch, data generation and the sampler."""
    train: Bool | None = None
    test: Bool | None = None
    save_adapter: Bool | None = None
    gradient_checkpointing: Bool | None = None
    compile: Bool | None = None
    warmup_ratio: Annotated[float, Strict(), Field(ge=0, lt=1)] | None = None
    """Share of the optimiser steps spent warming up, in [0, 1)."""
    skip_finished: Bool | None = None
    task_name: Annotated[Str, AfterValidator(_not_blank)] | None = None
    checkpoint_every_n_steps: PositiveInt | None = None
    """Optimiser steps between two writes of checkpoints/last.ckpt (null: only the best checkpoint)."""
    allow_failures: Bool | None = None


def check_run_settings(cfg: DictConfig) -> None:
    """Each top-level setting of `RunSettings` present in ``cfg`` has a valid value."""
    present = {key: cfg[key] for key in RunSettings.model_fields if key in cfg}
    parse(RunSettings, present, "", "conf/train.yaml")


# -- nodes of conf/train.yaml ---------------------------------------------------------------------
class EvaluationConfig(BaseModel):
    """Schema of the ``evaluation`` node (its values live in conf/train.yaml)."""

    model_config = CONFIG

    batch_size: PositiveInt | None = None
    """Prompts per generation batch (fixed: part of what a score means)."""
    max_new_tokens: PositiveInt | None = None
    """Generation budget for every task; null: each task's own."""
    num_samples: PositiveInt | None = None
    """1: greedy decoding; n > 1: n sampled completions per prompt."""
    temperature: Float | None = None
    """Sampling temperature (num_samples > 1)."""
    top_p: Float | None = None
    """Nucleus sampling threshold (num_samples > 1)."""

    @model_validator(mode="after")
    def _sampling(self) -> EvaluationConfig:
        """Sampled evaluation needs temperature > 0 and 0 < top_p <= 1 (greedy decoding ignores both)."""
        samples = self.num_samples or 1
        if samples == 1:
            return self
        if self.temperature is not None and self.temperature <= 0:
            raise ValueError(
                f"temperature={self.temperature:g} is not valid with evaluation.num_samples={samples}: sampling "
                "needs a "
                "temperature > 0 (e.g. 0.8); for greedy decoding set evaluation.num_samples=1"
            )
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(
                f"top_p={self.top_p:g} is not valid with evaluation.num_samples={samples}: nucleus sampling needs "
                "0 < top_p <= 1 (1 = no nucleus cut)"
            )
        return self


NODE_SCHEMAS: Mapping[str, type[BaseModel]] = {"evaluation": EvaluationConfig}
"""Plain (non-``_target_``) nodes of conf/train.yaml and their schemas; ``_target_`` nodes such as
``optimizer`` and ``scheduler`` are checked against their target's signature (`check_targets`)."""


def check_declared_nodes(cfg: DictConfig) -> None:
    """Every node of ``NODE_SCHEMAS`` parses (unknown keys, types, ranges)."""
    for node, schema in NODE_SCHEMAS.items():
        if node in cfg:
            parse(schema, cfg[node], node, "conf/train.yaml")


def check_evaluation(evaluation: Mapping[str, Any]) -> None:
    """Batch size, generation budget and, for sampled evaluation, temperature and top-p."""
    parse(EvaluationConfig, evaluation, "evaluation", "conf/train.yaml")


# -- instantiated nodes ---------------------------------------------------------------------------
def check_targets(cfg: DictConfig) -> None:
    """Every key of a ``_target_`` node (top level or one below, e.g. ``callbacks.*``) is an argument."""
    for where, node in _target_nodes(cfg):
        target = node["_target_"]
        try:
            names, open_ended = _argument_names(get_object(target))
        except (ImportError, ValueError, TypeError) as err:
            raise ValueError(f"{where}._target_={target!r} cannot be imported or inspected: {err}") from err
        if open_ended:
            continue  # **kwargs: the target checks its own keys
        unknown = sorted(k for k in node if not str(k).startswith("_") and k not in names)
        if unknown:
            raise ValueError(
                f"unknown key {where}.{unknown[0]}{did_you_mean(unknown[0], names)}: it is not an argument "
                f"of {target}; valid keys: {', '.join(sorted(names))}"
            )


def _argument_names(target: Any) -> tuple[set[str], bool]:
    """The keyword arguments ``target`` accepts, and whether it takes any others (``**kwargs``). A
    classmethod constructor's ``**kwargs`` are taken to go to its class (``MultiTaskDataModule.from_files``)."""
    params = inspect.signature(target).parameters
    names = {name for name, p in params.items() if name != "self" and p.kind is not p.VAR_KEYWORD}
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return names, False
    owner = getattr(target, "__self__", None)
    if isinstance(owner, type):
        more, open_ended = _argument_names(owner)
        return names | more, open_ended
    return names, True


def _target_nodes(cfg: DictConfig) -> Iterator[tuple[str, DictConfig]]:
    """``(dotted key, node)`` of every ``_target_`` node at the top level or one level down (unresolved)."""
    for key, node in cfg.items_ex(resolve=False):
        if not isinstance(node, DictConfig) or key in ("method", "model", "hydra"):
            continue  # method and model have their own checks
        if "_target_" in node:
            yield str(key), node
        else:
            for sub, child in node.items_ex(resolve=False):
                if isinstance(child, DictConfig) and "_target_" in child:
                    yield f"{key}.{sub}", child


# -- method ---------------------------------------------------------------------------------------
def check_method(cfg: DictConfig) -> None:
    """Parse the ``method`` node into the method's typed config (unknown keys, types, cross-checks)."""
    from mtpeft.methods import method_options, parse_method_config

    name, options = method_options(cfg)
    parse_method_config(name, options)


# -- model ----------------------------------------------------------------------------------------
def check_model(cfg: DictConfig) -> None:
    """Parse the ``model`` node into its typed spec (``kind``, unknown keys, types; `mtpeft.models.config`)."""
    from mtpeft.models.config import parse_model

    if "model" in cfg:
        parse_model(cfg.model)


# -- data -----------------------------------------------------------------------------------------
def check_data(data: DictConfig, test: bool) -> None:
    """Generator tasks, source entries and data files; val (and test when ``test``) will have records."""
    from mtpeft.data.datamodule import check_mixing_names, parse_tasks
    from mtpeft.data.sources.files import read_rows
    from mtpeft.data.sources.load import source_splits

    _check_data_arguments(data)
    tasks = parse_tasks(data.get("tasks"), allow_empty=True)
    if not data.get("sources"):  # every task is known: data.task_caps / data.task_weights must name them
        check_mixing_names(data, list(tasks))
    # split -> the settings that leave it empty, or None once some task fills it
    empty_by: dict[str, list[str] | None] = {"val": [], "test": []}
    for name, entry in tasks.items():
        for split in empty_by:
            _note(
                empty_by, split, entry.get(split, 0) > 0, f"data.tasks.{name}.{split}={entry.get(split, 0)}"
            )
    for source in _sources(data):
        for entry in source.files:
            read_rows(
                entry.path
            )  # file-level errors (not found, directory, UTF-8, JSON) come before the model
        for split in empty_by:
            _note(empty_by, split, split in source_splits(source), _split_setting(source))
    _check_eval_splits(empty_by, test)


def _note(empty_by: dict[str, list[str] | None], split: str, filled: bool, setting: str) -> None:
    """Record that ``setting`` fills ``split`` (None from then on) or leaves it empty."""
    if filled:
        empty_by[split] = None
    elif empty_by[split] is not None:
        empty_by[split].append(setting)


def _check_eval_splits(empty_by: Mapping[str, list[str] | None], test: bool) -> None:
    """Validation always runs (best checkpoint, the run's score); the test split runs when ``test``."""
    needed = {"val": "val selects the best checkpoint and gives the run's score"}
    if test:
        needed["test"] = "test=true scores the test split; test=false skips it"
    missing = [split for split in needed if empty_by[split] is not None]
    if missing:
        settings = list(dict.fromkeys(s for split in missing for s in empty_by[split] or [])) or ["data"]
        splits = " and ".join(missing)
        raise ValueError(
            f"no task has {splits} records ({'; '.join(needed[s] for s in missing)}): {', '.join(settings)} "
            f"leave {splits} empty; give each a share, e.g. data.ratios=[8,1,1] (files) or "
            f"data.tasks.<task>.{missing[0]}=100 (generator tasks)"
        )


DATA_NODE_PARTS: tuple[str, ...] = ("tasks", "sources", "paths", "tokenizer")
"""Arguments of the ``data`` target checked on their own (tasks, sources, files) or given by the run."""


def _check_data_arguments(data: DictConfig) -> None:
    """The ``data`` node's other settings (batch sizes, template, ...) against its target's signature
    (the datamodule's typed arguments), before the tokenizer they will be called with exists."""
    if "_target_" not in data:
        return
    target = get_object(data["_target_"])
    owner = getattr(target, "__self__", None)
    functions = [target, owner.__init__] if isinstance(owner, type) else [getattr(target, "__init__", target)]
    schema = arguments_model(*functions, skip=DATA_NODE_PARTS)
    values = {k: v for k, v in to_plain(data).items() if not k.startswith("_") and k not in DATA_NODE_PARTS}
    parse(schema, values, "data")


FILES_SOURCE_KEYS: tuple[str, ...] = (
    "ratios",
    "split_seed",
    "metrics",
    "max_new_tokens",
    "dedup",
    "limit",
    "fields",
)
"""Keys of ``data=files`` that make its single source (``MultiTaskDataModule.from_files``)."""


def _sources(data: DictConfig) -> list[Any]:
    """``data.sources`` entries plus the single files source of ``data=files`` (``data.paths``)."""
    from mtpeft.data.sources import parse_source, parse_sources

    sources = parse_sources(to_plain(data.get("sources")))
    if "paths" in data.keys():  # noqa: SIM118 - `in data` is False for a missing (???) value
        if OmegaConf.is_missing(data, "paths") or not data.paths:
            raise ValueError(
                "data.paths is not set: pass data.paths=[a.json,b.jsonl] (Alpaca JSON or JSON Lines)"
            )
        raw = {"files": to_plain(data.paths), "format": data.get("format", "alpaca")}
        raw |= {k: to_plain(data[k]) for k in FILES_SOURCE_KEYS if data.get(k) is not None}
        sources.append(parse_source(raw, "data"))
    return sources


def _split_setting(source: Any) -> str:
    """The setting that decides which splits a source fills (for error messages)."""
    if source.ratios is not None:
        return f"{source.label}.ratios={[_number(r) for r in source.ratios]}"
    return f"{source.label}.splits"


# -- helpers --------------------------------------------------------------------------------------
def _yaml(path: Path) -> dict[str, Any]:
    """A config file as plain YAML (no Hydra composition): only its own keys matter here."""
    data = yaml.safe_load(path.read_text()) or {}
    return data if isinstance(data, dict) else {}


def _package(path: Path) -> str | None:
    """The ``# @package <name>`` header of a config file, if any."""
    for line in path.read_text().splitlines():
        if line.startswith("# @package"):
            return line.split(None, 2)[2].strip()
        if line.strip() and not line.startswith("#"):
            return None
    return None


def _group_name(entry: Mapping[str, Any]) -> str:
    """``{"optional local": default}`` -> ``local``; ``{"hydra/sweeper": x}`` -> ``hydra``."""
    key = str(next(iter(entry)))
    return key.split()[-1].split("/")[0].split("@")[0]


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value
