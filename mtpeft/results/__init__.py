"""Tables, plots and statistics from the ``results.json`` files of a study or of any directory of runs.

    python -m mtpeft.results methods_mix3      # reads logs/methods_mix3/ (+ experiments/methods_mix3/),
                                               # writes experiments/methods_mix3/results.{md,csv,tex}, plots/
    python -m mtpeft.results logs/train/multiruns/2026-11-25_10-00-00_ab12cd   # writes into that directory
    make results STUDY=methods_mix3

A study name reads ``<root>/logs/<name>/`` (every multirun and run of the study but those of its
convergence check, tabled in ``check/``) and committed results under ``<root>/experiments/<name>/``
(``<root>`` is ``$MTPEFT_ROOT`` or the current directory) and writes to ``<root>/experiments/<name>/``;
a directory is read recursively and written into. A sweep directory covers
every job of the sweep: jobs skipped because an identical config had finished (``skipped.json``) are read
from the run they point to.

The pieces: `load` (runs -> flat records; files that are not run records are reported and skipped, runs
still ``running`` are listed as incomplete), `aggregate` (one row per configuration apart from its seed:
mean ± std over seeds), `render` (Markdown / LaTeX, best per column in bold), `plots`, and `stats`
(CIs: Student t over seeds and a hierarchical bootstrap over seeds and test items; paired comparisons;
from each run's ``scores.jsonl.gz``). Scores are ``test/<task>/score`` and ``test/avg/score`` in percent; costs are
trainable parameters (and % of the base model), wall time (runs resumed from a checkpoint left out: they
time the resumed process only) and peak memory (the CUDA allocator peak on GPU,
else the peak resident memory of the process, which in a multirun is the maximum over the jobs so far).

Files: ``results.{md,csv,tex}`` (``results.csv`` holds the unformatted numbers ``<task>_mean``,
``<task>_std``, ...), ``convergence.{md,csv}`` (per row: validation score at each validation step, its last
change, how many runs were best at the end of their budget: `mtpeft.results.convergence`), ``failed.csv``, ``incomplete.csv`` (only when there are such runs), ``stats.md``,
``stats.csv``, ``pairwise.csv`` (only when runs saved per-example scores), and ``plots/``: the generic
plots, plus the study's own plots that ``conf/experiment/<name>.yaml`` declares (``report: {plots:
[temperature]}``; for a directory: ``--plot temperature``; `mtpeft.results.plots`). With ``--against <study
or directory>``: ``ranking.{md,csv}``, the methods ranked in both studies side by side with rank intervals and
Kendall's tau-b between the rankings (`mtpeft.results.ranking`); with ``--by <config key>`` the same between
the runs of the key's two values within the target (``--by trainer.max_steps``: a ranking at two budgets).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mtpeft.results.aggregate import ROW_KEYS, aggregate, assign_variants, best_rows, incomplete_runs
from mtpeft.results.convergence import write_convergence
from mtpeft.results.load import (
    COSTS,
    CURVE_FILES,
    load_runs,
    model_label,
    resolve_target,
    stages_left_out,
    validation_curves,
)
from mtpeft.results.plots import (
    STUDY_PLOTS,
    check_study_plots,
    declared_plots,
    pareto_front,
    plot,
    plot_curves,
    save_figure,
    study_plots,
    temperature_scores,
)
from mtpeft.results.ranking import records_rows, study_rows, write_ranking
from mtpeft.results.render import display_table, to_latex, to_markdown
from mtpeft.results.stats import summarise_stats
from mtpeft.utils.sweep import RESULTS_FILE

__all__ = [
    "COSTS",
    "CURVE_FILES",
    "ROW_KEYS",
    "STUDY_PLOTS",
    "aggregate",
    "assign_variants",
    "best_rows",
    "check_study_plots",
    "declared_plots",
    "display_table",
    "incomplete_runs",
    "load_runs",
    "main",
    "model_label",
    "pareto_front",
    "plot",
    "resolve_target",
    "save_figure",
    "study_plots",
    "summarise",
    "temperature_scores",
    "to_latex",
    "to_markdown",
    "validation_curves",
]

log = logging.getLogger(__name__)
CONF_DIR = Path(__file__).resolve().parent.parent.parent / "conf"
"""Where a study name's experiment config is looked up (``report.plots``: `declared_plots`)."""
CSV_HIDDEN = ["runs"]
"""Table columns kept for the statistics but not written to results.csv."""


