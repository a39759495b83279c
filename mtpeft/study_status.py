"""Where a study stands: ``python -m mtpeft.study <name> --status``.

A study on a real model runs for many hours, across sessions and machines, and its runs live in two places:
this checkout's ``logs/<task_name>/`` (running, interrupted, failed and finished runs) and the published
``experiments/<task_name>/runs/`` (finished runs of earlier sessions). `study_status` reads both and says,
per stage, how many jobs finished of how many the study declares, which are running now and how far (the
step of their last checkpoint), which were interrupted (a re-run resumes them from that step) and which
failed. It reads run records and the step of the last checkpoints (memory-mapped, so only their small
header is read): nothing is composed per job and no model is loaded, so it is quick while the study's jobs
keep the CPU busy.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtpeft.results.load import flatten
from mtpeft.study_check import check_methods, check_seeds
from mtpeft.study_stages import STAGES, run_stage
from mtpeft.utils.resume import CHECKPOINT_DIR, LAST_CHECKPOINT, load_checkpoint
from mtpeft.utils.runlock import is_locked
from mtpeft.utils.sweep import RESULTS_FILE, run_identity, run_records

if TYPE_CHECKING:
    from mtpeft.study import Study

FINISHED, RUNNING, INTERRUPTED, FAILED = "finished", "running", "interrupted", "failed"
STATES = (FINISHED, RUNNING, INTERRUPTED, FAILED)
"""A job's state, best first: of several records of one job (a run, its resumed successor, a published
copy) the best one stands for it."""


@dataclass(frozen=True)
class JobState:
    """One job of a study as its best record shows it."""

    stage: str
    method: str
    values: str
    """The tuned values (``optimizer.lr=0.001``) of the job, or ``-``."""
    seed: Any
    state: str
    step: int | None
    """Optimiser steps done: the last checkpoint's (running, interrupted) or the budget (finished)."""
    max_steps: int | None
    wall_time_s: float | None
    """Of a finished run; None for one resumed from another's checkpoint (it timed only its own part)."""
    updated: datetime
    directory: Path


def record_state(directory: Path, record: Mapping[str, Any]) -> str | None:
    """`STATES` entry of a run record, or None for a record that stands for nothing (superseded by the run
    that took it over)."""
    status = record.get("status")
    if status == "success":
        return FINISHED
    if status == "failed":
        return FAILED
    if status == "running" and "superseded_by" not in record:
        return RUNNING if is_locked(directory) else INTERRUPTED
    return None


def last_checkpoint_step(directory: Path) -> int | None:
    """The optimiser step of ``checkpoints/last.ckpt`` in a run directory (memory-mapped: only the small
    header is read), or None."""
    path = directory / CHECKPOINT_DIR / LAST_CHECKPOINT
    if not path.is_file():
        return None
    try:
        checkpoint = load_checkpoint(path, mmap=True)
    except Exception:  # noqa: BLE001 - a checkpoint being written or cut short: no step to show
        return None
    step = checkpoint.get("global_step")
    return int(step) if step is not None else None


def last_written(directory: Path) -> datetime:
    """When a run last wrote its record or its last checkpoint."""
    files = [directory / RESULTS_FILE, directory / CHECKPOINT_DIR / LAST_CHECKPOINT]
    return datetime.fromtimestamp(max(f.stat().st_mtime for f in files if f.exists()))


def tuned_values(config: Mapping[str, Any], study: Study, method: str) -> str:
    """``key=value`` of the method's tuning keys in a run's config (the grid's keys), or ``-``."""
    flat = flatten(dict(config))
    parts = [f"{key}={flat[key]}" for key in study.grid(method) or {} if flat.get(key) is not None]
    return ", ".join(parts) or "-"


def job_state(study: Study, directory: Path, root: Path, record: Mapping[str, Any]) -> JobState | None:
    """The `JobState` of one run record (None if it stands for nothing, or is not the runner's)."""
    state = record_state(directory, record)
    stage = run_stage(directory, root)
    if state is None or stage is None:
        return None
    config = record.get("config") or {}
    method = str(record.get("method") or (config.get("method") or {}).get("name") or "?")
    max_steps = (config.get("trainer") or {}).get("max_steps")
    step = max_steps if state == FINISHED else last_checkpoint_step(directory)
    return JobState(
        stage=stage,
        method=method,
        values=tuned_values(config, study, method),
        seed=record.get("seed", config.get("seed")),
        state=state,
        step=step,
        max_steps=max_steps,
        wall_time_s=None if record.get("resumed_from") else record.get("wall_time_s"),
        updated=last_written(directory),
        directory=directory,
    )


