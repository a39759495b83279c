"""Run records and idempotent sweeps: write ``results.json`` safely, find finished and interrupted runs,
report a sweep's outcome.

**Records.** A run's ``results.json`` goes through ``running`` (written when the run starts: config, hashes,
start time, pid, host) to ``success`` or ``failed``. A run killed on the way keeps its ``running`` record,
so it stays visible as incomplete. Records are replaced atomically (a kill never leaves half a file) and a
``success`` record is write-once: a later failure of the same run (e.g. while printing its table) goes to
``failure_after_success.json`` next to it instead of replacing it.

**Idempotent jobs.** A job is identified by `mtpeft.utils.confighash.job_hash`: the config hash plus a
digest of the data files it reads and of the code. Before training, `mtpeft.train` looks for a
``results.json`` with ``status: success`` and the same job hash under ``<paths.log_dir>/<task_name>/`` and
then under the study's published runs, ``<paths.published_dir>/<task_name>/runs/`` (committed copies of
finished runs, `mtpeft.study.publish`, so a fresh checkout skips what an earlier session finished), and, if
there is one, skips the job (writing ``skipped.json``, which points to the finished run). Hashes are
recomputed from the stored config and inputs rather than read from the record, so results written before a
change of what the config hash ignores still match; records without inputs (older versions) never match.
A ``running`` record whose directory is not locked by a live process (`mtpeft.utils.runlock`) is an
interrupted run: `mtpeft.utils.resume` continues it from its last checkpoint, or redoes it, and adds
``superseded_by`` (the run that took over) and ``interrupted`` (what happened) to its record. The status
stays ``running``: the record is of a run that never finished, and `mtpeft.results` lists such records as
incomplete only while their config has not succeeded elsewhere.

**Sweep outcome.** `SweepReport` (a Hydra callback registered in ``conf/hydra/default.yaml``) locks the run
or sweep directory before Hydra writes into it and, after the last job of a ``--multirun`` sweep, prints
``sweep <dir>: N jobs: a ran, b skipped, c failed`` and exits with status 1 if any job failed (unless
``allow_failures=true``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import math
import os
import socket
import sys
import traceback
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from mtpeft.utils.confighash import config_hash, job_hash
from mtpeft.utils.runlock import RunDirBusy, RunDirLock, is_locked

log = logging.getLogger(__name__)
RESULTS_FILE = "results.json"
SKIPPED_FILE = "skipped.json"
PUBLISHED_RUNS = "runs"
"""A study's published runs live in ``<paths.published_dir>/<task_name>/<PUBLISHED_RUNS>/<run name>/``."""
POST_SUCCESS_FAILURE_FILE = "failure_after_success.json"
"""Where a failure of a run that already wrote its success record goes (the record is never replaced)."""


# -- records ---------------------------------------------------------------------------------------
def read_results(path: Path) -> dict[str, Any] | None:
    """A results.json as a dict, or None if it is unreadable (a job killed while writing it)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        log.warning("ignoring unreadable %s: %s", path, err)
        return None
    return data if isinstance(data, dict) else None


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically: a temporary file in the same directory, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def write_record(output_dir: Path, record: dict[str, Any]) -> Path:
    """Write ``record`` as the run's ``results.json``, never replacing a ``success`` record with anything
    else (that goes to `POST_SUCCESS_FAILURE_FILE`, logged as an error). Returns the path written."""
    path = Path(output_dir) / RESULTS_FILE
    existing = read_results(path) if path.exists() else None
    if existing is not None and existing.get("status") == "success" and record.get("status") != "success":
        path = path.with_name(POST_SUCCESS_FAILURE_FILE)
        log.error(
            "this run already succeeded (%s is kept); its later %s record goes to %s",
            RESULTS_FILE,
            record.get("status"),
            path,
        )
    write_json(path, record)
    return path


def _labels(config: dict[str, Any]) -> dict[str, Any]:
    method = config.get("method") if isinstance(config.get("method"), dict) else {}
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    return {"method": method.get("name"), "seed": config.get("seed"), "tasks": list(data.get("tasks") or {})}


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def running_record(config: dict[str, Any], inputs: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The record a run writes when it starts, so a killed run stays visible (status ``running``)."""
    return {
        "status": "running",
        **_labels(config),
        "config": config,
        "config_hash": config_hash(config),
        "job_hash": job_hash(config, inputs),
        "inputs": inputs,
        "started": now_iso(),
        "pid": os.getpid(),
        "host": socket.gethostname(),
        **extra,
    }


def resolved_config(cfg: DictConfig) -> tuple[dict[str, Any], bool]:
    """The config as a plain dict, resolved if it can be (a failure may come from resolving it)."""
    try:
        return OmegaConf.to_container(cfg, resolve=True), True
    except Exception:  # noqa: BLE001 - fall back to the raw config
        return OmegaConf.to_container(cfg, resolve=False), False


