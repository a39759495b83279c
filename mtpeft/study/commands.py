"""The commands of a study's stages: one ``python -m mtpeft.train -m`` sweep per tuning grid, per tuned
method (final, check) and for the untuned methods together (split by seed when jobs run side by side,
`one_sweep_per_seed`), and how many jobs each launches."""

from __future__ import annotations

import importlib.util
import logging
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mtpeft.study.check import check_methods, check_seeds
from mtpeft.study.config import Study, sweep_values
from mtpeft.study.stages import sweep_dir_name
from mtpeft.study.sweeps import Sweep
from mtpeft.study.unfinished import job_overrides, jobs_to_run, sweep_arguments, with_slots

log = logging.getLogger(__name__)
_PLAIN = re.compile(r"^[A-Za-z0-9_.\-+/]+$")
SWEEP_DIR = "hydra.sweep.dir="


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
    """How many jobs a ``mtpeft.train -m`` command of this runner launches (`job_overrides`: its overrides
    over the study's sweeper params, its methods, seeds and other swept keys, as Hydra's basic sweeper
    expands them)."""
    return len(job_overrides(study, command))


def with_sizes(study: Study, commands: Sequence[tuple[list[str], Path]], slots: int) -> list[Sweep]:
    """The `Sweep` s of ``commands`` for `mtpeft.study.sweeps.run_sweeps_in_slots` on ``slots`` parallel jobs:
    their jobs (`sweep_size`) and, where several sweeps share the slots, those that will run (`jobs_to_run`;
    a sweep then launches at most that many at once, `with_slots`)."""
    sweeps = []
    for command, directory in commands:
        jobs = sweep_size(study, command)
        to_run = jobs_to_run(study, command) if len(commands) > 1 and slots > 1 and jobs > 1 else None
        if to_run is not None and to_run < slots:
            command = with_slots(command, max(1, to_run))
        sweeps.append(Sweep(command, directory, jobs, to_run))
    return sweeps


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
    return study.runs_dir / "multiruns" / sweep_dir_name(stage)


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
        f"{SWEEP_DIR}{hydra_value(str(directory))}",
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


def one_sweep_per_seed(
    study: Study, commands: Sequence[tuple[list[str], Path]]
) -> list[tuple[list[str], Path]]:
    """Each of ``commands`` that sweeps several seeds as one sweep per seed, in seed order: ``seed=<s>`` after
    its own overrides, its directory suffixed ``-s<s>``; the others as they are.

    A sweep runs its jobs on the slots it starts with (Hydra's joblib launcher cannot grow), and
    `mtpeft.study.sweeps.run_sweeps_in_slots` starts the next sweep only when its jobs fit: a method's 3 seeds
    on 2 slots run two jobs, then the third beside an idle core, while the next method waits for both. One
    sweep per seed lets the slots fill job by job: 12 runs of 4 methods take 6 run lengths instead of 8."""
    split = []
    for command, directory in commands:
        seeds = command_seeds(study, command)
        if len(seeds) < 2:
            split.append((list(command), directory))
            continue
        kept = [a for a in command if not a.startswith(SWEEP_DIR)]
        for seed in seeds:
            own = directory.with_name(f"{directory.name}-s{seed}")
            split.append(([*kept, f"seed={hydra_value(seed)}", f"{SWEEP_DIR}{hydra_value(str(own))}"], own))
    return split


def command_seeds(study: Study, command: Sequence[str]) -> list[str]:
    """The seeds a ``mtpeft.train -m`` command of this runner sweeps: its last ``seed=`` override's values,
    else the study's (its sweeper params)."""
    given = [a.split("=", 1)[1] for a in sweep_arguments(command) if a.startswith("seed=")]
    return sweep_values("seed", given[-1]) if given else list(study.seeds)


def check_commands(
    study: Study, chosen: Mapping[str, dict[str, Any]], extra: Sequence[str], launch: Sequence[str]
) -> list[tuple[list[str], Path]]:
    """The convergence check's sweeps (`mtpeft.study.check`): its methods with their chosen values, its
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