def _rank(job: JobState) -> tuple[int, int, float]:
    """Smaller is better: the state (`STATES` order), then the most steps done, then the newest."""
    return STATES.index(job.state), -(job.step if job.step is not None else -1), -job.updated.timestamp()


def study_jobs(study: Study) -> list[JobState]:
    """Every job of ``study`` found in its logs and published runs, one `JobState` per job (its best
    record: finished over running over interrupted over failed, then the most steps done, then the
    newest), in stage order."""
    roots = [study.log_dir / study.task_name]
    if study.published_dir is not None:
        roots.append(study.published_dir)
    best: dict[str, JobState] = {}
    for root in roots:
        for directory, record in run_records(root):
            job = job_state(study, directory, root, record)
            identity = run_identity(record)
            if job is None or identity is None:
                continue
            known = best.get(identity)
            if known is None or _rank(job) < _rank(known):
                best[identity] = job
    return sorted(best.values(), key=lambda j: (STAGES.index(j.stage), j.method, j.values, str(j.seed)))


def declared_jobs(study: Study) -> dict[str, int]:
    """How many jobs each stage declares: every tuned method's grid points (before widening) or, with the
    Optuna sampler, its ``tune.trials``; a job per method and seed in the final stage and in the check;
    each times the values of the study's other swept keys the stage does not set (`Study.other_params`)."""
    tuned = 0
    for method in study.methods:
        grid = study.grid(method)
        if grid is None:
            continue
        points = study.trials if study.sampler == "optuna" else _grid_points(grid)
        tuned += points * _variants(study, set(grid))
    checked = 0
    if study.check is not None:
        fixed = set(check_overrides(study))
        checked = len(check_methods(study)) * len(check_seeds(study)) * _variants(study, fixed)
    final = len(study.methods) * max(1, len(study.seeds)) * _variants(study, set())
    return {"tune": tuned, "final": final, "check": checked}


def _grid_points(grid: Mapping[str, Any]) -> int:
    return math.prod(len(v) if isinstance(v, list) else 1 for v in grid.values())


def _variants(study: Study, fixed: set[str]) -> int:
    """Jobs per method and seed: the values of the study's other swept keys not in ``fixed``."""
    return math.prod(n for key, n in study.other_params.items() if key not in fixed)


def _median(seconds: Iterable[float | None]) -> float | None:
    values = [s for s in seconds if s is not None]
    return statistics.median(values) if values else None


def _part_left(job: JobState) -> float:
    """The part of a started job's budget not done (all of it when its step or budget is unknown)."""
    if not job.step or not job.max_steps or job.max_steps <= 0:
        return 1.0
    return max(0.0, 1 - job.step / job.max_steps)


def check_overrides(study: Study) -> dict[str, Any]:
    """``check.overrides`` as key -> value (single values: `validate_check` refuses sweeps)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [str(o) for o in (study.check or {}).get("overrides") or []]
    parsed = OverridesParser.create().parse_overrides(overrides)
    return {o.key_or_group: o.value() for o in parsed if not o.is_sweep_override()}


def check_budget(study: Study) -> int | None:
    """The optimiser steps ``check.overrides`` give the check's jobs (``trainer.max_steps=N``), else None."""
    steps = check_overrides(study).get("trainer.max_steps")
    return int(steps) if steps is not None else None


def _budget_factor(study: Study, stage: str, finished: list[JobState]) -> float:
    """How much longer a run of ``stage`` is than the finished runs: the check's ``trainer.max_steps`` over
    their median budget; 1 for the other stages (they share the study's budget) or when unknown."""
    steps = check_budget(study) if stage == "check" else None
    median_steps = _median(j.max_steps for j in finished)
    return steps / median_steps if steps and median_steps else 1.0


