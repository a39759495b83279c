"""Entry point: ``python -m mtpeft.train [method=...] [model=...] [data=...] [-m for sweeps]``.

Composes ``conf/train.yaml`` with the chosen groups and hands the resolved config to `mtpeft.run.run`.
Returns ``val/avg/score`` of the best checkpoint (the metric Hydra's Optuna sweeper optimises).

Jobs are idempotent, failure-tolerant and resumable (`mtpeft.utils.sweep`, `mtpeft.utils.resume`; README,
"Reliability"):

- every run holds an exclusive lock on its directory (taken before Hydra writes ``.hydra/``): a second
  live run in the same directory fails at once, naming it and the holder's pid;
- a job whose *job hash* (resolved config minus paths and bookkeeping, plus a digest of every data file
  it reads and of the code) already finished successfully under ``<paths.log_dir>/<task_name>/`` or among
  the study's published runs (``<paths.published_dir>/<task_name>/runs/``) is skipped and returns the
  stored score (``skip_finished=false`` forces a re-run), so re-running a sweep redoes only
  missing, failed and interrupted jobs, and never reuses a result of other data or code;
- a run writes ``results.json`` with ``status: running`` when it starts, so a killed run is listed as
  incomplete; a sweep re-run resumes it from its last checkpoint (``resume``: null = auto in sweeps;
  ``resume=auto`` or a path for single runs; ``checkpoint_every_n_steps`` sets how often one is written);
- a job that crashes or diverges (non-finite training loss) writes ``results.json`` with
  ``status: failed``, the error and the hashes; a success record is never replaced (a later failure goes
  to ``failure_after_success.json``). A single run then exits non-zero; under ``--multirun`` the sweep
  goes on with the next job (the job returns NaN, a failed Optuna trial), and after the last job prints
  ``sweep <dir>: N jobs: a ran, b skipped, c failed`` and exits non-zero if any failed, unless
  ``allow_failures=true``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from mtpeft.preflight import preflight, run_cli
from mtpeft.utils.confighash import config_hash, job_hash
from mtpeft.utils.resolvers import register_resolvers
from mtpeft.utils.runlock import RunDirBusy, RunDirLock
from mtpeft.utils.sweep import (
    RESULTS_FILE,
    SKIPPED_FILE,
    failure_record,
    find_finished,
    finished_roots,
    is_recorded,
    looks_up_finished,
    now_iso,
    objective,
    read_results,
    write_json,
    write_record,
)

register_resolvers()
log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        lock = RunDirLock(output_dir)
        lock.acquire()
    except RunDirBusy as err:  # never write into a directory another run holds
        if not multirun:
            raise
        log.error("%s; multirun: going on with the next job", err)
        return float("nan")
    try:
        return _job(cfg, output_dir, multirun)
    finally:
        lock.release()


def _job(cfg: DictConfig, output_dir: Path, multirun: bool) -> float:
    """Skip the job if it finished before, else run it; record a failure that `run` did not record."""
    started = time.perf_counter()
    digest = inputs = None
    try:
        config = OmegaConf.to_container(cfg, resolve=True)
        digest = config_hash(config)
        preflight(cfg)  # config errors first: before a run's heavy imports and before a job is looked up
        if looks_up_finished(cfg, multirun):
            from mtpeft.inputs import run_inputs  # loads transformers: only where a job is looked up

            inputs = run_inputs(config)
            job = job_hash(config, inputs)
            finished = find_finished(finished_roots(cfg), job)
            if finished is not None:
                return _skip(finished, output_dir, digest, job)
        from mtpeft.run import run  # heavy imports only for jobs that train

        results = run(cfg, output_dir, inputs)
    except Exception as err:
        if not is_recorded(err):
            failure = failure_record(cfg, err, digest, time.perf_counter() - started, inputs)
            write_record(output_dir, failure)
        log.error("run failed: %s (details in %s)", err, output_dir / RESULTS_FILE, exc_info=multirun)
        if not multirun:
            raise
        log.error("multirun: going on with the next job")
        return float("nan")
    return objective(results)


def _skip(finished: Path, output_dir: Path, digest: str, job: str) -> float:
    """Return the finished run's score; point to it from ``skipped.json`` unless it is this directory."""
    if finished.resolve() == output_dir.resolve():
        log.info("skipping: this directory already holds the finished run (job hash %s)", job)
    else:
        log.info(
            "skipping: identical job finished in %s (config hash %s, job hash %s)", finished, digest, job
        )
        record = {
            "status": "skipped",
            "config_hash": digest,
            "job_hash": job,
            "finished_in": str(finished),
            "skipped_at": now_iso(),
        }
        write_json(output_dir / SKIPPED_FILE, record)
    return objective(read_results(finished / RESULTS_FILE) or {})


if __name__ == "__main__":
    run_cli(main)  # a failure's last stderr line is "Error: <message>"
