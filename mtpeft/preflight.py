"""Pre-flight checks: every mistake that can be seen in the config is an error before any model is loaded.

``preflight(cfg)`` is the first thing a run does (`mtpeft.run.run`). It needs no model, tokenizer or
data beyond a look at the data files, and each error names the key (or file and line) and the fix:

* **top-level keys**: a key the configs do not declare (``+seeed=1``) is rejected with the valid ones
  (``allowed_top_level_keys``);
* **run settings**: ``seed`` is an integer, ``train``/``test``/``save_adapter`` are booleans, ...;
* **nodes declared in conf/train.yaml** (``evaluation``): no unknown sub-keys; sampled
  evaluation (``evaluation.num_samples > 1``) needs ``evaluation.temperature > 0`` and
  ``0 < evaluation.top_p <= 1``;
* **instantiated nodes** (``optimizer``, ``trainer``, ``callbacks.*``, ``logger.*``): every key is an
  argument of the ``_target_``;
* **method**: the options parse into the method's typed config (unknown keys, types, ranges);
* **cache**: the model cache directory (``$MTPEFT_CACHE_DIR``) is a directory;
* **data**: generator tasks and their knobs exist, ``data.sources`` entries parse, every local data file
  reads (exists, is a file, is UTF-8 JSON or JSON Lines with records), and the val split (and the test
  split when ``test=true``) will have records.

``run_cli(main)`` runs a Hydra entry point so that a failure's last line on stderr is ``Error: <message>``
(after Hydra's traceback; ``HYDRA_FULL_ERROR=1`` still prints the full one).
"""

from __future__ import annotations

import difflib
import inspect
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from mtpeft.models.cache import check_cache_dir

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
"""The config directory of ``python -m mtpeft.train`` (``conf/train.yaml`` and its groups)."""

OPTIONAL_TOP_LEVEL: Mapping[str, str] = {
    "cluster": "cluster settings (partition, account, ...) that conf/launcher/*.yaml read with oc.select",
    "hydra": "Hydra's own settings",
}
"""Top-level keys that no config file sets but configs read when present (documented allow-list)."""

DECLARED_NODES: tuple[str, ...] = ("evaluation",)
"""Nodes of conf/train.yaml read key by key by the run: keys they do not declare are typos."""


# -- entry points ---------------------------------------------------------------------------------
def preflight(cfg: DictConfig, conf_dir: Path = CONF_DIR) -> None:
    """Run every check that needs no model; raise ValueError (or an OSError subclass) on the first failure."""
    check_top_level_keys(cfg, conf_dir)
    check_run_settings(cfg)
    check_declared_nodes(cfg, conf_dir)
    check_evaluation(cfg.get("evaluation") or {})
    check_targets(cfg)
    check_method(cfg)
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
            f"unknown top-level key {unknown[0]!r}{_did_you_mean(unknown[0], allowed)} (was it added with "
            f"+{unknown[0]}=...?); valid top-level keys: {', '.join(sorted(allowed))}. A new top-level key "
            "must be declared in conf/train.yaml or in a config group option first"
        )


# -- scalar run settings ----------------------------------------------------------------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


RUN_SETTINGS: Mapping[str, tuple[Callable[[Any], bool], str]] = {
    "seed": (_is_int, "an integer, e.g. seed=0"),
    "train": (lambda v: isinstance(v, bool), "true or false"),
    "test": (lambda v: isinstance(v, bool), "true or false"),
    "save_adapter": (lambda v: isinstance(v, bool), "true or false"),
    "gradient_checkpointing": (lambda v: isinstance(v, bool), "true or false"),
    "compile": (lambda v: isinstance(v, bool), "true or false"),
    "warmup_ratio": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1), e.g. warmup_ratio=0.05"),
    "skip_finished": (lambda v: v is None or isinstance(v, bool), "null, true or false"),
    "task_name": (
        lambda v: isinstance(v, str) and v.strip() != "",
        "a non-empty name (logs/<task_name>/...)",
    ),
}
"""Top-level settings read by the run: key -> (valid?, what a valid value is)."""


def check_run_settings(cfg: DictConfig) -> None:
    """Each top-level setting of ``RUN_SETTINGS`` present in ``cfg`` has a valid value."""
    for key, (valid, expected) in RUN_SETTINGS.items():
        if key in cfg and not valid(cfg[key]):
            raise ValueError(f"{key}={cfg[key]!r} is not valid: {key} must be {expected}")


# -- nodes of conf/train.yaml ---------------------------------------------------------------------
def check_declared_nodes(cfg: DictConfig, conf_dir: Path = CONF_DIR) -> None:
    """``evaluation.*`` keys must be the ones conf/train.yaml declares."""
    if not (conf_dir / "train.yaml").is_file():
        return
    base = _yaml(conf_dir / "train.yaml")
    for node in DECLARED_NODES:
        declared = set(base.get(node) or {})
        unknown = sorted(set(cfg.get(node) or {}) - declared)
        if declared and unknown:
            raise ValueError(
                f"unknown key {node}.{unknown[0]}{_did_you_mean(unknown[0], declared)}; valid keys of "
                f"{node}: {', '.join(sorted(declared))}"
            )


