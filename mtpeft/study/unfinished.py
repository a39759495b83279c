"""How many jobs of a sweep will run: its jobs minus those whose job hash already has a finished run.

The runner shares the cores among a stage's sweeps by their job counts (`mtpeft.study.sweeps.run_sweeps_in_slots`).
Counted by the jobs a command declares, a sweep whose jobs mostly finished before (a study given a third seed,
a re-run after an interruption) would hold both cores of a 2-core machine for the one job it still runs, and
the next sweep would wait for it. `jobs_to_run` asks the same question each job asks when it starts
(`mtpeft.train`: compose the job's config, hash it with its inputs, look for a finished run with that hash in
the study's logs and published runs), in the runner's process and before the sweep starts. It only decides how
many cores a sweep is given: whether a job runs is still decided by the job itself, so a wrong count costs
time, never a result.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from omegaconf import OmegaConf, open_dict

from mtpeft.study.config import Study, compose_study, sweep_jobs
from mtpeft.utils.confighash import job_hash
from mtpeft.utils.sweep import find_finished, finished_roots

log = logging.getLogger(__name__)

RUNNER_ONLY = ("experiment=", "hydra.", "launcher=")
"""Overrides of a sweep command that do not reach a job's config (or are given by `compose_study`)."""
ONCE = ("~", "++")
"""Overrides applied once to every job of a command (deletions, forced additions such as ``++tuned=``)."""


def job_configs(study: Study, command: Sequence[str]) -> list[dict]:
    """The resolved config of every job of a ``python -m mtpeft.train -m`` command of this runner, as the
    job's entry point sees it (without the ``hydra`` node; its own directory, run name and group left out,
    which no hash reads)."""
    args = list(command)[list(command).index("-m", 3) + 1 :]
    once = [a for a in args if a.startswith(ONCE)]
    swept = [a for a in args if not a.startswith((*RUNNER_ONLY, *ONCE))]
    own = [*study.other_params, f"method={','.join(study.methods)}", f"seed={','.join(study.seeds)}"]
    configs = []
    for job in sweep_jobs([*own, *swept]):
        cfg = compose_study(study.name, [*once, *job])
        with open_dict(cfg):
            del cfg.hydra
            cfg.paths.output_dir = "."
            cfg.run_name = cfg.run_group = ""
        configs.append(OmegaConf.to_container(cfg, resolve=True))
    return configs


def jobs_to_run(study: Study, command: Sequence[str]) -> int | None:
    """How many jobs of ``command`` have no finished run with their job hash (in the study's logs or
    published runs); None when that cannot be worked out here (the sweep then counts all its jobs)."""
    try:
        from mtpeft.inputs import run_inputs  # loads transformers: in the runner's process, once

        configs = job_configs(study, command)
        roots = finished_roots(OmegaConf.create(configs[0])) if configs else []
        return sum(find_finished(roots, job_hash(config, run_inputs(config))) is None for config in configs)
    except Exception as err:  # noqa: BLE001 - an estimate: the jobs decide for themselves
        log.warning("could not count the finished jobs of a sweep (%s); counting all its jobs", err)
        return None
