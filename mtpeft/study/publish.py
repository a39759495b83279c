"""Publishing a study's finished runs: their small files copied from ``logs/`` into
``experiments/<task_name>/runs/`` under stable names (`publish`, `Publisher`), and the check that a study
directory holds runs of this machine's base model only (`check_published_bases`)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from mtpeft.results.load import CURVE_FILES
from mtpeft.results.stats import SCORES_FILE
from mtpeft.study.config import Study
from mtpeft.study.stages import run_stage
from mtpeft.utils.confighash import IGNORED_TOP_LEVEL
from mtpeft.utils.sweep import RESULTS_FILE, run_identity, run_records

log = logging.getLogger(__name__)
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


class PublishError(RuntimeError):
    """A finished run cannot be published (its published name is taken by another run)."""


def publish(log_root: Path, published: Path) -> tuple[list[Path], int]:
    """Copy every successful run under ``log_root`` into ``published/<name>/`` (`published_name`, small
    files only: `PUBLISHED_FILES`), unless a run of the same job is already published there. Returns (the
    new directories, how many runs were published before). Idempotent: re-publishing copies nothing."""
    log_root, published = Path(log_root).resolve(), Path(published).resolve()
    published.mkdir(parents=True, exist_ok=True)
    with _one_publisher(published):
        return _publish(log_root, published)


@contextlib.contextmanager
def _one_publisher(published: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the directory ``published`` itself (waiting for it; no file is left):
    the runner's periodic publication and a ``--publish`` beside it would otherwise delete each other's
    staging directories. The kernel drops it when the process dies."""
    descriptor = os.open(published, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def _publish(log_root: Path, published: Path) -> tuple[list[Path], int]:
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
            raise PublishError(
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
    new, before = publish(study.runs_dir, study.published_dir)
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
        """Publish what finished; a run whose published name is taken is logged and left in ``logs/`` (the
        study goes on; move the other directory away and ``--publish``)."""
        if self.enabled:
            with self._lock:
                try:
                    self.published += publish_study(self.study)
                except PublishError as err:
                    log.error("%s; the study goes on", err)

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
