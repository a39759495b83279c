"""The whole study (`run_study`): tune, choose, the final and check sweeps, then the tables."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mtpeft.results import declared_plots, load_runs, summarise
from mtpeft.study.capacity import capacity_table, write_capacity
from mtpeft.study.check import write_check
from mtpeft.study.commands import (
    check_commands,
    final_commands,
    launcher_overrides,
    one_sweep_per_seed,
    with_sizes,
)
from mtpeft.study.config import CONF_DIR, study_from_command
from mtpeft.study.publish import Publisher, check_published_bases
from mtpeft.study.sweeps import SWEEPS, StudyStopped, run_sweep, run_sweeps_in_slots, stop_on_signals
from mtpeft.study.tuning import Tuner, edge_choices, write_tuning

log = logging.getLogger(__name__)


def run_study(
    name: str,
    overrides: Sequence[str] = (),
    launcher: str = "auto",
    n_jobs: int = 2,
    out: Path | None = None,
    plots: bool = True,
    publish_runs: bool = True,
) -> dict[str, Any]:
    """Tune (if declared), choose, run the final sweeps, write the tables; return what was done.

    After each sweep, and every `mtpeft.study.publish.PUBLISH_EVERY_S` seconds while one runs, the study's
    finished runs are published (`Publisher`; ``publish_runs=False``: not), so committing ``experiments/``
    keeps what finished even if the study is stopped later."""
    study, parts = study_from_command(name, overrides)
    check_published_bases(name, study.task_name, study.published_dir)
    root = Path(os.environ.get("MTPEFT_ROOT", "."))
    out = out or root / "experiments" / study.task_name
    launch = launcher_overrides(launcher, n_jobs)
    chosen: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    files: list[Path] = []
    final_dirs: list[Path] = []
    check_dirs: list[Path] = []
    with stop_on_signals(), Publisher(study, publish_runs) as publish:
        if study.tune is not None:
            tuning = Tuner(
                study, parts.jobs, launch, after_sweep=publish, parallel=n_jobs if launch else 1
            ).run()
            chosen = tuning.chosen
            problems += tuning.problems
            files += write_tuning(tuning.table, chosen, out, name)
            for note in edge_choices(tuning.table, chosen):
                log.warning("tuning: %s (the best may lie beyond; tune.widen caps the widening)", note)
            for method, values in chosen.items():
                log.info("tuned %s: %s", method, ", ".join(f"{k}={v}" for k, v in values.items()))
        slots = n_jobs if launch else 1

        def done(directory: Path, status: int) -> None:
            if status != 0:
                problems.append(f"sweep {directory} exited non-zero (failed jobs?)")
            publish()

        finals = final_commands(study, chosen, [*parts.seeds, *parts.jobs], launch)
        checks = check_commands(study, chosen, parts.jobs, launch) if study.check else []
        if slots > 1:
            finals, checks = one_sweep_per_seed(study, finals), one_sweep_per_seed(study, checks)
        for commands, directories in ((finals, final_dirs), (checks, check_dirs)):
            directories += [directory for _, directory in commands]
            run_sweeps_in_slots(with_sizes(study, commands, slots), slots, run_sweep, done)
    if SWEEPS.stopped is not None:  # a stop during the last sweep, after its jobs were done
        raise StudyStopped(SWEEPS.stopped)
    if study.probe is not None:
        threshold = float(study.probe.get("loss_threshold", 0.1))
        records = load_runs(final_dirs, split="val")
        files += write_capacity(capacity_table(records, threshold), threshold, out, name)
    else:
        extra_plots = declared_plots(name, CONF_DIR)  # the study's own plots (report.plots)
        files += summarise(final_dirs, out, name, plots=plots, extra_plots=extra_plots)["files"]
    if check_dirs:
        files += write_check(study, final_dirs, check_dirs, out, plots)
    return {
        "study": study,
        "chosen": chosen,
        "problems": problems,
        "files": files,
        "sweeps": final_dirs,
        "check_sweeps": check_dirs,
        "published": publish.published,
    }