def summarise(
    sources: Sequence[Path],
    out: Path,
    title: str,
    split: str = "test",
    plots: bool = True,
    extra_plots: Sequence[str] = (),
    stages: Sequence[str] = (),
) -> dict:
    """Read every run under ``sources`` but those of the study stages ``stages``; write the tables,
    statistics (and plots) into ``out``.

    ``extra_plots``: the study's own plots (`STUDY_PLOTS` kinds, declared by the study), besides the
    generic ones."""
    extra_plots = check_study_plots(extra_plots)
    problems: list[tuple[str, str]] = []
    records = load_runs(sources, split, problems, stages)
    if not records:
        raise SystemExit(f"no {RESULTS_FILE} run records under {', '.join(map(str, sources))}")
    table, failed, columns = aggregate(records)
    incomplete = incomplete_runs(records)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / name for name in ("results.md", "results.csv", "results.tex", "failed.csv")]
    extra = (
        summarise_stats(table, columns, records, out, title, plots) if split == "test" and len(table) else []
    )
    table.drop(columns=[c for c in CSV_HIDDEN if c in table]).to_csv(out / "results.csv", index=False)
    failed.to_csv(out / "failed.csv", index=False)
    if len(incomplete):
        incomplete.to_csv(out / "incomplete.csv", index=False)
        files.append(out / "incomplete.csv")
    (out / "results.md").write_text(to_markdown(table, failed, columns, title, incomplete, problems, split))
    (out / "results.tex").write_text(to_latex(table, columns, title, split))
    files += write_convergence(records, out, title, split)
    if plots and len(table):
        files += plot(table, columns, out / "plots")
        curves = validation_curves(records)
        if len(curves):
            files += plot_curves(curves, out / "plots")
        files += study_plots(extra_plots, records, out / "plots")
    files += extra
    log.info(
        "%d runs (%d rows, %d failed, %d incomplete, %d files skipped) -> %s",
        len(records),
        len(table),
        len(failed),
        len(incomplete),
        len(problems),
        out,
    )
    return {
        "table": table,
        "failed": failed,
        "incomplete": incomplete,
        "problems": problems,
        "columns": columns,
        "files": files,
        "records": records,
    }


def study_label(title: str, directory: Path) -> str:
    """A study's name in a ranking: ``title``, or ``<study>/runs`` for a study's published ``runs/``."""
    return f"{directory.resolve().parent.name}/{title}" if title == "runs" else title


def against_target(other: str) -> tuple[list[Path], str, tuple[str, ...]]:
    """(directories, name, stages left out: `stages_left_out`) of the study or directory given to
    ``--against``; checked before anything is written."""
    try:
        sources, _, title = resolve_target(other)
    except SystemExit as error:
        raise SystemExit(f"--against {other}: {error}") from None
    return sources, study_label(title, sources[0]), stages_left_out(other)


def ranking_against(
    result: dict, title: str, source: Path, other: tuple[list[Path], str, tuple[str, ...]], out: Path
) -> list[Path]:
    """ranking.{md,csv} in ``out``: the rows of ``result`` (a `summarise` of the test split of ``source``)
    ranked against those of ``other`` (`against_target`; read, not written)."""
    other_sources, other_title, other_stages = other
    other_records = load_runs(other_sources, "test", stages_left_out=other_stages)
    if not other_records:
        raise SystemExit(
            f"--against {other_title}: no {RESULTS_FILE} run records under {', '.join(map(str, other_sources))}"
        )
    mine = study_rows(study_label(title, source), result["table"], result["columns"], result["records"], "a")
    theirs = records_rows(other_title, other_records, "b")
    return write_ranking(mine, theirs, out)


