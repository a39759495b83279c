"""Reading runs: every ``results.json`` under some directories as one flat record per run.

A record holds the run's labels (method, model label, task mixture), status, seed, config hash, the
scores of one split, costs, the flat hashed config (for variants) and the run directory (for its metrics
CSV and per-example ``scores.jsonl.gz``). What is read:

* every ``results.json`` under the roots, and the run a ``skipped.json`` points to (``finished_in``: a job
  that `mtpeft.train` skipped because an identical config had finished), so a re-run sweep's directory
  covers every job of the sweep, not only those that ran this time;
* each file is parsed as a `mtpeft.record.RunRecord` (which also fills in what older records lack);
  files that are not run records (not JSON, a list, ``{"status": "success"}`` without config or metrics,
  an unknown status or field) are reported in ``problems`` and skipped, never turned into rows;
* runs with ``status: running`` (started, then killed or still going) come back with that status and are
  listed as incomplete, never averaged in;
* for the test split, runs made with ``test=false`` (validation only, e.g. a study's tuning jobs) are left
  out: they have no test score;
* a run resumed from a checkpoint (``resumed_from``) has no wall time: its record times the resumed
  process only, which would pass for a fast run (its scores and other costs count as usual);
* reading a study by name, the runs of its convergence check (the ``check`` stage of `mtpeft.study`, at
  another budget) are left out: they have their own tables (``check/``), and mixed in they would split each
  checked method into two rows, one per budget;
* evaluation records (``kind: eval``, written by ``python -m mtpeft.eval``) are left out with a note: they
  re-score the adapter of a training run, which is tabled itself, so counting them would count that
  run twice (and their config names an adapter, not a training configuration).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from mtpeft.record import EVAL, RunRecord, parse_record
from mtpeft.study.stages import run_stage
from mtpeft.utils.confighash import hashed_part
from mtpeft.utils.sweep import RESULTS_FILE, stored_hash

log = logging.getLogger(__name__)

COSTS = ["trainable_params", "total_params", "trainable_percent", "wall_time_s", "peak_memory_mb"]
MISSING = "—"
CHECKPOINT_STEP = re.compile(r"step[_=](?P<step>\d+)")
"""The step in a best checkpoint's file name (``mtpeft.run`` names them ``step_<n>.ckpt``)."""
SKIPPED_FILE = "skipped.json"
"""Written by `mtpeft.train` in the directory of a skipped sweep job; ``finished_in`` names the run."""
STUDY_STAGES_LEFT_OUT = ("check",)
"""Stages of `mtpeft.study` whose runs a study's tables leave out when the study is read by name."""
CURVE_FILES = ("csv/metrics.csv", "metrics.csv")
"""Where a run keeps its logged metrics (CSV logger in the run dir, or a copy next to results.json)."""


def model_label(model: Any) -> str:
    """``tiny_<arch>`` for the tiny models, the GGUF file's name for a GGUF checkpoint, else the last part of
    ``name_or_path`` (``model`` is the config's ``model`` node)."""
    if not isinstance(model, dict):
        return MISSING
    if model.get("kind") == "tiny":
        return f"tiny_{model.get('arch')}"
    source = model.get("name_or_path") or model.get("gguf_file") or MISSING
    return str(source).rstrip("/").split("/")[-1]


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": value}`` for a nested dict (lists as their repr, so they compare and print)."""
    if isinstance(node, dict):
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: repr(node) if isinstance(node, list) else node}


def _read_json(path: Path) -> tuple[Any, str | None]:
    try:
        return json.loads(path.read_text()), None
    except (OSError, ValueError) as err:
        return None, f"unreadable ({err}); a job killed while writing it?"


def _followed(skipped: Path) -> tuple[Path | None, str | None]:
    """The results.json of the run a ``skipped.json`` points to (relative paths tried from its parents)."""
    data, problem = _read_json(skipped)
    if problem or not isinstance(data, dict) or not data.get("finished_in"):
        return None, problem or "has no 'finished_in' (the finished run it stands for)"
    target = Path(data["finished_in"])
    candidates = [target] if target.is_absolute() else [target, *(p / target for p in skipped.parents)]
    for candidate in candidates:
        if (candidate / RESULTS_FILE).is_file():
            return candidate / RESULTS_FILE, None
    return None, f"points to {target}, which holds no {RESULTS_FILE} (moved or deleted?)"


def result_files(roots: Iterable[Path], problems: list[tuple[str, str]]) -> list[tuple[Path, Path]]:
    """Every results.json under ``roots`` plus those that ``skipped.json`` files point to, each once, as
    ``(file, job directory)``: the directory of the job it stands for (for a skipped job's run, the
    directory of its ``skipped.json``, which tells the study stage of the job)."""
    files: list[tuple[Path, Path]] = []
    for root in roots:
        files += [(path, path.parent) for path in sorted(Path(root).rglob(RESULTS_FILE))]
    seen = {path.resolve() for path, _ in files}
    for root in roots:
        for skipped in sorted(Path(root).rglob(SKIPPED_FILE)):
            target, problem = _followed(skipped)
            if problem:
                problems.append((str(skipped), problem))
            elif target.resolve() not in seen:
                seen.add(target.resolve())
                files.append((target, skipped.parent))
    return files


def stage_of(job_dir: Path, roots: Iterable[Path]) -> str | None:
    """The `mtpeft.study` stage of a job (`mtpeft.study.stages.run_stage`), read below the first of ``roots``
    that holds its directory (as given, else both resolved), else from the directory's own name."""
    for resolve in (False, True):
        job = job_dir.resolve() if resolve else job_dir
        for root in roots:
            root = Path(root).resolve() if resolve else Path(root)
            if job.is_relative_to(root):
                return run_stage(job, root)
    return run_stage(job_dir, job_dir.parent)


