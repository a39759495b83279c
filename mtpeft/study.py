"""Run a study end to end: tune on validation -> choose -> final seeds on test -> tables, statistics, plots.

    python -m mtpeft.study methods_mix3_tuned                  # conf/experiment/methods_mix3_tuned.yaml
    python -m mtpeft.study methods_mix3_tuned trainer.max_steps=600 --launcher basic
    make study STUDY=methods_mix3_tuned ARGS="..."

A study is an experiment config (``conf/experiment/<name>.yaml``: ``hydra.sweeper.params`` with ``method``
and ``seed``). Optional keys read by this runner (and removed from the runs' configs, so changing them
never invalidates a finished job):

``tune`` -- the tuning protocol::

    tune:
      seed: 0                  # the tuning seed (its data and initialisation)
      lr: [1.0e-3, 3.0e-3, 1.0e-2, 3.0e-2]   # the grid of every method: config key -> values (lr = optimizer.lr)
      methods:                 # per method: extra grid keys (added; same key: replaced), or null: not tuned
        hycam: {method.routing: [hard_gumbel, softmax]}
        none: null
      overrides: []            # tuning stage only (e.g. [ablation.variant=default])
      widen: 2                 # grid sampler: values added at most beyond an edge (default 2; 0: never)
      sampler: grid            # grid (default) | optuna
      trials: 20               # optuna: trials per method (default 20)

  Stage 1 sweeps every method over its grid with the tuning seed on the validation split (``test=false``);
  the best combination per method is the one with the highest ``val/avg/score`` (of the best checkpoint),
  ties broken by the smaller value (numbers) or the earlier one in the grid (other values), key by key in
  grid order. Stage 2 runs each method with its chosen values and the study's seeds on test, recording
  them as ``tuned: {key: value}`` in the run's config (so in ``results.json``, the config hash and the
  table's starred ``lr*`` columns). ``experiments/<name>/tuning.{md,csv}`` keeps the whole grid.

  *Widening at the edge* (grid sampler): when a method's best value of a numeric grid key is the lowest or
  highest of that key's grid, the best may lie beyond it, so the runner adds the next value in the grid's
  progression beyond that edge (`next_value`: geometric for positive values spaced by ratio, else
  arithmetic; ``1e-3, 3e-3, 1e-2, 3e-2`` goes on with ``3e-4`` below and ``0.1`` above), runs that
  method's new jobs (the new value crossed with its other keys' values), and chooses again; at most
  ``tune.widen`` times, stopping as soon as every best is interior (the ties rule decides which value is
  best, so a tie with the edge's neighbour is interior). The added jobs are ordinary tuning jobs: the
  declared grid's jobs and hashes are unchanged, a re-run skips every job that finished (widened ones
  included) and widens the same way. ``tuning.csv`` names in ``widened`` the keys whose value lies beyond
  the declared grid; ``tuning.md`` marks such values with ``⁺``.

  *Optuna* (``sampler: optuna``): instead of the grid, a TPE search per method driven from this runner
  with Optuna's ask-and-tell API (``optuna.create_study`` in memory, ``TPESampler(seed=tune.seed)``, so
  methods start from the same random trials where their spaces agree; written against optuna 2.10, the
  version ``hydra-optuna-sweeper`` pins (``sweeps`` extra), using only calls that newer versions keep:
  ``ask``, ``suggest_float/int/categorical``, ``tell``). The search space
  is the same keys: a list is categorical, ``{low: 1.0e-4, high: 1.0e-1, log: true}`` a range (integers
  when both ends are); on the command line
  ``+tune.sampler=optuna '~tune.lr' '+tune.lr={low:1e-4,high:1e-1,log:true}'``. Each trial is an ordinary
  one-job tuning sweep whose ``val/avg/score`` is told back (a failed job: a failed trial). A re-run asks
  the same trials in the same order (the sampler is seeded and sees the same scores), so every finished
  trial is skipped by its job hash and its score replayed into the new search; only the rest run (one
  short process per replayed trial). Trials of one method run one at a time; with the joblib launcher
  ``--n-jobs`` methods search at once. ``widen`` does not apply.

``check`` -- a convergence check after the final stage (`mtpeft.study_check`): the methods at their chosen
values under ``check.overrides`` (a longer budget, e.g. ``[trainer.max_steps=360]``) with ``check.seeds``;
``experiments/<name>/check/`` gets the check's tables and ``ranking.md``, the study's ranking against the
check's (does the order hold at a longer budget?)::

    check: {overrides: [trainer.max_steps=360], seeds: [0], methods: [lora, hycam, mtl_lora]}

``probe`` -- a capacity probe (``probe: {loss_threshold: 0.1}``, e.g. ``conf/experiment/capacity.yaml``
with ``debug=overfit``): after the sweep, ``experiments/<name>/capacity.{md,csv}`` gives per method the
first logged step whose training loss is at or below the threshold (updates done before that loss), the
final and the lowest training loss, from each run's CSV log.

The stages are ordinary ``python -m mtpeft.train -m`` sweeps run as subprocesses (Hydra semantics
unchanged) with ``skip_finished``: re-running the command resumes, redoing only missing and failed jobs.
Each stage writes into its own sweep directory under ``<paths.log_dir>/<task_name>/multiruns/``, and the
tables cover exactly the jobs of this invocation (skipped ones are read from the runs they point to).
Launcher: joblib (``--n-jobs`` parallel jobs, ``cpu_threads=1``) when the plugin is installed, else
Hydra's basic (sequential) one. With joblib, a stage's sweeps also run side by side while their jobs fit in
``--n-jobs`` (`mtpeft.study_sweeps.run_sweeps_in_slots`): a check on one seed or one method's widened value
is a one-job sweep, and two of them share two cores instead of one idling; a sweep gives its slots back
as its last jobs end (a next sweep that needs only the freed slots starts beside the previous one's last
job). Other arguments are Hydra overrides given to every job.

Publishing (across sessions and fresh checkouts, where ``logs/`` is empty): after each sweep (and every
`PUBLISH_EVERY_S` seconds while one runs) the runner
copies every successful run under ``<paths.log_dir>/<task_name>/`` into
``<paths.published_dir>/<task_name>/runs/<name>/`` (``experiments/<name>/runs/`` by default; `publish`):
``results.json``, the metrics CSV, ``scores.jsonl.gz`` and ``.hydra/{config,overrides}.yaml``, never
checkpoints or wandb files. Names are stable (``tune_lora_lr=0.01_s0_<job hash prefix>``) and a job
already published is not copied again. `mtpeft.train` also looks there for finished jobs, so committing
``experiments/<name>/runs/`` and re-running the command in a new checkout runs only what is missing.
``python -m mtpeft.study <name> --publish`` publishes without running anything (e.g. for a plain
``python -m mtpeft.train experiment=<name>`` sweep); ``--no-publish`` turns the automatic copy off.
``python -m mtpeft.study <name> --status`` says where the study stands (`mtpeft.study_status`).

Stopping: a SIGINT, SIGTERM or SIGHUP to the runner stops every job of its sweeps at the end of its current
step (resumable) and publishes what finished (`mtpeft.study_sweeps`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from omegaconf import DictConfig

from mtpeft.results import declared_plots, load_runs, summarise
from mtpeft.results.load import CURVE_FILES
from mtpeft.results.stats import SCORES_FILE
from mtpeft.study_check import (
    check_methods,
    check_seeds,
    validate_check,
    validate_check_effect,
    validate_check_seeds,
    write_check,
)
from mtpeft.study_stages import run_stage, sweep_dir_name
from mtpeft.study_sweeps import SWEEPS, StudyStopped, run_sweep, run_sweeps_in_slots, stop_on_signals
from mtpeft.utils.confighash import IGNORED_TOP_LEVEL
from mtpeft.utils.sweep import RESULTS_FILE, finished_roots, run_identity, run_records

log = logging.getLogger(__name__)
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
ALIASES = {"lr": "optimizer.lr"}
"""Short names accepted in ``tune.grid``."""
RUNNER_KEYS = ("tune", "probe", "check")
"""Top-level study keys this runner reads; removed from the runs' configs (``~key``)."""
TUNE_SETTINGS = ("seed", "methods", "overrides", "widen", "sampler", "trials")
"""Keys of ``tune`` that are settings; every other key is a grid key."""
SAMPLERS = ("grid", "optuna")
"""``tune.sampler``: every grid point (default), or an Optuna TPE search of ``tune.trials`` trials."""
WIDEN_DEFAULT = 2
"""``tune.widen`` when not given: at most this many values are added beyond a grid's edge."""
HYDRA_LOCK = threading.RLock()
"""Held while Hydra's global state is in use (`sweep_jobs`, `compose_study`): sweeps start from threads."""
TRIALS_DEFAULT = 20
"""``tune.trials`` when not given (``tune.sampler: optuna``): trials per method."""