def failure_record(
    cfg: DictConfig,
    err: BaseException,
    digest: str | None,
    wall_time_s: float,
    inputs: dict[str, Any] | None = None,
) -> dict:
    """What a failed run writes to results.json: enough to list it next to the successful ones."""
    config, resolved = resolved_config(cfg)
    record = {
        "status": "failed",
        "error": f"{type(err).__name__}: {err}",
        "traceback": "".join(traceback.format_exception(err)),
        **_labels(config),
        "config": config,
        "config_resolved": resolved,
        "config_hash": digest,
        "wall_time_s": round(wall_time_s, 2),
    }
    if inputs is not None and resolved:
        record.update(job_hash=job_hash(config, inputs), inputs=inputs)
    return record


def mark_recorded(err: BaseException) -> None:
    """Note on an exception that its failure record is written (the entry point need not write it)."""
    with contextlib.suppress(AttributeError):
        err.mtpeft_recorded = True  # type: ignore[attr-defined]


def is_recorded(err: BaseException) -> bool:
    return bool(getattr(err, "mtpeft_recorded", False))


# -- finding runs ----------------------------------------------------------------------------------
def stored_hash(results: dict[str, Any]) -> str | None:
    """The config hash of a stored run: recomputed from its resolved config when present."""
    config = results.get("config")
    if isinstance(config, dict) and results.get("config_resolved", True):
        return config_hash(config)
    return results.get("config_hash")


def stored_job_hash(results: dict[str, Any]) -> str | None:
    """The job hash of a stored run, recomputed from its config and inputs; None for records without
    inputs (written before data and code were part of the identity: they can never be proven fresh)."""
    config, inputs = results.get("config"), results.get("inputs")
    if isinstance(config, dict) and isinstance(inputs, dict) and results.get("config_resolved", True):
        return job_hash(config, inputs)
    return None


def run_identity(results: Mapping[str, Any]) -> str | None:
    """What makes two records the same job: the job hash, or for records without inputs (older versions)
    the config hash."""
    return stored_job_hash(dict(results)) or stored_hash(dict(results))