def work_left(study: Study, jobs: list[JobState], n_jobs: int = 2) -> str | None:
    """One line: the runs left per stage (a running or interrupted job counts for the part of its budget it
    has not done) times the median wall time of the stage's finished runs, in hours, and over ``n_jobs``
    parallel jobs. A stage with no finished run yet is timed by all finished runs, scaled by its budget
    for the check (`check_budget`): a lower bound for the final stage, which adds the test split, and a
    rough one for the check, whose validations do not scale with its steps; widening adds runs nobody can
    count ahead. None when nothing is left."""
    declared = declared_jobs(study)
    finished = [j for j in jobs if j.state == FINISHED]
    overall = _median(j.wall_time_s for j in finished)
    parts, total, borrowed, scaled = [], 0.0, [], []
    for stage in STAGES:
        of_stage = [j for j in jobs if j.stage == stage]
        done = sum(j.state == FINISHED for j in of_stage)
        partial = [j for j in of_stage if j.state in (RUNNING, INTERRUPTED)]
        redo = sum(j.state == FAILED for j in of_stage)
        fresh = max(0, declared[stage] - done - len(partial) - redo)
        runs = fresh + redo + sum(_part_left(j) for j in partial)
        if runs <= 0:
            continue
        median = _median(j.wall_time_s for j in of_stage if j.state == FINISHED)
        if median is None:
            if overall is None:
                return "left: no finished run to time yet"
            factor = _budget_factor(study, stage, finished)
            if factor == 1:
                borrowed.append(stage)
            else:
                scaled.append(f"{stage} (x{factor:.3g})")
            median = overall * factor
        parts.append(f"{stage} {runs:.1f}")
        total += runs * median
    if not parts:
        return None
    notes = [f"{'/'.join(borrowed)} timed by the other stages' runs: a lower bound"] if borrowed else []
    notes += [f"{s} timed by the other stages' runs, scaled by its trainer.max_steps: rough" for s in scaled]
    tuning_over = any(j.stage != "tune" for j in jobs)
    if study.tune is not None and study.sampler == "grid" and study.widen and not tuning_over:
        notes.append("widening may add tuning runs")
    return (
        f"left: about {total / 3600:.1f} h of runs ({', '.join(parts)} runs x their stage's median wall time),"
        f" {total / 3600 / max(1, n_jobs):.1f} h at {n_jobs} parallel jobs" + "".join(f"; {n}" for n in notes)
    )


def _minutes(seconds: Iterable[float | None]) -> str:
    median = _median(seconds)
    return f"{median / 60:.0f} min" if median is not None else "-"


def format_status(study: Study, jobs: list[JobState], n_jobs: int = 2) -> str:
    """A summary line per stage, the work left (`work_left`) and a table of the jobs that are not
    finished."""
    declared = declared_jobs(study)
    lines = [
        f"study {study.name} (runs: {study.log_dir / study.task_name}, published: {study.published_dir})"
    ]
    for stage in STAGES:
        if (stage == "tune" and study.tune is None) or (stage == "check" and study.check is None):
            continue
        of_stage = [j for j in jobs if j.stage == stage]
        counts = ", ".join(f"{sum(j.state == s for j in of_stage)} {s}" for s in STATES)
        widens = stage == "tune" and study.sampler == "grid" and study.widen
        extra = " (+ values added by widening at a grid edge)" if widens else ""
        finished = [j.wall_time_s for j in of_stage if j.state == FINISHED]
        lines.append(
            f"{stage}: {counts}; declared {declared[stage]}{extra}; median wall time of a finished run "
            f"{_minutes(finished)}"
        )
    left = work_left(study, jobs, n_jobs)
    if left:
        lines.append(left)
    pending = [j for j in jobs if j.state != FINISHED]
    if pending:
        lines += [
            "",
            "| stage | method | values | seed | state | step | updated | directory |",
            "|---" * 8 + "|",
        ]
        for j in pending:
            step = f"{'-' if j.step is None else j.step}/{j.max_steps}"
            lines.append(
                f"| {j.stage} | {j.method} | {j.values} | {j.seed} | {j.state} | {step} "
                f"| {j.updated:%Y-%m-%d %H:%M} | {j.directory} |"
            )
    if any(j.state in (INTERRUPTED, FAILED) for j in jobs):
        lines += [
            "",
            f"re-run `python -m mtpeft.study {study.name}` to resume the interrupted and redo the failed",
        ]
    return "\n".join(lines)


def study_status(study: Study, n_jobs: int = 2) -> str:
    """`format_status` of `study_jobs` (``n_jobs``: the runner's parallel jobs, for the time left)."""
    return format_status(study, study_jobs(study), n_jobs)
