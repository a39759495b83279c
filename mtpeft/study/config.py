"""A study's declaration: its experiment config composed and read (`Study`, `load_study`), the command
line's overrides sorted (`split_overrides`), and Hydra's expansion of sweeps (`sweep_jobs`)."""

from __future__ import annotations

import importlib.util
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from mtpeft.study.check import validate_check, validate_check_effect, validate_check_seeds
from mtpeft.utils.sweep import finished_roots

CONF_DIR = Path(__file__).resolve().parent.parent.parent / "conf"
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
    """The convergence check (`mtpeft.study.check`), or None."""
    runner_keys: list[str] = field(default_factory=list)
    other_params: list[str] = field(default_factory=list)
    """The study's other sweeper params (``hydra.sweeper.params`` but ``method`` and ``seed``, as ``key=value``
    texts): every stage's sweeps run them too, unless the stage sets the key (``methods_mix3_long``:
    ``trainer.max_steps=1200,2400``)."""
    job_overrides: list[str] = field(default_factory=list)
    """The command line's overrides for every job (`Overrides.jobs`), which its sweeps add last."""

    @property
    def runs_dir(self) -> Path:
        """Where the study's jobs write their runs: ``<paths.log_dir>/<task_name>``."""
        return self.log_dir / self.task_name

    @property
    def roots(self) -> list[Path]:
        """Where its runs are found (the roots a job looks in for its finished twin): `runs_dir`, then the
        published runs when ``published_dir`` is set."""
        return [self.runs_dir, *([self.published_dir] if self.published_dir is not None else [])]

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
        if key in ("method", "seed") and not text.startswith(f"{key}="):
            raise SystemExit(
                f"{text}: the study sweeps {key} itself; give {key}=<values> (e.g. {key}=a,b) without a "
                "prefix (~, + or ++)"
            )
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


def study_roots(cfg: DictConfig) -> tuple[Path, Path | None]:
    """(where the study's runs are written, where its published runs go): ``<paths.log_dir>/<task_name>``
    and ``<paths.published_dir>/<task_name>/runs`` (the roots `mtpeft.train` looks in for finished jobs);
    None for the second when ``paths.published_dir`` is empty (nothing is published)."""
    log_root, *published = finished_roots(cfg)
    return log_root.resolve(), published[0].resolve() if published else None


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
    ``seed=`` included), and the sorted overrides; what `mtpeft.study.runner.run_study` runs and ``--status``
    counts."""
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


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