def check_evaluation(evaluation: Mapping[str, Any]) -> None:
    """Batch size, generation budget and, for sampled evaluation, temperature and top-p."""
    batch_size = evaluation.get("batch_size", 1)
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"evaluation.batch_size={batch_size!r} is not valid: use an integer >= 1")
    budget = evaluation.get("max_new_tokens")
    if budget is not None and (not _is_int(budget) or budget < 1):
        raise ValueError(
            f"evaluation.max_new_tokens={budget!r} is not valid: use an integer >= 1, or null for each "
            "task's own budget"
        )
    samples = evaluation.get("num_samples", 1)
    if not _is_int(samples) or samples < 1:
        raise ValueError(
            f"evaluation.num_samples={samples!r} is not valid: use 1 (greedy) or n > 1 sampled completions"
        )
    if samples == 1:
        return  # greedy decoding ignores temperature and top_p
    temperature, top_p = evaluation.get("temperature", 0.8), evaluation.get("top_p", 0.95)
    if not _is_number(temperature) or temperature <= 0:
        raise ValueError(
            f"evaluation.temperature={temperature!r} is not valid with evaluation.num_samples={samples}: "
            "sampling needs a temperature > 0 (e.g. 0.8); for greedy decoding set evaluation.num_samples=1"
        )
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise ValueError(
            f"evaluation.top_p={top_p!r} is not valid with evaluation.num_samples={samples}: nucleus "
            "sampling needs 0 < top_p <= 1 (1 = no nucleus cut)"
        )


# -- instantiated nodes ---------------------------------------------------------------------------
def check_targets(cfg: DictConfig) -> None:
    """Every key of a ``_target_`` node (top level or one below, e.g. ``callbacks.*``) is an argument."""
    for where, node in _target_nodes(cfg):
        target = node["_target_"]
        try:
            params = inspect.signature(get_object(target)).parameters
        except (ImportError, ValueError, TypeError) as err:
            raise ValueError(f"{where}._target_={target!r} cannot be imported or inspected: {err}") from err
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            continue  # **kwargs: the target checks its own keys
        names = {name for name in params if name != "self"}
        unknown = sorted(k for k in node if not str(k).startswith("_") and k not in names)
        if unknown:
            raise ValueError(
                f"unknown key {where}.{unknown[0]}{_did_you_mean(unknown[0], names)}: it is not an argument "
                f"of {target}; valid keys: {', '.join(sorted(names))}"
            )


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


# -- data -----------------------------------------------------------------------------------------
def check_data(data: DictConfig, test: bool) -> None:
    """Generator tasks, source entries and data files; val (and test when ``test``) will have records."""
    from mtpeft.data.sources.files import read_rows
    from mtpeft.data.sources.load import source_splits

    # split -> the settings that leave it empty, or None once some task fills it
    empty_by: dict[str, list[str] | None] = {"val": [], "test": []}
    for name, entry in _plain(data.get("tasks") or {}).items():
        _check_generator_task(name, entry)
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


def _check_generator_task(name: str, entry: Any) -> None:
    """A registered generator task with known knobs and integer split sizes >= 0."""
    from mtpeft.data.tasks import SPLITS, get_task

    spec = get_task(name)
    if not isinstance(entry, Mapping):
        raise ValueError(f"data.tasks.{name} must be a mapping like {{train: 3000, val: 100, test: 300}}")
    for key, value in entry.items():
        if key in SPLITS and (not _is_int(value) or value < 0):
            raise ValueError(
                f"data.tasks.{name}.{key}={value!r} is not valid: a split size is an integer >= 0"
            )
        if key not in SPLITS and key not in spec.knobs:
            valid = ", ".join([*SPLITS, *spec.knobs])
            raise ValueError(
                f"unknown key data.tasks.{name}.{key}{_did_you_mean(key, [*SPLITS, *spec.knobs])}; valid "
                f"keys: {valid}"
            )


def _sources(data: DictConfig) -> list[Any]:
    """``data.sources`` entries plus the single files source of ``data=files`` (``data.paths``)."""
    from mtpeft.data.sources import parse_source, parse_sources

    sources = parse_sources(_plain(data.get("sources")))
    if "paths" in data.keys():  # noqa: SIM118 - `in data` is False for a missing (???) value
        if OmegaConf.is_missing(data, "paths") or not data.paths:
            raise ValueError(
                "data.paths is not set: pass data.paths=[a.json,b.jsonl] (Alpaca JSON or JSON Lines)"
            )
        raw = {"files": _plain(data.paths), "ratios": _plain(data.get("ratios"))}
        sources.append(parse_source({**raw, "format": data.get("format", "alpaca")}, "data"))
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


def _did_you_mean(key: str, valid: Any) -> str:
    close = difflib.get_close_matches(str(key), [str(v) for v in valid], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def _plain(value: Any) -> Any:
    """Config containers as plain dicts and lists (resolved)."""
    if isinstance(value, DictConfig) or OmegaConf.is_list(value):
        return OmegaConf.to_container(value, resolve=True)
    return value
