"""How many jobs of a sweep will run: its jobs minus those whose job hash already has a finished run.

The runner shares the cores among a stage's sweeps by their job counts (`mtpeft.study.sweeps.run_sweeps_in_slots`).
Counted by the jobs a command declares, a sweep of several jobs (a tuning grid, the untuned methods'
sweep of a seed; the final and check stages otherwise run a sweep per method and seed) whose jobs mostly
finished before (a re-run after an interruption, a widened grid) would hold both cores of a 2-core machine
for the one job it still runs, and the next sweep would wait for it. `jobs_to_run` asks the same question
each job asks when it starts (`mtpeft.train`: compose the job's config, hash it with its inputs, look for a finished run with that hash in
the study's logs and published runs), in the runner's process and before the sweep starts. `with_slots` then
caps the sweep's parallel jobs (``hydra.launcher.n_jobs``) at that count, so a count that is too low (the
code changed under a long-running runner, say) costs time, never a core shared by two jobs; whether a job
runs is still decided by the job itself.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from omegaconf import OmegaConf, open_dict

from mtpeft.study.config import Study, compose_study, sweep_jobs
from mtpeft.utils.confighash import job_hash
from mtpeft.utils.sweep import finished_roots, finished_runs, looks_up_finished

log = logging.getLogger(__name__)

RUNNER_ONLY = ("experiment=", "hydra.", "launcher=")
"""Overrides of a sweep command that do not reach a job's config (or are given by `compose_study`)."""
N_JOBS = "hydra.launcher.n_jobs="


def sweep_arguments(command: Sequence[str]) -> list[str]:
    """The Hydra overrides of a ``python -m mtpeft.train -m`` command."""
    return list(command)[list(command).index("-m", 3) + 1 :]


def study_params(study: Study) -> list[str]:
    """The study's sweeper params as overrides, which every sweep's own overrides follow."""
    return [*study.other_params, f"method={','.join(study.methods)}", f"seed={','.join(study.seeds)}"]


def job_overrides(study: Study, command: Sequence[str]) -> list[list[str]]:
    """The overrides of every job of a ``python -m mtpeft.train -m`` command of this runner, in Hydra's order:
    the study's sweeper params, then the command's overrides, expanded as Hydra's basic sweeper does
    (`sweep_jobs`: ``~key``, ``++key=a,b`` and later-wins included)."""
    return sweep_jobs(
        [*study_params(study), *(a for a in sweep_arguments(command) if not a.startswith(RUNNER_ONLY))]
    )


def job_configs(study: Study, command: Sequence[str]) -> list[dict]:
    """The resolved config of every job of a ``python -m mtpeft.train -m`` command of this runner, as the
    job's entry point sees it (`job_overrides`). Without the ``hydra`` node; its own directory, run name and
    group are left out, which no hash reads."""
    configs = []
    for job in job_overrides(study, command):
        cfg = compose_study(study.name, job)
        with open_dict(cfg):
            del cfg.hydra
            cfg.paths.output_dir = "."
            cfg.run_name = cfg.run_group = ""
        configs.append(OmegaConf.to_container(cfg, resolve=True))
    return configs


def jobs_to_run(study: Study, command: Sequence[str]) -> int | None:
    """How many jobs of ``command`` will run: those with ``skip_finished=false`` and those without a finished
    run of their job hash in the study's logs or published runs. None when that cannot be worked out here."""
    try:
        from mtpeft.inputs import run_inputs  # loads transformers: in the runner's process, once

        configs = job_configs(study, command)
        if not configs:
            return 0
        finished = {job for _, job in finished_runs(finished_roots(OmegaConf.create(configs[0])))}
        return sum(
            not looks_up_finished(config, multirun=True)
            or job_hash(config, run_inputs(config)) not in finished
            for config in configs
        )
    except Exception as err:  # noqa: BLE001 - an estimate: the jobs decide for themselves
        log.warning("could not count the finished jobs of a sweep (%s); counting all its jobs", err)
        return None


def with_slots(command: Sequence[str], slots: int) -> list[str]:
    """``command`` launching at most ``slots`` jobs at once (its ``hydra.launcher.n_jobs``, if it has one)."""
    arguments = sweep_arguments(command)
    if not any(a.startswith(N_JOBS) for a in arguments):
        return list(command)
    return [a for a in command if not a.startswith(N_JOBS)] + [f"{N_JOBS}{slots}"]