# -- the study's declaration -----------------------------------------------------------------------
@dataclass
class Study:
    """What the runner needs from a composed experiment config."""

    name: str
    methods: list[str]
    log_dir: Path
    task_name: str
    seeds: list[str] = field(default_factory=list)
    """The seeds of the final stage (``hydra.sweeper.params.seed``)."""
    published_dir: Path | None = None
    """Where finished runs are published (``<paths.published_dir>/<task_name>/runs``); None: nowhere."""
    tune: dict[str, Any] | None = None
    probe: dict[str, Any] | None = None
    check: dict[str, Any] | None = None
    """The convergence check (`mtpeft.study_check`), or None."""
    runner_keys: list[str] = field(default_factory=list)
    other_params: list[str] = field(default_factory=list)
    """The study's other sweeper params (``hydra.sweeper.params`` but ``method`` and ``seed``, as ``key=value``
    texts): every stage's sweeps run them too, unless the stage sets the key (``methods_mix3_long``:
    ``trainer.max_steps=1200,2400``)."""
    job_overrides: list[str] = field(default_factory=list)
    """The command line's overrides for every job (`Overrides.jobs`), which its sweeps add last."""

    def grid(self, method: str) -> dict[str, list[Any]] | None:
        """The tuning grid of ``method`` (key -> values), or None when it is not tuned."""
        if self.tune is None:
            return None
        per_method = self.tune.get("methods") or {}
        if method in per_method and per_method[method] is None:
            return None
        common = {k: v for k, v in self.tune.items() if k not in TUNE_SETTINGS}
        grid = {**common, **(per_method.get(method) or {})}
        return {ALIASES.get(k, k): list(v) if isinstance(v, list | tuple) else v for k, v in grid.items()}

    @property
    def sampler(self) -> str:
        return str((self.tune or {}).get("sampler") or "grid")

    @property
    def widen(self) -> int:
        """How many times a grid may be widened at an edge (``tune.widen``; grid sampler only)."""
        value = (self.tune or {}).get("widen")
        return WIDEN_DEFAULT if value is None else int(value)

    @property
    def trials(self) -> int:
        """Optuna trials per method (``tune.trials``)."""
        value = (self.tune or {}).get("trials")
        return TRIALS_DEFAULT if value is None else int(value)


def _parse(override: str) -> Any:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides([override])[0]


def sweep_jobs(params: Sequence[str], conf_dir: Path = CONF_DIR) -> list[list[str]]:
    """The override list of every job a sweep over ``params`` (``key=value`` texts: a study's
    ``hydra.sweeper.params`` then the command line's overrides) launches, as Hydra's basic sweeper expands
    them: ``a,b`` and ``range(...)`` sweep their values, ``glob(*,exclude=[none])`` the matching files of
    the config group (``conf/<group>/*.yaml``, sorted; presets in sub-folders are not options), and a
    later override of the same key replaces an earlier one."""
    from hydra import initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    with HYDRA_LOCK:  # Hydra's global state: one user at a time (Optuna searches run in threads)
        GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(version_base="1.3", config_dir=str(conf_dir)):
                parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
                (jobs,) = BasicSweeper.split_arguments(parser.parse_overrides(list(params)), None)
        finally:
            GlobalHydra.instance().clear()
    return jobs


def sweep_values(key: str, value: Any, conf_dir: Path = CONF_DIR) -> list[str]:
    """The values sweeper param ``key: value`` takes (see `sweep_jobs`), in launch order."""
    prefix = f"{key}="
    return [job[0].removeprefix(prefix) for job in sweep_jobs([f"{key}={value}"], conf_dir)]


def sweeper_params(cfg: DictConfig) -> list[str]:
    """A composed study's ``hydra.sweeper.params`` as ``key=value`` override texts."""
    params = cfg.hydra.sweeper.get("params") or {}
    return [f"{key}={value}" for key, value in params.items()]


def _is_sweep(override: str) -> bool:
    return _parse(override).is_sweep_override()


@dataclass
class Overrides:
    """The command line's Hydra overrides, sorted by who uses them."""

    methods: list[str] | None = None
    """``method=a,b``: the study's methods instead of those its config sweeps."""
    seeds: list[str] = field(default_factory=list)
    """``seed=...``: the final stage's seeds (the tuning stage keeps ``tune.seed``)."""
    runner: list[str] = field(default_factory=list)
    """``tune.*`` / ``probe.*``: read by this runner only."""
    jobs: list[str] = field(default_factory=list)
    """Everything else: given to every job."""


def split_overrides(overrides: Sequence[str]) -> Overrides:
    """Sort ``overrides`` (see `Overrides`)."""
    result = Overrides()
    for text in overrides:
        override = _parse(text)
        key = override.key_or_group
        if key == "method":
            result.methods = sweep_values("method", text.split("=", 1)[1])
        elif key == "seed":
            result.seeds.append(text)
        elif key.split(".")[0] in RUNNER_KEYS:
            if override.is_sweep_override():
                raise SystemExit(
                    f"{text}: the runner reads {key.split('.')[0]}.* itself and does not sweep it; give a "
                    f"list instead, e.g. {key}=[a,b]"
                )
            result.runner.append(text)
        else:
            result.jobs.append(text)
    return result


