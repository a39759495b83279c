"""The command line of ``python -m mtpeft.study`` (`main`): run a study, or only publish its finished runs
(``--publish``) or say where it stands (``--status``). Its description is the first line of `mtpeft.study`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import mtpeft.study as study_package
from mtpeft.study.commands import declared_jobs, launcher_overrides
from mtpeft.study.config import compose_study, split_overrides, study_from_command, study_roots
from mtpeft.study.publish import PublishError, check_published_bases, publish
from mtpeft.study.runner import run_study
from mtpeft.study.sweeps import StudyStopped


def publish_main(name: str, overrides: Sequence[str]) -> int:
    """``--publish``: publish the finished runs of study ``name`` (any experiment config; ``task_name`` and
    ``paths.*`` overrides respected) and print where they went."""
    cfg = compose_study(name, split_overrides(overrides).jobs)
    log_root, published = study_roots(cfg)
    if published is None:
        print(
            "nothing to publish: paths.published_dir is empty (give it, e.g. paths.published_dir=experiments)"
        )
        return 2
    check_published_bases(name, str(cfg.task_name), published)
    if not log_root.is_dir():
        print(f"nothing to publish: {log_root} does not exist (no run of {name!r} in this checkout)")
        return 0
    try:
        new, before = publish(log_root, published)
    except PublishError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"published {len(new)} new run(s) to {published} ({before} were there already)")
    if new:
        print(f"keep them: git add {published} && git commit -m 'publish {name} runs'")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mtpeft.study", description=study_package.__doc__.split("\n\n")[0]
    )
    parser.add_argument("name", help="a study: conf/experiment/<name>.yaml")
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides for every job (e.g. trainer.max_steps=600)"
    )
    parser.add_argument(
        "--launcher", choices=["auto", "joblib", "basic"], default="auto", help="default: joblib if installed"
    )
    parser.add_argument("--n-jobs", type=int, default=2, help="parallel jobs with joblib (default 2)")
    parser.add_argument("--out", type=Path, help="tables here instead of experiments/<name>/")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    parser.add_argument(
        "--publish",
        action="store_true",
        help="only copy the study's finished runs from logs/<task_name>/ to experiments/<task_name>/runs/ "
        "(small files; a fresh checkout then skips them) and exit",
    )
    parser.add_argument(
        "--no-publish", action="store_true", help="do not publish finished runs (during and after each sweep)"
    )
    parser.add_argument(
        "--status",
        action="store_true",
        help="only say where the study stands (finished, running with their step, interrupted, failed jobs "
        "per stage, from logs/ and the published runs) and exit",
    )
    args = parser.parse_intermixed_args(argv)
    if args.publish:
        return publish_main(args.name, args.overrides)
    if args.status:
        from mtpeft.study.status import study_status

        parallel = args.n_jobs if launcher_overrides(args.launcher, args.n_jobs) else 1
        study = study_from_command(args.name, args.overrides)[0]
        print(study_status(study, declared_jobs(study), parallel))
        return 0
    try:
        return _run_main(args)
    except StudyStopped as stop:
        print(
            f"study {args.name} {stop}: run the same command again to resume (finished jobs are skipped, "
            "interrupted ones resume from their last checkpoint)",
            file=sys.stderr,
        )
        return 128 + stop.signum


def _run_main(args: argparse.Namespace) -> int:
    """Run the study of the parsed command line; print what was chosen, written and went wrong."""
    result = run_study(
        args.name,
        args.overrides,
        args.launcher,
        args.n_jobs,
        args.out,
        not args.no_plots,
        publish_runs=not args.no_publish,
    )
    for method, values in result["chosen"].items():
        print(f"chosen for {method}: " + ", ".join(f"{k}={v}" for k, v in values.items()))
    print(f"wrote {len(result['files'])} files, e.g. {result['files'][0] if result['files'] else '-'}")
    for problem in result["problems"]:
        print(f"problem: {problem}", file=sys.stderr)
    return 1 if result["problems"] else 0
