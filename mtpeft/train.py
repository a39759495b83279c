"""Entry point: ``python -m mtpeft.train [method=...] [model=...] [data=...] [-m for sweeps]``.

Composes ``conf/train.yaml`` with the chosen groups and hands the resolved config to `mtpeft.run.run`.
Returns ``val/avg/score`` of the best checkpoint (the metric Hydra's Optuna sweeper optimises).

Jobs are idempotent and failure-tolerant (`mtpeft.utils.sweep`):

- a job whose config (resolved, minus paths and bookkeeping) already finished successfully under
  ``<paths.log_dir>/<task_name>/`` is skipped and returns the stored score (``skip_finished=false`` forces
  a re-run), so re-running a sweep redoes only missing and failed jobs;
- a job that crashes or diverges (non-finite training loss) writes ``results.json`` with
  ``status: failed``, the error and the config hash. A single run then exits non-zero; under
  ``--multirun`` the sweep goes on with the next job (and the job returns NaN, a failed Optuna trial).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from mtpeft.preflight import run_cli
from mtpeft.utils.confighash import config_hash
from mtpeft.utils.resolvers import register_resolvers
from mtpeft.utils.sweep import RESULTS_FILE, failure_record, find_finished, objective, read_results

register_resolvers()
log = logging.getLogger(__name__)
SKIPPED_FILE = "skipped.json"


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    started = time.perf_counter()
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    digest = None
    try:
        digest = config_hash(OmegaConf.to_container(cfg, resolve=True))
        skip = cfg.get("skip_finished")
        if multirun if skip is None else skip:
            finished = find_finished(Path(cfg.paths.log_dir) / cfg.task_name, digest, exclude=output_dir)
            if finished is not None:
                log.info("skipping: identical config finished in %s (config hash %s)", finished, digest)
                record = {"status": "skipped", "config_hash": digest, "finished_in": str(finished)}
                (output_dir / SKIPPED_FILE).write_text(json.dumps(record, indent=2))
                return objective(read_results(finished / RESULTS_FILE) or {})
        from mtpeft.run import run  # heavy imports only for jobs that train

        results = run(cfg, output_dir)
    except Exception as err:
        failure = failure_record(cfg, err, digest, time.perf_counter() - started)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / RESULTS_FILE).write_text(json.dumps(failure, indent=2, default=str))
        log.error(
            "run failed: %s (details in %s)", failure["error"], output_dir / RESULTS_FILE, exc_info=multirun
        )
        if not multirun:
            raise
        log.error("multirun: going on with the next job")
        return float("nan")
    return objective(results)


if __name__ == "__main__":
    run_cli(main)  # a failure's last stderr line is "Error: <message>"