def compose_study(name: str, overrides: Sequence[str] = (), conf_dir: Path = CONF_DIR) -> DictConfig:
    """``conf/train.yaml`` with ``experiment=<name>`` and the overrides that are not sweeps (Hydra keys
    included)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from mtpeft.utils.resolvers import register_resolvers

    if not (conf_dir / "experiment" / f"{name}.yaml").is_file():
        known = sorted(p.stem for p in (conf_dir / "experiment").glob("*.yaml"))
        raise SystemExit(
            f"no study {name!r}: conf/experiment/{name}.yaml does not exist; studies: {', '.join(known)}"
        )
    register_resolvers()
    plain = [o for o in overrides if not _is_sweep(o)]
    with HYDRA_LOCK:
        GlobalHydra.instance().clear()
        with initialize_config_dir(version_base="1.3", config_dir=str(conf_dir)):
            cfg = compose("train", overrides=[f"experiment={name}", *plain], return_hydra_config=True)
        GlobalHydra.instance().clear()
    return cfg


def study_roots(cfg: DictConfig) -> tuple[Path, Path]:
    """(where the study's runs are written, where its published runs go): ``<paths.log_dir>/<task_name>``
    and ``<paths.published_dir>/<task_name>/runs`` (the roots `mtpeft.train` looks in for finished jobs)."""
    log_root, published = finished_roots(cfg)
    return log_root.resolve(), published.resolve()


def load_study(name: str, overrides: Sequence[str] = (), conf_dir: Path = CONF_DIR) -> Study:
    """Compose ``experiment=<name>`` (with the overrides that are not sweeps) and read the study keys."""
    from omegaconf import OmegaConf

    runner = [text for text in overrides if _top_key(text) in RUNNER_KEYS]
    jobs = [text for text in overrides if text not in runner]
    cfg = compose_study(name, overrides, conf_dir)
    declared = compose_study(name, jobs, conf_dir) if runner else cfg  # what the jobs compose
    params = cfg.hydra.sweeper.get("params") or {}
    if "method" not in params:
        raise SystemExit(
            f"study {name!r}: conf/experiment/{name}.yaml must sweep 'method' in hydra.sweeper.params"
        )
    sections = {
        key: OmegaConf.to_container(cfg[key], resolve=True) if cfg.get(key) is not None else None
        for key in RUNNER_KEYS
    }
    study = Study(
        name=name,
        methods=sweep_values("method", params["method"], conf_dir),
        seeds=sweep_values("seed", params["seed"], conf_dir) if "seed" in params else [str(cfg.seed)],
        log_dir=Path(str(cfg.paths.log_dir)).resolve(),
        task_name=str(cfg.task_name),
        published_dir=study_roots(cfg)[1],
        tune=sections["tune"],
        probe=sections["probe"],
        check=sections["check"],
        runner_keys=[key for key in RUNNER_KEYS if key in declared],  # the jobs delete these (~key)
        other_params=[t for t in sweeper_params(cfg) if _parse(t).key_or_group not in ("method", "seed")],
    )
    check_tune(study)
    validate_check(study)
    if study.check is not None:
        validate_check_effect(study, declared, lambda extra: compose_study(name, [*jobs, *extra], conf_dir))
    return study


def _top_key(override: str) -> str:
    """The top-level config key an override sets, adds or deletes (``+check.seeds=[0]`` -> ``check``)."""
    return _parse(override).key_or_group.split(".")[0]


def study_from_command(name: str, overrides: Sequence[str] = ()) -> tuple[Study, Overrides]:
    """The study ``name`` as the command line changes it (`split_overrides`: runner keys, ``method=`` and
    ``seed=`` included), and the sorted overrides; what `run_study` runs and ``--status`` counts."""
    parts = split_overrides(overrides)
    study = load_study(name, [*parts.runner, *parts.jobs])
    study.methods = parts.methods or study.methods
    study.job_overrides = list(parts.jobs)
    if parts.seeds:
        study.seeds = sweep_values("seed", parts.seeds[-1].split("=", 1)[1])
    validate_check_seeds(study)
    return study, parts


def check_tune(study: Study) -> None:
    """A ``tune`` section has known keys, a non-empty list per grid key and only swept methods."""
    if study.tune is None:
        return
    where = f"conf/experiment/{study.name}.yaml: tune"
    for method, extra in (study.tune.get("methods") or {}).items():
        if method not in study.methods:
            raise SystemExit(
                f"{where}.methods.{method}: not a method of the study ({', '.join(study.methods)})"
            )
        if extra is not None and not isinstance(extra, dict):
            raise SystemExit(f"{where}.methods.{method} must be a mapping of key -> values, or null")
    if study.sampler not in SAMPLERS:
        raise SystemExit(f"{where}.sampler: {study.sampler!r} is not one of {', '.join(SAMPLERS)}")
    if study.sampler == "optuna" and importlib.util.find_spec("optuna") is None:
        raise SystemExit(f"{where}.sampler: optuna needs the optuna package: pip install -e '.[sweeps]'")
    for key, least in (("widen", 0), ("trials", 1)):
        value = study.tune.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise SystemExit(f"{where}.{key} must be an integer >= {least}, got {value!r}")
    for method in study.methods:
        for key, values in (study.grid(method) or {}).items():
            if study.sampler == "optuna" and isinstance(values, dict):
                check_range(f"{where}: {key}", values)
            elif not isinstance(values, list) or not values:
                ranges = " or a range {low, high, log} (tune.sampler: optuna)" * (study.sampler == "optuna")
                raise SystemExit(
                    f"{where}: grid key {key!r} needs a non-empty list of values{ranges}, got {values!r}"
                )


def check_range(where: str, spec: Mapping[str, Any]) -> None:
    """An Optuna search range: ``{low, high[, log]}`` with numbers ``low < high`` (``low > 0`` for log)."""
    unknown = set(spec) - {"low", "high", "log"}
    low, high = spec.get("low"), spec.get("high")
    if unknown or not all(_number(v) for v in (low, high)) or not low < high:
        raise SystemExit(
            f"{where}: a search range is {{low: <number>, high: <larger number>, log: true|false}}, got {spec!r}"
        )
    if spec.get("log") and low <= 0:
        raise SystemExit(f"{where}: a log range needs low > 0, got {spec!r}")


# -- commands --------------------------------------------------------------------------------------
_PLAIN = re.compile(r"^[A-Za-z0-9_.\-+/]+$")


def hydra_value(value: Any) -> str:
    """A value as Hydra override text (strings with special characters quoted)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    return text if _PLAIN.match(text) else "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def launcher_overrides(launcher: str, n_jobs: int) -> list[str]:
    """joblib (parallel jobs, one thread each) when asked or, for ``auto``, when installed; else basic."""
    if launcher == "auto":
        launcher = "joblib" if importlib.util.find_spec("hydra_plugins.hydra_joblib_launcher") else "basic"
    if launcher == "basic":
        return []
    return ["launcher=joblib", f"hydra.launcher.n_jobs={n_jobs}", "cpu_threads=1"]


def sweep_size(study: Study, command: Sequence[str]) -> int:
    """How many jobs a ``mtpeft.train -m`` command of this runner launches: its overrides over the study's
    sweeper params (its methods, seeds and other swept keys), expanded as Hydra's basic sweeper does
    (`sweep_jobs`)."""
    overrides = [
        text
        for text in command[list(command).index("-m", 3) + 1 :]
        if not text.startswith(("experiment=", "~", "hydra.", "launcher=", "++tuned="))
    ]
    own = [*study.other_params, f"method={','.join(study.methods)}", f"seed={','.join(study.seeds)}"]
    return len(sweep_jobs([*own, *overrides]))


def with_sizes(study: Study, commands: Sequence[tuple[list[str], Path]]) -> list[tuple[list[str], Path, int]]:
    """``(command, directory, jobs)`` for `run_sweeps_in_slots` (`sweep_size`)."""
    return [(command, directory, sweep_size(study, command)) for command, directory in commands]


def declared_jobs(study: Study) -> dict[str, int]:
    """How many jobs each stage declares, counted on the sweeps the runner launches (`tuning_commands`,
    `final_commands`, `check_commands`, each expanded by `sweep_size` over the study's sweeper params and the
    command line's job overrides): the tuning grids before widening (with the Optuna sampler, ``tune.trials``
    one-job trials per method), then the final and check stages with one value per tuned key."""
    extra = study.job_overrides
    tuned = {m: grid for m in study.methods if (grid := study.grid(m)) is not None}
    if study.sampler == "optuna":  # a trial is a sweep with one value per searched key
        trials = [(m, {key: [0] for key in grid}) for m, grid in tuned.items()]
        tune = study.trials * _jobs(study, tuning_commands(study, extra, [], trials))
    else:
        tune = _jobs(study, tuning_commands(study, extra, [])) if tuned else 0
    chosen = {m: {key: _first(values) for key, values in grid.items()} for m, grid in tuned.items()}
    final = _jobs(study, final_commands(study, chosen, extra, []))
    check = _jobs(study, check_commands(study, chosen, extra, [])) if study.check is not None else 0
    return {"tune": tune, "final": final, "check": check}


def _first(values: Any) -> Any:
    """A stand-in chosen value: the first of a grid's values (any value counts the same jobs)."""
    return values[0] if isinstance(values, list) and values else 0


def _jobs(study: Study, commands: list[tuple[list[str], Path]]) -> int:
    return sum(sweep_size(study, command) for command, _ in commands)


def sweep_dir(study: Study, stage: str) -> Path:
    """A fresh directory for one stage's sweep: ``<log_dir>/<task_name>/multiruns/<time>_<uid>_<stage>``."""
    return study.log_dir / study.task_name / "multiruns" / sweep_dir_name(stage)


def train_command(study: Study, overrides: Iterable[str], directory: Path) -> list[str]:
    """``python -m mtpeft.train -m experiment=<name> ...`` writing into ``directory``."""
    return [
        sys.executable,
        "-m",
        "mtpeft.train",
        "-m",
        f"experiment={study.name}",
        *(f"~{key}" for key in study.runner_keys),
        *overrides,
        f"hydra.sweep.dir={hydra_value(str(directory))}",
    ]


def tuning_commands(
    study: Study,
    extra: Sequence[str],
    launch: Sequence[str],
    sweeps: Sequence[tuple[str, Mapping[str, list[Any]]]] | None = None,
    stage: str = "tune",
) -> list[tuple[list[str], Path]]:
    """One sweep per distinct grid (methods with the same grid share one): tuning seed, validation only.

    ``sweeps``: ``(method, grid)`` pairs to run (default: every tuned method's declared grid); the sweep
    directories end in ``<stage><i>``."""
    if sweeps is None:
        sweeps = [(m, grid) for m in study.methods if (grid := study.grid(m)) is not None]
    groups: dict[str, tuple[list[str], Mapping[str, list[Any]]]] = {}
    for method, grid in sweeps:
        groups.setdefault(repr(grid), ([], grid))[0].append(method)
    commands = []
    for i, (methods, grid) in enumerate(groups.values()):
        directory = sweep_dir(study, f"{stage}{i}")
        overrides = [
            *launch,
            f"method={','.join(methods)}",
            f"seed={study.tune.get('seed', 0)}",
            "test=false",
            *(f"{key}={','.join(hydra_value(v) for v in values)}" for key, values in grid.items()),
            *(study.tune.get("overrides") or []),
            *extra,
        ]
        commands.append((train_command(study, overrides, directory), directory))
    return commands


def final_commands(
    study: Study, chosen: Mapping[str, dict[str, Any]], extra: Sequence[str], launch: Sequence[str]
) -> list[tuple[list[str], Path]]:
    """The study's own sweep (its seeds, on test): one per tuned method with its chosen values; the
    untuned methods together in one."""
    commands = []
    untuned = [m for m in study.methods if study.grid(m) is None]
    if untuned:
        directory = sweep_dir(study, "final")
        commands.append(
            (train_command(study, [*launch, f"method={','.join(untuned)}", *extra], directory), directory)
        )
    for method, values in chosen.items():
        directory = sweep_dir(study, f"final-{method}")
        overrides = [*launch, *chosen_overrides(method, values), *extra]
        commands.append((train_command(study, overrides, directory), directory))
    return commands


def check_commands(
    study: Study, chosen: Mapping[str, dict[str, Any]], extra: Sequence[str], launch: Sequence[str]
) -> list[tuple[list[str], Path]]:
    """The convergence check's sweeps (`mtpeft.study_check`): its methods with their chosen values, its
    seeds and ``check.overrides`` (after the command line's job overrides: they define the check), on test;
    untuned methods together in one sweep, tuned ones whose tuning chose nothing left out (logged)."""
    changes = [*extra, f"seed={','.join(check_seeds(study))}", *study.check["overrides"]]
    methods = check_methods(study)
    untuned = [m for m in methods if study.grid(m) is None]
    for method in (m for m in methods if m not in untuned and m not in chosen):
        log.warning("check: %s left out: its tuning chose no values (tuning.md)", method)
    commands = []
    if untuned:
        directory = sweep_dir(study, "check")
        overrides = [*launch, f"method={','.join(untuned)}", *changes]
        commands.append((train_command(study, overrides, directory), directory))
    for method in (m for m in methods if m in chosen and m not in untuned):
        directory = sweep_dir(study, f"check-{method}")
        overrides = [*launch, *chosen_overrides(method, chosen[method]), *changes]
        commands.append((train_command(study, overrides, directory), directory))
    return commands


def chosen_overrides(method: str, values: Mapping[str, Any]) -> list[str]:
    """``method=<m>``, the chosen values and ``++tuned={...}`` recording them (the tables' starred columns)."""
    record = ",".join(f"{key}:{hydra_value(value)}" for key, value in values.items())
    return [
        f"method={method}",
        *(f"{key}={hydra_value(value)}" for key, value in values.items()),
        f"++tuned={{{record}}}",
    ]


# -- choosing --------------------------------------------------------------------------------------
def _same(a: Any, b: Any) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b or str(a) == str(b)


def _grid_value(grid_values: Sequence[Any], value: Any) -> Any:
    return next((g for g in grid_values if _same(g, value)), None)


def _order(grid: Mapping[str, Sequence[Any]], values: Mapping[str, Any]) -> tuple:
    """Tie-break order: numbers by value, anything else by its position in the grid."""
    return tuple(
        values[k]
        if isinstance(values[k], int | float) and not isinstance(values[k], bool)
        else list(grid[k]).index(values[k])
        for k in grid
    )


Grids = dict[str, dict[str, list[Any] | None]]
"""Per tuned method its grid as it stands (widened values included): key -> values, or None for an Optuna
range (any value)."""


def declared_grids(study: Study) -> Grids:
    """Every tuned method's grid as the study declares it (Optuna ranges as None)."""
    return {
        method: {k: v if isinstance(v, list) else None for k, v in grid.items()}
        for method in study.methods
        if (grid := study.grid(method)) is not None
    }


def tuning_table(records: Sequence[dict[str, Any]], study: Study, grids: Grids | None = None) -> pd.DataFrame:
    """One row per tuning job of the current ``grids`` (default: the declared ones): method, each grid key,
    status, val scores, and ``widened``: the keys whose value lies beyond the declared grid (`widen_grids`)."""
    grids = declared_grids(study) if grids is None else grids
    rows = []
    for record in records:
        grid = grids.get(record["method"])
        if grid is None:
            continue
        flat = record["flat"]
        values = {k: flat.get(k) if vs is None else _grid_value(vs, flat.get(k)) for k, vs in grid.items()}
        if any(v is None for v in values.values()):
            continue  # a job from an older grid
        declared = study.grid(record["method"]) or {}
        widened = [
            k
            for k, v in values.items()
            if isinstance(declared.get(k), list) and _grid_value(declared[k], v) is None
        ]
        scores = {f"val_{task}": score for task, score in record["scores"].items()}
        rows.append(
            {
                "method": record["method"],
                **values,
                "status": record["status"],
                **scores,
                "widened": ",".join(widened),
            }
        )
    return pd.DataFrame(rows)


def choose(
    table: pd.DataFrame, study: Study, grids: Grids | None = None
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """(chosen values per method, problems): the best ``val_avg`` among successful jobs, ties broken by the
    smaller value (numbers) or the earlier one in the grid. Every method to tune must have one successful
    job. Values come back as the grid spells them (an int stays an int)."""
    grids = declared_grids(study) if grids is None else grids
    chosen, problems = {}, []
    for method in study.methods:
        grid = grids.get(method)
        if grid is None:
            continue
        mine = table[(table["method"] == method) & (table["status"] == "success")] if len(table) else table
        if mine.empty or mine["val_avg"].isna().all():
            problems.append(f"{method}: no successful tuning job (see the tuning sweep's results.json files)")
            continue
        best = mine["val_avg"].max()
        ties = [
            {k: row[k] if vs is None else _grid_value(vs, row[k]) for k, vs in grid.items()}
            for _, row in mine.iterrows()
            if math.isclose(row["val_avg"], best, abs_tol=1e-12)
        ]
        chosen[method] = min(ties, key=lambda values: _order(grid, values))
    return chosen, problems


# -- widening a grid at its edges ------------------------------------------------------------------
def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _geometric(values: Sequence[float]) -> bool:
    """Positive values spaced more evenly by ratio than by difference (two values: a ratio)."""
    if values[0] <= 0:
        return False
    steps = [b - a for a, b in zip(values, values[1:], strict=False)]
    ratios = [math.log(b / a) for a, b in zip(values, values[1:], strict=False)]
    return max(ratios) / min(ratios) <= max(steps) / min(steps)


def next_value(values: Sequence[Any], side: str) -> int | float | None:
    """The value beyond the ``low`` or ``high`` end of a numeric grid, continuing its last two steps:
    geometric for positive values spaced more evenly by ratio than by difference (two positive values:
    by ratio), else arithmetic. ``1e-3, 3e-3, 1e-2, 3e-2`` goes on with ``3e-4`` and ``0.1`` (then ``1e-4``,
    ``0.3``), ``2, 4, 8`` with ``1`` and ``16``, ``0.25, 0.5, 0.75`` with ``0`` and ``1``. None when there is
    no such value: fewer than two distinct numbers, a step across zero, or an integer grid whose next
    integer is not new. Floats are rounded to 12 significant digits
    (``0.1``, not ``0.09999999999999999``), so the same grid always gives the same job."""
    if not values or not all(_number(v) for v in values):
        return None
    grid = sorted(set(values))
    if len(grid) < 2:
        return None
    inward = grid if side == "low" else grid[::-1]  # the edge value first, then its neighbours
    a, b = inward[0], inward[1]
    c = inward[2] if len(inward) > 2 else None
    geometric = _geometric(grid)
    if geometric:
        value = a * b / c if c is not None else a * a / b
    else:
        value = a + b - c if c is not None else 2 * a - b
    if (a >= 0 > value) or (a <= 0 < value):
        return None  # never across zero
    if all(isinstance(v, int) for v in values):
        value = int(round(value))
        return None if value in grid or (geometric and value <= 0) else value
    return float(f"{value:.12g}")


def widen_grids(grids: Grids, chosen: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method, for every numeric grid key whose chosen value is the lowest or highest of its grid, the
    next value beyond that edge (`next_value`); methods and keys with an interior choice (or no next value)
    are left out. Empty: nothing to widen."""
    additions: dict[str, dict[str, Any]] = {}
    for method, values in chosen.items():
        for key, value in values.items():
            grid = grids[method].get(key)
            if grid is None or len(grid) < 2 or not all(_number(v) for v in grid):
                continue
            side = "low" if _same(value, min(grid)) else "high" if _same(value, max(grid)) else None
            new = next_value(grid, side) if side else None
            if new is not None:
                additions.setdefault(method, {})[key] = new
    return additions


def extension_sweeps(grid: Mapping[str, list[Any]], added: Mapping[str, Any]) -> list[dict[str, list[Any]]]:
    """The sweeps that run exactly the jobs a widened grid adds: per added key, its new value crossed with
    the other keys' values (keys widened earlier in this list with their old values only, so no job twice)."""
    sweeps, done = [], set()
    for key, value in added.items():
        sweeps.append(
            {
                k: [value] if k == key else list(vs) if k in done or k not in added else [*vs, added[k]]
                for k, vs in grid.items()
            }
        )
        done.add(key)
    return sweeps


def widened(grid: Mapping[str, list[Any]], added: Mapping[str, Any]) -> dict[str, list[Any]]:
    """``grid`` with each added value at its end of the key's values (below the lowest or above the
    highest)."""
    return {
        k: vs if k not in added else [added[k], *vs] if added[k] < min(vs) else [*vs, added[k]]
        for k, vs in grid.items()
    }


def write_tuning(
    table: pd.DataFrame, chosen: Mapping[str, dict[str, Any]], out: Path, title: str
) -> list[Path]:
    """``tuning.csv`` (every job) and ``tuning.md`` (per method, val scores in percent, the choice marked)."""
    out.mkdir(parents=True, exist_ok=True)
    table = table.copy()
    table["chosen"] = [
        row["method"] in chosen and all(_same(row[k], v) for k, v in chosen[row["method"]].items())
        for _, row in table.iterrows()
    ]
    table.to_csv(out / "tuning.csv", index=False)
    score_columns = [c for c in table.columns if c.startswith("val_")]
    bookkeeping = ("method", "trial", "status", "chosen", "widened", *score_columns)
    keys = [c for c in table.columns if c not in bookkeeping]
    trials = ["trial"] if "trial" in table.columns else []
    header = ["method", *trials, *keys, *(c.removeprefix("val_") for c in score_columns), "status", ""]
    how = (
        "Optuna TPE trials (tune.sampler: optuna), tuning seed"
        if trials
        else "Tuning seed; values marked ⁺ lie beyond the declared grid (its best was at an edge, so the grid "
        "was widened: tune.widen)"
    )
    lines = [
        f"# {title}: tuning grid",
        "",
        f"Validation score (%) of the best checkpoint. {how}. The chosen value per method is marked "
        "(highest val avg, ties broken by the smaller value).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for _, row in table.iterrows():
        marked = str(row.get("widened") or "").split(",")
        scores = ["—" if pd.isna(row[c]) else f"{100 * row[c]:.1f}" for c in score_columns]
        values = [
            ("—" if pd.isna(row[k]) else f"{row[k]:g}" if isinstance(row[k], float) else str(row[k]))
            + ("⁺" if k in marked else "")
            for k in keys
        ]
        number = [str(row["trial"])] if trials else []
        lines.append(
            "| "
            + " | ".join(
                [row["method"], *number, *values, *scores, row["status"], "chosen" if row["chosen"] else ""]
            )
            + " |"
        )
    edges = edge_choices(table, chosen)
    if edges:
        lines += [
            "",
            "**Chosen at an edge of what was tried** (the best may lie beyond it: `tune.widen` caps how far a "
            "grid grows): " + "; ".join(edges) + ".",
        ]
    (out / "tuning.md").write_text("\n".join(lines) + "\n")
    return [out / "tuning.md", out / "tuning.csv"]


def edge_choices(table: pd.DataFrame, chosen: Mapping[str, dict[str, Any]]) -> list[str]:
    """``<method>: <key>=<value> is the highest (lowest) value tried`` for every chosen numeric value at an
    end of the values its method's jobs tried (more than one; a failed job counts: a value beyond that
    diverged was tried)."""
    notes = []
    for method, values in chosen.items():
        mine = table[table["method"] == method]
        for key, value in values.items():
            tried = sorted({v for v in mine[key].tolist() if _number(v)}) if key in mine else []
            if len(tried) > 1 and _number(value) and value in (tried[0], tried[-1]):
                side = "lowest" if value == tried[0] else "highest"
                notes.append(f"{method}: {key}={value:g} is the {side} value tried")
    return notes


# -- the tuning stage ------------------------------------------------------------------------------
SweepRunner = Callable[[list[str], Path], int]
"""Runs one sweep command writing into a directory and returns its exit status (`run_sweep`)."""


@dataclass
class Tuning:
    """What the tuning stage did: every tuning job's row, the chosen values per method, problems."""

    table: pd.DataFrame
    chosen: dict[str, dict[str, Any]]
    problems: list[str]
    directories: list[Path]


@dataclass
class Tuner:
    """Runs a study's tuning sweeps through ``runner`` (`run_sweep`; a fake in tests), calling
    ``after_sweep`` after each (publishing), and chooses per method: `grid` or `optuna`."""

    study: Study
    extra: Sequence[str] = ()
    """Overrides for every job (the command line's)."""
    launch: Sequence[str] = ()
    """Launcher overrides (`launcher_overrides`)."""
    runner: SweepRunner = run_sweep
    after_sweep: Callable[[], None] = lambda: None
    parallel: int = 1
    """Parallel jobs: grid sweeps run at once while their jobs fit (`run_sweeps_in_slots`); Optuna: how many
    methods search at once (each one trial at a time)."""
    directories: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self) -> Tuning:
        return self.optuna() if self.study.sampler == "optuna" else self.grid()

    def sweep(self, sweeps: Sequence[tuple[str, Mapping[str, list[Any]]]], stage: str) -> list[Path]:
        """Run the tuning sweeps of ``(method, grid)`` pairs (`tuning_commands`), as many at once as their
        jobs fit in ``parallel`` (`run_sweeps_in_slots`); their directories."""
        commands = tuning_commands(self.study, self.extra, self.launch, sweeps, stage)

        def done(directory: Path, status: int) -> None:
            if status != 0:
                self.problems.append(f"tuning sweep {directory} exited non-zero (failed jobs?)")
            with self._lock:
                self.directories.append(directory)
                self.after_sweep()

        run_sweeps_in_slots(with_sizes(self.study, commands), self.parallel, self.runner, done)
        return [directory for _, directory in commands]

    def grid(self) -> Tuning:
        """Every grid point; then, up to ``tune.widen`` times, the next value beyond each numeric key's edge
        where a method's best value lies (`widen_grids`), until every best is interior."""
        grids = declared_grids(self.study)
        self.sweep(list(grids.items()), "tune")
        for round_ in range(1, self.study.widen + 1):
            table = tuning_table(load_runs(self.directories, split="val"), self.study, grids)
            additions = widen_grids(grids, choose(table, self.study, grids)[0])
            if not additions:
                break
            sweeps = []
            for method, added in additions.items():
                log.info(
                    "%s: best value at the edge of its grid; widening (round %d of at most %d) with %s",
                    method,
                    round_,
                    self.study.widen,
                    ", ".join(f"{k}={v}" for k, v in added.items()),
                )
                sweeps += [(method, grid) for grid in extension_sweeps(grids[method], added)]
                grids[method] = widened(grids[method], added)
            self.sweep(sweeps, f"tune-widen{round_}-")
        table = tuning_table(load_runs(self.directories, split="val"), self.study, grids)
        chosen, missing = choose(table, self.study, grids)
        return Tuning(in_grid_order(table, self.study), chosen, [*self.problems, *missing], self.directories)

    def optuna(self) -> Tuning:
        """An Optuna TPE search per method (`search`), ``parallel`` methods at a time."""
        grids = declared_grids(self.study)
        with ThreadPoolExecutor(max_workers=max(1, self.parallel)) as pool:
            tables = list(pool.map(lambda method: self.search(method, grids), grids))
        table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
        chosen, missing = choose(table, self.study, grids)
        return Tuning(table, chosen, [*self.problems, *missing], self.directories)

    def search(self, method: str, grids: Grids) -> pd.DataFrame:
        """``tune.trials`` trials of ``method``, asked one at a time of a TPE sampler seeded with the tuning
        seed, each an ordinary one-job sweep whose score is told back (a failed job: a failed trial). A
        re-run asks the same trials in the same order, so finished trials are skipped by their job hash
        and their scores replayed into the new search."""
        import optuna

        space = self.study.grid(method) or {}
        search = optuna.create_study(
            study_name=f"{self.study.name}:{method}",
            direction="maximize",
            sampler=optuna.samplers.TPESampler(seed=int(self.study.tune.get("seed", 0))),
        )
        rows = []
        for number in range(self.study.trials):
            trial = search.ask()
            params = {key: suggest(trial, key, spec) for key, spec in space.items()}
            stage = f"tune-optuna-{method}-{number}-"
            (directory,) = self.sweep([(method, {k: [v] for k, v in params.items()})], stage)
            row = tuning_table(load_runs([directory], split="val"), self.study, grids)
            value = (
                float(row["val_avg"].iloc[0]) if len(row) and row["status"].iloc[0] == "success" else math.nan
            )
            if math.isfinite(value):
                search.tell(trial, value)
            else:
                search.tell(trial, state=optuna.trial.TrialState.FAIL)
            rows.append(row.assign(trial=number))
        return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()


def in_grid_order(table: pd.DataFrame, study: Study) -> pd.DataFrame:
    """Rows by method (the study's order), then by the numeric grid keys' values, so a widened value sits
    next to the edge it extends."""
    if table.empty:
        return table
    order = {method: i for i, method in enumerate(study.methods)}
    bookkeeping = ("method", "status", "widened")
    keys = [
        c
        for c in table.columns
        if c not in bookkeeping and not c.startswith("val_") and pd.api.types.is_numeric_dtype(table[c])
    ]
    return table.sort_values(
        ["method", *keys], key=lambda c: c.map(order) if c.name == "method" else c, kind="stable"
    ).reset_index(drop=True)


def suggest(trial: Any, key: str, spec: list[Any] | Mapping[str, Any]) -> Any:
    """An Optuna trial's value for ``key``: a list is categorical, ``{low, high, log}`` a range (integers
    when both ends are)."""
    if isinstance(spec, list):
        return trial.suggest_categorical(key, spec)
    low, high, log = spec["low"], spec["high"], bool(spec.get("log", False))
    if isinstance(low, int) and isinstance(high, int):
        return trial.suggest_int(key, low, high, log=log)
    return trial.suggest_float(key, float(low), float(high), log=log)


# -- capacity probe --------------------------------------------------------------------------------
def steps_to_threshold(curve: pd.DataFrame, threshold: float) -> float:
    """The first logged step whose ``train/loss`` is <= ``threshold`` (NaN if never)."""
    reached = curve[curve["train/loss"] <= threshold]
    return float(reached["step"].iloc[0]) if len(reached) else math.nan


def capacity_table(records: Sequence[dict[str, Any]], threshold: float) -> pd.DataFrame:
    """Per run: method, seed, steps to the threshold, final and lowest training loss (from the CSV log)."""
    rows = []
    for record in records:
        path = next(
            (Path(record["path"]) / f for f in CURVE_FILES if (Path(record["path"]) / f).exists()), None
        )
        curve = pd.DataFrame()
        if path is not None:
            logged = pd.read_csv(path)
            if "train/loss" in logged:
                curve = logged[["step", "train/loss"]].dropna().sort_values("step")
        rows.append(
            {
                "method": record["method"],
                "seed": record["seed"],
                "status": record["status"],
                "steps_to_threshold": steps_to_threshold(curve, threshold) if len(curve) else math.nan,
                "final_loss": float(curve["train/loss"].iloc[-1]) if len(curve) else math.nan,
                "min_loss": float(curve["train/loss"].min()) if len(curve) else math.nan,
                "logged_steps": int(curve["step"].max()) if len(curve) else 0,
            }
        )
    columns = ["method", "seed", "status", "steps_to_threshold", "final_loss", "min_loss", "logged_steps"]
    return (
        pd.DataFrame(rows, columns=columns)
        .sort_values(["method", "seed"], kind="stable")
        .reset_index(drop=True)
    )


def write_capacity(table: pd.DataFrame, threshold: float, out: Path, title: str) -> list[Path]:
    """``capacity.csv`` and ``capacity.md``."""
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "capacity.csv", index=False)
    number = lambda v, fmt: "—" if pd.isna(v) else format(v, fmt)  # noqa: E731
    lines = [
        f"# {title}: capacity probe",
        "",
        f"One training batch (debug=overfit). Steps: the first logged step with training loss <= {threshold} "
        "(optimiser updates done before that loss; — = never within the budget).",
        "",
        "| method | seed | steps to threshold | final loss | lowest loss | steps run | status |",
        "|---|---|---|---|---|---|---|",
    ]
    for _, r in table.iterrows():
        lines.append(
            f"| {r['method']} | {r['seed']} | {number(r['steps_to_threshold'], '.0f')} | {number(r['final_loss'], '.3f')} "
            f"| {number(r['min_loss'], '.3f')} | {r['logged_steps']} | {r['status']} |"
        )
    (out / "capacity.md").write_text("\n".join(lines) + "\n")
    return [out / "capacity.md", out / "capacity.csv"]


# -- publishing ------------------------------------------------------------------------------------
PUBLISHED_FILES = (RESULTS_FILE, SCORES_FILE, ".hydra/config.yaml", ".hydra/overrides.yaml")
"""What a published run keeps, with its metrics CSV (as ``metrics.csv``): small files only, never
checkpoints, adapters or wandb directories."""
NAME_SKIPPED = frozenset({"experiment", "launcher", "method", "seed", "tuned", "test"})
"""Override keys left out of a published run's name (named elsewhere in it, or the stage), with every key
under a bookkeeping section (`IGNORED_TOP_LEVEL`: paths, hydra, logger, ...). ``method.*`` keys stay."""
NAME_VALUES_MAX = 60
"""At most this many characters of override values in a published run's name (the hash keeps it unique)."""
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]+")


def _override_values(path: Path) -> list[str]:
    """``key=value`` parts of a job's ``.hydra/overrides.yaml`` that tell it apart (last key part only)."""
    try:
        overrides = yaml.safe_load(path.read_text()) or []
    except (OSError, yaml.YAMLError):
        return []
    parts = []
    for text in overrides if isinstance(overrides, list) else []:
        key, _, value = str(text).partition("=")
        key = key.lstrip("+")
        if key.startswith("~") or key in NAME_SKIPPED or key.split(".")[0] in IGNORED_TOP_LEVEL or not value:
            continue
        parts.append(f"{key.split('.')[-1]}={value}")
    return parts


def published_name(run_dir: Path, log_root: Path, results: Mapping[str, Any], identity: str) -> str:
    """A run's directory name among the published ones: ``[<stage>_]<method>[_<key>=<value>...]_s<seed>_
    <first 8 digits of its job hash>``, e.g. ``tune_lora_lr=0.01_s0_3f2a9c1e``: the stage from the sweep
    directory of this runner between ``log_root`` and ``run_dir``, the values from the job's overrides."""
    stage = run_stage(run_dir, log_root)
    config = results.get("config") or {}
    method = results.get("method") or (config.get("method") or {}).get("name") or "run"
    seed = results.get("seed", config.get("seed"))
    values: list[str] = []
    for part in _override_values(run_dir / ".hydra" / "overrides.yaml"):
        if sum(len(v) + 1 for v in values) + len(part) > NAME_VALUES_MAX:
            break
        values.append(part)
    parts = [stage, str(method), *values, f"s{seed}" if seed is not None else None, identity[:8]]
    return _UNSAFE.sub("-", "_".join(p for p in parts if p))


def _copy_run(run_dir: Path, destination: Path) -> None:
    """Copy the small files of ``run_dir`` into ``destination`` via a temporary sibling (a kill never
    leaves a half-published run); modification times are kept (tables prefer the newest run)."""
    staging = destination.with_name(f".{destination.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    curves = next((run_dir / f for f in CURVE_FILES if (run_dir / f).is_file()), None)
    files = {name: run_dir / name for name in PUBLISHED_FILES if (run_dir / name).is_file()}
    if curves is not None:
        files["metrics.csv"] = curves
    for name, source in files.items():
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, staging / name)
    staging.rename(destination)


def publish(log_root: Path, published: Path) -> tuple[list[Path], int]:
    """Copy every successful run under ``log_root`` into ``published/<name>/`` (`published_name`, small
    files only: `PUBLISHED_FILES`), unless a run of the same job is already published there. Returns (the
    new directories, how many runs were published before). Idempotent: re-publishing copies nothing."""
    log_root, published = Path(log_root).resolve(), Path(published).resolve()
    published.mkdir(parents=True, exist_ok=True)
    for leftover in published.glob(".*.tmp"):  # from a publish that was killed
        shutil.rmtree(leftover, ignore_errors=True)
    known = {run_identity(results): directory for directory, results in run_records(published)}
    new, before = [], 0
    for run_dir, results in run_records(log_root):
        if results.get("status") != "success" or published in run_dir.parents:
            continue
        identity = run_identity(results)
        if identity is None:
            continue  # no config: not a run record
        if identity in known:
            before += 1
            continue
        name = published_name(run_dir, log_root, results, identity)
        if (published / name).exists():
            raise SystemExit(
                f"cannot publish {run_dir}: {published / name} exists and holds another run "
                "(a hash-prefix clash or a hand-made directory); move it away and publish again"
            )
        _copy_run(run_dir, published / name)
        known[identity] = published / name
        new.append(published / name)
    return new, before


def check_published_bases(name: str, task_name: str, published: Path | None) -> None:
    """Refuse to add runs to a study directory whose published runs were made on another base model.

    A job's identity includes its base (``inputs.base``: `mtpeft.models.identity.base_identity`, the digest of
    the weight files and the dtype), so on a machine that builds another tiny base every job runs again; its
    runs would then be published and tabled next to the other base's runs of the same configs. Each published
    run's base is compared with what this machine loads for that run's ``model`` config; runs recorded before
    the base was part of the identity have none and count as another base. Raises SystemExit naming the
    directory, both bases and what to do."""
    from mtpeft.models.identity import base_identity

    if published is None or not published.is_dir():
        return
    here: dict[str, Any] = {}
    other: dict[str, int] = {}
    for _, results in run_records(published):
        model = (results.get("config") or {}).get("model")
        if results.get("status") != "success" or not isinstance(model, dict):
            continue
        key = json.dumps(model, sort_keys=True, default=str)
        if key not in here:
            here[key] = base_identity(model)
        recorded = (results.get("inputs") or {}).get("base")
        if recorded != here[key]:
            label = json.dumps(recorded, sort_keys=True) if recorded else "unrecorded"
            other[label] = other.get(label, 0) + 1
    if other:
        bases = "; ".join(f"{count} run(s) on {label}" for label, count in sorted(other.items()))
        mine = "; ".join(json.dumps(base, sort_keys=True) for base in here.values())
        suffix = re.sub(r"[^0-9A-Za-z]", "", next(iter(here.values()))["weight_files"])[:8]
        raise SystemExit(
            f"study {name!r}: {published} holds runs made on another base model ({bases}); "
            f"this machine's base is {mine} (a tiny model that is not shipped is pre-trained on each machine, "
            "and CPUs with other kernels build other weights; 'unrecorded': published before the base was part of a "
            "job's identity). Running here would put two bases in one table. Run the study into its own "
            f"directory: python -m mtpeft.study {name} task_name={task_name}_{suffix} "
            f"(tables in experiments/{task_name}_{suffix}/), or move the published runs away."
        )


def publish_study(study: Study) -> list[Path]:
    """Publish the finished runs of ``study`` (`publish`) and log what was done."""
    if study.published_dir is None:
        return []
    new, before = publish(study.log_dir / study.task_name, study.published_dir)
    log.log(
        logging.INFO if new else logging.DEBUG,
        "published %d new run(s) to %s (%d were there already); commit it to keep them",
        len(new),
        study.published_dir,
        before,
    )
    return new


PUBLISH_EVERY_S = 300.0
"""While sweeps run, their finished runs are also published this often (seconds): a tuning sweep of a real
model takes hours, and a study stopped part-way keeps what finished (commit ``experiments/<name>/runs/``)."""


class Publisher:
    """Publishes a study's finished runs when called (after each sweep) and, inside ``with``, every
    `PUBLISH_EVERY_S` seconds from a background thread; one publication at a time. ``published``: every run
    it copied."""

    def __init__(self, study: Study, enabled: bool = True) -> None:
        self.study = study
        self.enabled = enabled and study.published_dir is not None
        self.published: list[Path] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __call__(self) -> None:
        if self.enabled:
            with self._lock:
                self.published += publish_study(self.study)

    def _every_while_running(self) -> None:
        while not self._stop.wait(PUBLISH_EVERY_S):
            try:
                self()
            except Exception as err:  # noqa: BLE001 - the sweep goes on; the next publication retries
                log.warning("publishing finished runs while the sweep runs failed: %s", err)

    def __enter__(self) -> Publisher:
        if self.enabled:
            self._thread = threading.Thread(target=self._every_while_running, name="publisher", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop the background publication and publish once more (a study stopped part-way keeps what
        finished since the last publication)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self()
        except Exception as err:  # noqa: BLE001 - do not hide the exception that ended the study
            log.warning("publishing finished runs at the end failed: %s", err)


# -- the whole study -------------------------------------------------------------------------------
def run_study(
    name: str,
    overrides: Sequence[str] = (),
    launcher: str = "auto",
    n_jobs: int = 2,
    out: Path | None = None,
    plots: bool = True,
    publish_runs: bool = True,
) -> dict[str, Any]:
    """Tune (if declared), choose, run the final sweeps, write the tables; return what was done.

    After each sweep, and every `PUBLISH_EVERY_S` seconds while one runs, the study's finished runs are
    published (`Publisher`; ``publish_runs=False``: not), so committing ``experiments/`` keeps what finished
    even if the study is stopped later."""
    study, parts = study_from_command(name, overrides)
    check_published_bases(name, study.task_name, study.published_dir)
    root = Path(os.environ.get("MTPEFT_ROOT", "."))
    out = out or root / "experiments" / study.task_name
    launch = launcher_overrides(launcher, n_jobs)
    chosen: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    files: list[Path] = []
    final_dirs: list[Path] = []
    check_dirs: list[Path] = []
    with stop_on_signals(), Publisher(study, publish_runs) as publish:
        if study.tune is not None:
            tuning = Tuner(
                study, parts.jobs, launch, after_sweep=publish, parallel=n_jobs if launch else 1
            ).run()
            chosen = tuning.chosen
            problems += tuning.problems
            files += write_tuning(tuning.table, chosen, out, name)
            for note in edge_choices(tuning.table, chosen):
                log.warning("tuning: %s (the best may lie beyond; tune.widen caps the widening)", note)
            for method, values in chosen.items():
                log.info("tuned %s: %s", method, ", ".join(f"{k}={v}" for k, v in values.items()))
        slots = n_jobs if launch else 1

        def done(directory: Path, status: int) -> None:
            if status != 0:
                problems.append(f"sweep {directory} exited non-zero (failed jobs?)")
            publish()

        finals = final_commands(study, chosen, [*parts.seeds, *parts.jobs], launch)
        checks = check_commands(study, chosen, parts.jobs, launch) if study.check else []
        for commands, directories in ((finals, final_dirs), (checks, check_dirs)):
            directories += [directory for _, directory in commands]
            run_sweeps_in_slots(with_sizes(study, commands), slots, run_sweep, done)
    if SWEEPS.stopped is not None:  # a stop during the last sweep, after its jobs were done
        raise StudyStopped(SWEEPS.stopped)
    if study.probe is not None:
        threshold = float(study.probe.get("loss_threshold", 0.1))
        records = load_runs(final_dirs, split="val")
        files += write_capacity(capacity_table(records, threshold), threshold, out, name)
    else:
        extra_plots = declared_plots(name, CONF_DIR)  # the study's own plots (report.plots)
        files += summarise(final_dirs, out, name, plots=plots, extra_plots=extra_plots)["files"]
    if check_dirs:
        files += write_check(study, final_dirs, check_dirs, out, plots)
    return {
        "study": study,
        "chosen": chosen,
        "problems": problems,
        "files": files,
        "sweeps": final_dirs,
        "check_sweeps": check_dirs,
        "published": publish.published,
    }


def publish_main(name: str, overrides: Sequence[str]) -> int:
    """``--publish``: publish the finished runs of study ``name`` (any experiment config; ``task_name`` and
    ``paths.*`` overrides respected) and print where they went."""
    cfg = compose_study(name, split_overrides(overrides).jobs)
    log_root, published = study_roots(cfg)
    check_published_bases(name, str(cfg.task_name), published)
    if not log_root.is_dir():
        print(f"nothing to publish: {log_root} does not exist (no run of {name!r} in this checkout)")
        return 0
    new, before = publish(log_root, published)
    print(f"published {len(new)} new run(s) to {published} ({before} were there already)")
    if new:
        print(f"keep them: git add {published} && git commit -m 'publish {name} runs'")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtpeft.study", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="a study: conf/experiment/<name>.yaml")
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides for every job (e.g. trainer.max_steps=600)"
    )
    parser.add_argument(
        "--launcher", choices=["auto", "joblib", "basic"], default="auto", help="default: joblib if installed"
    )
    parser.add_argument("--n-jobs", type=int, default=2, help="parallel jobs with joblib (default 2)")
    parser.add_argument("--out", type=Path, help="tables here instead of experiments/<name>/")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    parser.add_argument(
        "--publish",
        action="store_true",
        help="only copy the study's finished runs from logs/<task_name>/ to experiments/<task_name>/runs/ "
        "(small files; a fresh checkout then skips them) and exit",
    )
    parser.add_argument(
        "--no-publish", action="store_true", help="do not publish finished runs (during and after each sweep)"
    )
    parser.add_argument(
        "--status",
        action="store_true",
        help="only say where the study stands (finished, running with their step, interrupted, failed jobs "
        "per stage, from logs/ and the published runs) and exit",
    )
    args = parser.parse_intermixed_args(argv)
    if args.publish:
        return publish_main(args.name, args.overrides)
    if args.status:
        from mtpeft.study_status import study_status

        parallel = args.n_jobs if launcher_overrides(args.launcher, args.n_jobs) else 1
        study = study_from_command(args.name, args.overrides)[0]
        print(study_status(study, declared_jobs(study), parallel))
        return 0
    try:
        return _run_main(args)
    except StudyStopped as stop:
        print(
            f"study {args.name} {stop}: run the same command again to resume (finished jobs are skipped, "
            "interrupted ones resume from their last checkpoint)",
            file=sys.stderr,
        )
        return 128 + stop.signum


def _run_main(args: argparse.Namespace) -> int:
    """Run the study of the parsed command line; print what was chosen, written and went wrong."""
    result = run_study(
        args.name,
        args.overrides,
        args.launcher,
        args.n_jobs,
        args.out,
        not args.no_plots,
        publish_runs=not args.no_publish,
    )
    for method, values in result["chosen"].items():
        print(f"chosen for {method}: " + ", ".join(f"{k}={v}" for k, v in values.items()))
    print(f"wrote {len(result['files'])} files, e.g. {result['files'][0] if result['files'] else '-'}")
    for problem in result["problems"]:
        print(f"problem: {problem}", file=sys.stderr)
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