def by_groups(records: Sequence[dict[str, Any]], key: str) -> list[tuple[Any, list[dict[str, Any]]]]:
    """The finished records split by their value of flat config key ``key``: exactly two ``(value,
    records)`` pairs in value order (numbers numerically), or an error naming the values found."""
    groups: dict[Any, list[dict[str, Any]]] = {}
    for record in records:
        if record["status"] == "success":
            groups.setdefault(record["flat"].get(key), []).append(dict(record))
    if len(groups) != 2 or None in groups:
        values = ", ".join(f"{value!r} ({len(runs)} runs)" for value, runs in groups.items())
        raise SystemExit(
            f"--by {key}: the finished runs take {len(groups)} value(s) of {key} ({values or 'no runs'}); "
            "--by ranks the runs of exactly two values, and every run must set the key (a leaf key of the "
            "run config, e.g. trainer.max_steps or method.name)"
        )
    return sorted(groups.items(), key=lambda item: _sort_key(item[0]))


def ranking_by(result: dict, title: str, key: str, out: Path) -> list[Path]:
    """ranking.{md,csv} in ``out``: the methods ranked separately among the runs of each of the two values of
    config key ``key`` in ``result`` (a `summarise` of the test split), the later value against the first
    (``--by trainer.max_steps``: does a ranking at one budget hold at the other?)."""
    (first, mine), (second, theirs) = by_groups(result["records"], key)
    return write_ranking(
        records_rows(f"{title} ({key}={first})", mine, "a"),
        records_rows(f"{title} ({key}={second})", theirs, "b"),
        out,
    )


def _sort_key(value: Any) -> tuple[int, Any]:
    """Numbers in numeric order before anything else in text order."""
    return (0, value) if isinstance(value, int | float) and not isinstance(value, bool) else (1, str(value))


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m mtpeft.results", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", help="a study name (logs/<name>/ -> experiments/<name>/) or a directory")
    parser.add_argument("--out", type=Path, help="write here instead")
    parser.add_argument(
        "--split", default="test", choices=["test", "val"], help="which metrics (default test)"
    )
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    parser.add_argument(
        "--plot",
        action="append",
        default=[],
        choices=sorted(STUDY_PLOTS),
        help="a study plot to add (repeatable); a study name adds those its experiment config declares",
    )
    parser.add_argument(
        "--against",
        metavar="STUDY",
        help="another study (name or directory): write ranking.md comparing the method rankings (test split)",
    )
    parser.add_argument(
        "--by",
        metavar="KEY",
        help="a config key with two values in the runs (e.g. trainer.max_steps): write ranking.md comparing "
        "the method rankings of the two values' runs (test split)",
    )
    args = parser.parse_args(argv)
    if args.against and args.by:
        parser.error("--against and --by both write ranking.md: give one")
    for option in ("against", "by"):
        if getattr(args, option) and args.split != "test":
            parser.error(f"--{option} compares test rankings (per-example test scores): drop --split val")
    other = against_target(args.against) if args.against else None
    sources, out, title = resolve_target(args.target)
    stages = stages_left_out(args.target)
    out = args.out or out
    if args.by:
        by_groups(load_runs(sources, "test", stages_left_out=stages), args.by)  # checked before any writing
    declared = [] if Path(args.target).is_dir() else declared_plots(args.target, CONF_DIR)
    extra_plots = list(dict.fromkeys([*declared, *args.plot]))
    result = summarise(sources, out, title, args.split, not args.no_plots, extra_plots, stages)
    if other:
        result["files"] += ranking_against(result, title, sources[0], other, out)
    if args.by:
        result["files"] += ranking_by(result, study_label(title, sources[0]), args.by, out)
    print(f"wrote {', '.join(str(f) for f in result['files'][:4])} and {len(result['files']) - 4} more files")
    for kind in ("failed", "incomplete"):
        if len(result[kind]):
            print(f"{len(result[kind])} {kind} run(s): see {out / 'results.md'}")
    if result["problems"]:
        print(f"{len(result['problems'])} file(s) skipped (not run records): see {out / 'results.md'}")
    return out