def base_part(inputs: dict[str, Any] | None) -> dict[str, Any]:
    """``{"base": {"weight_files": ..., "dtype": ...}}`` of a run that recorded its base model
    (`mtpeft.models.identity`), else nothing: in the flat config, a base that differs between the runs of one
    method makes them separate rows (a variant ``base.weight_files=...``) instead of one mean over two bases."""
    base = (inputs or {}).get("base")
    return {"base": base} if isinstance(base, dict) else {}


def checkpoint_step(path: str | None) -> int | None:
    """The optimiser step in a checkpoint's file name (``.../step_120.ckpt`` -> 120), or None."""
    match = CHECKPOINT_STEP.search(Path(path).name) if path else None
    return int(match["step"]) if match else None


def _record(path: Path, run: RunRecord, split: str) -> dict[str, Any]:
    """The flat record of one run (labels, scores of ``split``, costs, flat hashed config)."""
    config = run.config
    metrics = run.scores(split)
    tuned = config.get("tuned")
    record = {
        "path": str(path.parent),
        "status": run.status,
        "method": run.method or MISSING,
        "model": model_label(config.get("model")),
        "mixture": "+".join(sorted(run.tasks)) or MISSING,
        "seed": run.seed,
        "config_hash": stored_hash(
            {"config": config, "config_resolved": run.config_resolved, "config_hash": run.config_hash}
        ),
        "error": run.error,
        "mtime": path.stat().st_mtime,
        "tasks": list(run.tasks),
        "flat": flatten({**hashed_part(config), **base_part(run.inputs)}),
        "tuned": tuned if isinstance(tuned, dict) else {},
        "scores": {task: metrics.get(f"{split}/{task}/score") for task in [*run.tasks, "avg"]},
        "best_step": checkpoint_step(run.best_checkpoint),
        "max_steps": (config.get("trainer") or {}).get("max_steps"),
    }
    record.update({key: getattr(run, key) for key in COSTS})
    record["peak_memory_mb"] = run.peak_mb
    if run.resumed_from:
        record["wall_time_s"] = None  # the resumed process's time only: not the run's (README, Resume)
    return record


def load_runs(
    roots: Iterable[Path],
    split: str = "test",
    problems: list[tuple[str, str]] | None = None,
    stages_left_out: Collection[str] = (),
) -> list[dict[str, Any]]:
    """One flat record per run under ``roots``: labels, status, scores, costs, flat config; the runs of
    ``stages_left_out`` (`stage_of`) left out.

    Files that are not run records are appended to ``problems`` as ``(path, reason)`` and logged."""
    problems = [] if problems is None else problems
    roots = list(roots)
    records, validation_only, evaluations = [], 0, 0
    left_out: dict[str, int] = {}
    for path, job_dir in result_files(roots, problems):
        stage = stage_of(job_dir, roots) if stages_left_out else None
        if stage in stages_left_out:
            left_out[stage] = left_out.get(stage, 0) + 1
            continue
        data, problem = _read_json(path)
        run, problem = (None, problem) if problem else parse_record(data)
        if problem:
            problems.append((str(path), problem))
            continue
        if run.kind == EVAL:
            evaluations += 1
            continue
        if split == "test" and run.config.get("test") is False:
            validation_only += 1
            continue
        records.append(_record(path, run, split))
    for path, problem in problems:
        log.warning("skipping %s: %s", path, problem)
    if validation_only:
        log.info("left out %d validation-only run(s) (test=false) from the test table", validation_only)
    for stage, count in left_out.items():
        log.info("left out %d run(s) of the study's %s stage (tabled on their own)", count, stage)
    if evaluations:
        log.info(
            "left out %d evaluation record(s) (kind: eval, python -m mtpeft.eval): they re-score trained "
            "runs' adapters and are not training runs",
            evaluations,
        )
    return records


def label(record: dict[str, Any] | pd.Series) -> str:
    """``method`` or ``method (variant)``."""
    return f"{record['method']} ({record['variant']})" if record.get("variant") else record["method"]


def stages_left_out(target: str) -> tuple[str, ...]:
    """The stages a target's tables leave out: `STUDY_STAGES_LEFT_OUT` for a study name, none for a
    directory (read whole: ``--by trainer.max_steps`` can rank its two budgets)."""
    return () if Path(target).is_dir() else STUDY_STAGES_LEFT_OUT


def resolve_target(target: str) -> tuple[list[Path], Path, str]:
    """(directories to read, output directory, title) for a study name or a directory."""
    path = Path(target)
    if path.is_dir():
        return [path], path, path.name
    root = Path(os.environ.get("MTPEFT_ROOT", "."))
    sources = [d for d in (root / "logs" / target, root / "experiments" / target) if d.is_dir()]
    if not sources:
        raise SystemExit(
            f"no results for {target!r}: it is not a directory, and neither {root / 'logs' / target} nor "
            f"{root / 'experiments' / target} exists"
        )
    return sources, root / "experiments" / target, target


def validation_curves(records: list[dict[str, Any]]) -> pd.DataFrame:
    """Long table ``label, seed, step, task, score`` of ``val/<task>/score`` from each run's metrics CSV."""
    frames = []
    for record in records:
        if record["status"] != "success":
            continue
        path = next(
            (Path(record["path"]) / f for f in CURVE_FILES if (Path(record["path"]) / f).exists()), None
        )
        if path is None:
            continue
        logged = pd.read_csv(path)
        for task in [*record["tasks"], "avg"]:
            column = f"val/{task}/score"
            if column in logged and "step" in logged:
                points = logged[["step", column]].dropna().rename(columns={column: "score"})
                frames.append(points.assign(label=label(record), seed=record["seed"], task=task))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