def run_records(root: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """``(run directory, record)`` for every readable ``results.json`` under ``root``, in path order."""
    if not root.is_dir():
        return
    for path in sorted(root.rglob(RESULTS_FILE)):
        results = read_results(path)
        if results is not None:
            yield path.parent, results


def finished_roots(cfg: DictConfig) -> list[Path]:
    """Where a job looks for its finished twin: ``<paths.log_dir>/<task_name>/``, then the study's
    published runs ``<paths.published_dir>/<task_name>/runs/`` (when the paths config names that dir)."""
    roots = [Path(str(cfg.paths.log_dir)) / str(cfg.task_name)]
    published = cfg.paths.get("published_dir")
    if published:
        roots.append(Path(str(published)) / str(cfg.task_name) / PUBLISHED_RUNS)
    return roots


def looks_up_finished(config: Mapping[str, Any], multirun: bool) -> bool:
    """Whether a job skips itself when an identical job finished before: ``skip_finished`` when set, else in
    sweeps only (`mtpeft.train`; the study runner's count of the jobs to run asks the same)."""
    skip = config.get("skip_finished")
    return bool(multirun if skip is None else skip)


def finished_runs(roots: Path | Iterable[Path], exclude: Path | None = None) -> Iterator[tuple[Path, str]]:
    """``(run directory, job hash)`` of every successful run with a job hash under ``roots`` (one directory
    or several, in order): what a job looks up before it trains (`find_finished`) and what the study runner
    counts before it sizes a sweep (`mtpeft.study.unfinished.jobs_to_run`)."""
    exclude = exclude.resolve() if exclude is not None else None
    for root in [roots] if isinstance(roots, Path | str) else roots:
        for directory, results in run_records(Path(root)):
            if exclude is not None and directory.resolve() == exclude:
                continue
            job = stored_job_hash(results) if results.get("status") == "success" else None
            if job is not None:
                yield directory, job


def find_finished(roots: Path | Iterable[Path], job: str, exclude: Path | None = None) -> Path | None:
    """The directory of a successful run whose job hash is ``job`` under ``roots``, if any."""
    return next((directory for directory, found in finished_runs(roots, exclude) if found == job), None)


def find_interrupted(root: Path, job: str, exclude: Path | None = None) -> list[Path]:
    """Directories under ``root`` of runs with job hash ``job`` that say ``running`` but whose process is
    gone (nobody holds their lock) and that no other run took over yet, newest first."""
    exclude = exclude.resolve() if exclude is not None else None
    found = []
    for directory, results in run_records(root):
        if exclude is not None and directory.resolve() == exclude:
            continue
        if (
            results.get("status") == "running"
            and "superseded_by" not in results
            and stored_job_hash(results) == job
            and not is_locked(directory)
        ):
            found.append(directory)
    return sorted(found, key=lambda d: (d / RESULTS_FILE).stat().st_mtime, reverse=True)


def mark_superseded(directory: Path, successor: Path, resumed: bool) -> bool:
    """Record that the interrupted run in ``directory`` is continued (``resumed``) or redone by the run in
    ``successor``: its ``running`` record gains ``superseded_by`` and ``interrupted``. False if its record
    changed meanwhile or another process holds it."""
    try:
        with RunDirLock(directory):
            record = read_results(directory / RESULTS_FILE)
            if record is None or record.get("status") != "running" or "superseded_by" in record:
                return False
            how = "resumed from its last checkpoint" if resumed else "redone"
            record.update(
                interrupted=f"the run (pid {record.get('pid')} on {record.get('host')}) stopped without a "
                f"result; {how} in {successor}",
                superseded_by=str(successor),
                superseded_at=now_iso(),
            )
            write_json(directory / RESULTS_FILE, record)
            return True
    except RunDirBusy:
        return False


def objective(results: dict[str, Any]) -> float:
    """``val/avg/score`` of a run (what Optuna maximises); NaN when missing (a failed trial)."""
    value = (results.get("metrics") or {}).get("val", {}).get("val/avg/score")
    return float(value) if value is not None and math.isfinite(value) else float("nan")


# -- sweep outcome ---------------------------------------------------------------------------------
def job_outcome(job_dir: Path) -> tuple[str, str]:
    """``(ran | skipped | failed, detail)`` of one finished sweep job, from what it left in its directory."""
    if (job_dir / SKIPPED_FILE).exists():
        return "skipped", ""
    if (job_dir / POST_SUCCESS_FAILURE_FILE).exists():
        failure = read_results(job_dir / POST_SUCCESS_FAILURE_FILE) or {}
        return "failed", f"after its success record: {failure.get('error', '?')}"
    results = read_results(job_dir / RESULTS_FILE) if (job_dir / RESULTS_FILE).exists() else None
    if results is None:
        return "failed", "no results.json (the job died before writing one)"
    status = results.get("status")
    if status == "success":
        return "ran", ""
    if status == "running":
        return "failed", "status still 'running' (the job process died)"
    return "failed", str(results.get("error", f"status {status!r}"))


def sweep_jobs(sweep_dir: Path) -> list[Path]:
    """The job directories of a sweep: those holding Hydra's ``.hydra`` folder."""
    return sorted(p.parent for p in Path(sweep_dir).rglob(".hydra") if p.parent != Path(sweep_dir))


def sweep_summary(sweep_dir: Path) -> dict[str, list[tuple[Path, str]]]:
    """Every job of the sweep by outcome: ``{"ran": [...], "skipped": [...], "failed": [...]}``."""
    summary: dict[str, list[tuple[Path, str]]] = {"ran": [], "skipped": [], "failed": []}
    for job_dir in sweep_jobs(sweep_dir):
        outcome, detail = job_outcome(job_dir)
        summary[outcome].append((job_dir, detail))
    return summary


def summary_line(sweep_dir: Path, summary: dict[str, list[tuple[Path, str]]]) -> str:
    total = sum(len(v) for v in summary.values())
    counts = ", ".join(f"{len(summary[k])} {k}" for k in ("ran", "skipped", "failed"))
    return f"sweep {sweep_dir}: {total} jobs: {counts}"


class SweepReport(Callback):
    """Hydra callback: lock the run (or sweep) directory before Hydra writes into it; after a sweep, print
    its summary line and exit non-zero if a job failed (unless ``allow_failures=true``)."""

    def __init__(self) -> None:
        self._lock: RunDirLock | None = None

    def _take(self, directory: str) -> None:
        lock = RunDirLock(directory)
        busy = None
        try:
            lock.acquire()
        except RunDirBusy as err:
            busy = err
        if busy is not None:  # outside the except block: the exit carries no chained exception
            print(f"Error: {busy}", file=sys.stderr)
            raise SystemExit(1)
        self._lock = lock

    def _drop(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._take(str(config.hydra.run.dir))

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._drop()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._take(str(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        summary = sweep_summary(sweep_dir)
        self._drop()
        line = summary_line(sweep_dir, summary)
        for job_dir, detail in summary["failed"]:
            line += f"\n  failed: {job_dir.name}: {detail.splitlines()[0] if detail else ''}"
        print(line, flush=True)
        log.info(line)
        if summary["failed"] and not config.get("allow_failures"):
            print(
                f"Error: {len(summary['failed'])} of {sum(len(v) for v in summary.values())} sweep jobs "
                "failed (details in their results.json); allow_failures=true makes such a sweep exit 0",
                file=sys.stderr,
                flush=True,
            )
            raise SystemExit(1)
