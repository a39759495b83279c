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

import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtpeft.results.load import flatten
from mtpeft.study.check import check_budget
from mtpeft.study.stages import STAGES, run_stage
from mtpeft.utils.resume import CHECKPOINT_DIR, LAST_CHECKPOINT, load_checkpoint
from mtpeft.utils.runlock import is_locked
from mtpeft.utils.sweep import RESULTS_FILE, run_identity, run_records

if TYPE_CHECKING:
    from mtpeft.study.config import Study

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
    """Of a finished run that trained; None for one resumed from another's checkpoint (it timed only its own
    part) and for one that trained nothing (a zero-shot run's evaluation does not time a trained run's)."""
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
        wall_time_s=None if untimed(record) else record.get("wall_time_s"),
        updated=last_written(directory),
        directory=directory,
    )


def untimed(record: Mapping[str, Any]) -> bool:
    """Whether a run's wall time says nothing of a run of its stage: it resumed another's checkpoint, or it
    trained nothing (``trainable_params: 0``, e.g. ``method=none``: evaluation only, 20 minutes where a
    trained SmolLM2 final takes 50)."""
    return bool(record.get("resumed_from")) or record.get("trainable_params") == 0


def _rank(job: JobState) -> tuple[int, int, float]:
    """Smaller is better: the state (`STATES` order), then the most steps done, then the newest."""
    return STATES.index(job.state), -(job.step if job.step is not None else -1), -job.updated.timestamp()


def study_jobs(study: Study) -> list[JobState]:
    """Every job of ``study`` found in its logs and published runs, one `JobState` per job (its best
    record: finished over running over interrupted over failed, then the most steps done, then the
    newest), in stage order."""
    best: dict[str, JobState] = {}
    for root in study.roots:
        for directory, record in run_records(root):
            job = job_state(study, directory, root, record)
            identity = run_identity(record)
            if job is None or identity is None:
                continue
            known = best.get(identity)
            if known is None or _rank(job) < _rank(known):
                best[identity] = job
    return sorted(best.values(), key=lambda j: (STAGES.index(j.stage), j.method, j.values, str(j.seed)))


RECENT_RUNS = 4
"""How many of the newest finished runs time a stage: a study runs across sessions on machines up to 2x
apart in speed (and some runs shared the cores with test suites), and the newest runs are the likeliest to
be this machine's."""


def _recent_seconds(jobs: Iterable[JobState]) -> list[float]:
    """Wall times of the `RECENT_RUNS` newest finished runs of ``jobs`` that time their stage."""
    timed = sorted((j for j in jobs if j.state == FINISHED and j.wall_time_s), key=lambda j: j.updated)
    return [j.wall_time_s for j in timed[-RECENT_RUNS:] if j.wall_time_s]


def _median(seconds: Iterable[float | None]) -> float | None:
    values = [s for s in seconds if s is not None]
    return statistics.median(values) if values else None


def _part_left(job: JobState) -> float:
    """The part of a started job's budget not done (all of it when its step or budget is unknown)."""
    if not job.step or not job.max_steps or job.max_steps <= 0:
        return 1.0
    return max(0.0, 1 - job.step / job.max_steps)


def _borrowed_seconds(study: Study, stage: str, finished: list[JobState]) -> tuple[float | None, bool]:
    """(seconds per run, scaled) for a stage with no finished run: the check with a ``trainer.max_steps``
    of its own is timed by the `RECENT_RUNS` newest finished runs' median seconds per optimiser step times
    its steps (scaled); any other stage by their median wall time."""
    steps = check_budget(study) if stage == "check" else None
    timed = sorted((j for j in finished if j.wall_time_s and j.max_steps), key=lambda j: j.updated)
    per_step = _median(
        j.wall_time_s / j.max_steps for j in timed[-RECENT_RUNS:] if j.wall_time_s and j.max_steps
    )
    if steps and per_step:
        return per_step * steps, True
    return _median(_recent_seconds(finished)), False


def work_left(study: Study, jobs: list[JobState], declared: dict[str, int], n_jobs: int = 2) -> str | None:
    """One line: the runs left per stage (a running or interrupted job counts for the part of its budget it
    has not done) times the median wall time of the stage's `RECENT_RUNS` newest finished runs, in hours, and
    over ``n_jobs`` parallel jobs. A stage with no finished run yet is timed by the newest finished runs of
    the others (`_borrowed_seconds`): a
    lower bound for the final stage, which adds the test split, and a rough one for a check with its own
    ``trainer.max_steps`` (seconds per step x its steps; its validations do not scale so); widening adds
    runs nobody can count ahead. ``declared``: jobs per stage (`mtpeft.study.commands.declared_jobs`). None
    when nothing is left."""
    finished = [j for j in jobs if j.state == FINISHED]
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
        median = _median(_recent_seconds(of_stage))
        if median is None:
            median, by_steps = _borrowed_seconds(study, stage, finished)
            if median is None:
                return "left: no finished run to time yet"
            (scaled if by_steps else borrowed).append(stage)
        parts.append(f"{stage} {runs:.1f}")
        total += runs * median
    if not parts:
        return None
    notes = [f"{'/'.join(borrowed)} timed by the other stages' runs: a lower bound"] if borrowed else []
    notes += [
        f"{s} timed by the other stages' seconds per step x its trainer.max_steps: rough" for s in scaled
    ]
    tuning_over = any(j.stage != "tune" for j in jobs)
    if study.tune is not None and study.sampler == "grid" and study.widen and not tuning_over:
        notes.append("widening may add tuning runs")
    return (
        f"left: about {total / 3600:.1f} h of runs ({', '.join(parts)} runs x the median wall time of their "
        f"stage's {RECENT_RUNS} newest runs),"
        f" {total / 3600 / max(1, n_jobs):.1f} h at {n_jobs} parallel jobs" + "".join(f"; {n}" for n in notes)
    )


def _minutes(seconds: Iterable[float | None]) -> str:
    median = _median(seconds)
    return f"{median / 60:.0f} min" if median is not None else "-"


def format_status(study: Study, jobs: list[JobState], declared: dict[str, int], n_jobs: int = 2) -> str:
    """A summary line per stage, the work left (`work_left`) and a table of the jobs that are not
    finished."""
    lines = [f"study {study.name} (runs: {study.runs_dir}, published: {study.published_dir})"]
    for stage in STAGES:
        if (stage == "tune" and study.tune is None) or (stage == "check" and study.check is None):
            continue
        of_stage = [j for j in jobs if j.stage == stage]
        counts = ", ".join(f"{sum(j.state == s for j in of_stage)} {s}" for s in STATES)
        widens = stage == "tune" and study.sampler == "grid" and study.widen
        extra = " (+ values added by widening at a grid edge)" if widens else ""
        finished = [j.wall_time_s for j in of_stage if j.state == FINISHED]
        lines.append(
            f"{stage}: {counts}; declared {declared[stage]}{extra}; median wall time of a finished trained run "
            f"{_minutes(finished)}"
        )
    left = work_left(study, jobs, declared, n_jobs)
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


def study_status(study: Study, declared: dict[str, int], n_jobs: int = 2) -> str:
    """`format_status` of `study_jobs` (``declared``: jobs per stage, `mtpeft.study.commands.declared_jobs`;
    ``n_jobs``: the runner's parallel jobs, for the time left)."""
    return format_status(study, study_jobs(study), declared, n_jobs)
