"""What is noise: confidence intervals over seeds and test items, and paired method comparisons.

Every run saves its per-example scores (``scores.jsonl.gz``, `mtpeft.metrics.tracker`). A row's average
test score is ``mean over seeds of (mean over tasks of (mean over the task's test items))``. Its 95%
confidence interval comes from a two-stage (hierarchical) bootstrap that resamples both sources of
noise: each replicate draws the seeds with replacement, then, independently for every drawn seed, the
test items of every task with replacement (stratified by task, so each task keeps its size), and
recomputes the statistic; the interval is the 2.5 and 97.5 percentiles of the replicates. With one seed
only the test items are resampled (the interval then ignores seed noise).

With a few seeds that bootstrap is too narrow: its seed stage cannot reach past the extreme seeds (with 2
seeds, half the replicates draw one seed twice and sit at that seed's own average), and it has no
small-sample correction, so it covers the true mean less often than its nominal 95 %. So every row with at
least two seeds also gets the textbook interval over its seeds, the Student t interval of the mean of its
seeds' averages, ``mean ± t(0.975, S-1) * sd / sqrt(S)`` (``t_low``, ``t_high``; t(0.975, 1) = 12.7: two
seeds bound a mean only loosely, and the interval says so). Where each seed draws its own test items (the
generated tasks), each seed's average is an independent measurement of both noises and the t interval
holds at its nominal level; where every seed is scored on the same test set (data files, hub test splits),
it holds seed noise only and the bootstrap holds the item noise. So the results tables show, for a row with
two seeds or more, the envelope of the two intervals (clipped to [0, 1], the range of every score), and the
bootstrap's for a one-seed row (item noise only).

Paired comparison of rows A and B: on the seeds both have, with the data of one seed the test items are
the same for every method (checked by index and record digest), so the per-item differences
``score_A - score_B`` are bootstrapped the same way (the statistic is linear, so this is the difference
of the averages under a shared resampling), and the per-seed differences give a paired t interval. The
verdict is ``better`` / ``worse`` when the bootstrap CI of the difference excludes 0 and, with two seeds
or more, the paired t interval excludes it on the same side; else ``tie``. No multiple-comparison
correction is applied: with many pairs, a few verdicts at the edge of their CI are expected by chance.

Only tasks whose score is a per-example metric (exact match, F1, numeric, pass@k, ROUGE, ...) can be
bootstrapped; a row with a corpus-level score (BLEU, ``evaluate:``) or without saved scores gets no
interval, and the reason is listed.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import t as student_t

from mtpeft.results.render import row_label

log = logging.getLogger(__name__)
SCORES_FILE = "scores.jsonl.gz"
"""Per-example scores of a run (`mtpeft.metrics.tracker.SCORES_FILE`; repeated: no torch import here)."""

N_BOOT = 2000
"""Bootstrap replicates (percentile intervals; the 2.5% tails hold 50 replicates each)."""
LEVEL = 0.95
TOLERANCE = 1e-9
"""How far a task's mean per-example score may be from the logged score before the scores are rejected."""

Cells = dict[Any, dict[str, np.ndarray]]
"""``cells[seed][task]``: the per-item scores of one task under one seed, in index order."""


def bootstrap(cells: Cells, n_boot: int = N_BOOT, rng: np.random.Generator | None = None) -> np.ndarray:
    """Replicates of ``mean_seed mean_task mean_item`` under the two-stage resampling described above.
    Seeds and tasks are taken in sorted order, so the replicates do not depend on the order the runs were
    read in (a table rebuilt from published runs gives the same intervals as one built from the logs)."""
    return joint_bootstrap([cells], n_boot, rng)[0]


def joint_bootstrap(
    rows: Sequence[Cells], n_boot: int = N_BOOT, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Replicates (one row per entry of ``rows``, ``n_boot`` columns) of the statistic of `bootstrap`, with
    the same draws (seeds, then items) for every row: for rows scored on the same seeds and test items, so
    that differences between rows keep their pairing (what ranks need). With one row it is `bootstrap`."""
    rng = rng if rng is not None else np.random.default_rng(0)
    seeds = sorted(rows[0], key=str) if rows else []
    if not seeds or any(not tasks for tasks in rows[0].values()):
        raise ValueError("bootstrap needs at least one seed with at least one task")
    shape = {seed: {task: len(values) for task, values in rows[0][seed].items()} for seed in seeds}
    if any(
        {seed: {t: len(v) for t, v in cells.get(seed, {}).items()} for seed in seeds} != shape
        for cells in rows
    ):
        raise ValueError("a joint bootstrap needs rows with the same seeds, tasks and numbers of items")
    n_seeds = len(seeds)
    picks = rng.integers(0, n_seeds, size=(n_boot, n_seeds))  # replicate b draws seeds picks[b, :]
    total = np.zeros((len(rows), n_boot))
    for s, seed in enumerate(seeds):  # an independent item resample for every draw of every seed
        replicate = np.nonzero(picks == s)[0]  # one entry per (replicate, slot) that drew this seed
        if not len(replicate):
            continue
        task_sums = np.zeros((len(rows), len(replicate)))
        for task, n_items in sorted(shape[seed].items()):
            drawn = rng.integers(0, n_items, size=(len(replicate), n_items))
            for r, cells in enumerate(rows):
                task_sums[r] += cells[seed][task][drawn].mean(axis=1)
        for r in range(len(rows)):
            np.add.at(total[r], replicate, task_sums[r] / len(shape[seed]))
    return total / n_seeds


def seed_averages(cells: Cells) -> np.ndarray:
    """Each seed's average: the mean over tasks of the item means."""
    return np.array([np.mean([v.mean() for v in tasks.values()]) for tasks in cells.values()])


def estimate(cells: Cells) -> float:
    """The statistic on the data itself: mean over seeds of the mean over tasks of the item means."""
    return float(np.mean(seed_averages(cells)))


def interval(
    cells: Cells, n_boot: int = N_BOOT, level: float = LEVEL, rng: np.random.Generator | None = None
) -> tuple[float, float, float]:
    """(estimate, low, high): the statistic and its percentile bootstrap interval."""
    replicates = bootstrap(cells, n_boot, rng)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(replicates, [tail, 100 - tail])
    return estimate(cells), float(low), float(high)


def seed_interval(cells: Cells, level: float = LEVEL) -> tuple[float, float]:
    """(low, high): the Student t interval of the mean of the seeds' averages (`seed_averages`); (nan, nan)
    with fewer than two seeds."""
    averages = seed_averages(cells)
    if len(averages) < 2:
        return math.nan, math.nan
    half = student_t.ppf((1 + level) / 2, len(averages) - 1) * averages.std(ddof=1) / math.sqrt(len(averages))
    return float(averages.mean() - half), float(averages.mean() + half)


@dataclass
class RowScores:
    """The per-item test scores of one table row, and the digests that identify its items."""

    label: str
    cells: Cells = field(default_factory=dict)
    items: dict[Any, dict[str, list[str]]] = field(default_factory=dict)
    problem: str | None = None


def _run_cells(
    path: Path, tasks: Sequence[str], logged: dict[str, float]
) -> tuple[dict[str, np.ndarray], dict[str, list[str]], str | None]:
    """One run's per-task score arrays and item digests from its scores file (problem text if unusable)."""
    file = path / SCORES_FILE
    if not file.is_file():
        return {}, {}, f"{file} missing (a run from before per-example scores were saved?)"
    from mtpeft.metrics.tracker import read_example_scores  # imports torch: only when there are scores

    rows = [r for r in read_example_scores(file) if r.get("split") == "test"]
    cells, items = {}, {}
    for task in tasks:
        mine = sorted((r for r in rows if r.get("task") == task), key=lambda r: r.get("index") or 0)
        if not mine or any(r.get("score") is None for r in mine):
            return {}, {}, f"task {task!r} has no per-example score in {file} (a corpus-level metric?)"
        values = np.array([r["score"] for r in mine], dtype=np.float64)
        expected = logged.get(task)
        if expected is not None and abs(values.mean() - expected) > TOLERANCE:
            return {}, {}, f"{file}: mean {task} score {values.mean():.6f} != logged {expected:.6f}"
        cells[task] = values
        items[task] = [f"{r.get('index')}:{r.get('item')}" for r in mine]
    return cells, items, None


def row_scores(row: pd.Series, tasks: Sequence[str], logged: dict[str, dict[str, float]]) -> RowScores:
    """Collect the per-item scores of every run (seed) of a table row; ``logged[path][task]`` checks them."""
    scores = RowScores(row_label(row))
    for seed, path in row["runs"]:
        cells, items, problem = _run_cells(Path(path), tasks, logged.get(path, {}))
        if problem:
            scores.problem = problem
            return scores
        scores.cells[seed], scores.items[seed] = cells, items
    return scores


def row_generator(seed: int, *labels: str) -> np.random.Generator:
    """A generator for one row's (or one pair's) bootstrap, from ``seed`` and the rows' labels."""
    return np.random.default_rng([seed, *(zlib.crc32(label.encode()) for label in labels)])


def paired_cells(a: RowScores, b: RowScores) -> tuple[Cells, str | None]:
    """Per-item differences A - B on the seeds both rows have (items must be the same ones)."""
    common = [seed for seed in a.cells if seed in b.cells]
    if not common:
        return {}, "no seed in common"
    diffs: Cells = {}
    for seed in common:
        if a.items[seed] != b.items[seed]:
            return {}, f"seed {seed}: the two rows scored different test items"
        diffs[seed] = {task: a.cells[seed][task] - b.cells[seed][task] for task in a.cells[seed]}
    return diffs, None


def verdict(low: float, high: float, t_low: float = math.nan, t_high: float = math.nan) -> str:
    """``better`` / ``worse`` when the bootstrap CI of A - B excludes 0 and the seed t interval (when there is
    one: two seeds or more) excludes it on the same side, else ``tie``."""
    call = _side(low, high)
    return call if math.isnan(t_low) or _side(t_low, t_high) == call else "tie"


def _side(low: float, high: float) -> str:
    return "better" if low > 0 else "worse" if high < 0 else "tie"


def shown_interval(row: pd.Series) -> tuple[float, float]:
    """The interval a results table shows for a row of ``intervals``: with two seeds or more the envelope of
    the seed t interval and the bootstrap's (the first misses item noise on a test set shared by the seeds,
    the second is too narrow with few seeds), clipped to [0, 1]; with one seed the bootstrap's (item noise
    only). A pair's verdict is ``better``/``worse`` exactly when the (unclipped) envelope of its two intervals
    excludes 0."""
    low, high = row["ci_low"], row["ci_high"]
    if row["seeds"] >= 2 and not math.isnan(row["t_low"]):
        low, high = min(low, row["t_low"]), max(high, row["t_high"])
    return max(low, 0.0), min(high, 1.0)


def compare(
    table: pd.DataFrame,
    tasks: Sequence[str],
    logged: dict[str, dict[str, float]],
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame, list[tuple[str, str]]]:
    """(intervals, pairs, problems): a CI per row and a paired comparison per pair of rows.

    ``intervals``: label, row index, estimate, ci_low, ci_high (bootstrap), t_low, t_high (seed t interval),
    seeds; ``pairs``: a, b, diff, ci_low, ci_high, t_low, t_high, verdict, seeds (A is the row ahead on the
    seeds both have, so ``diff >= 0``). Fixed ``seed``: same numbers every time;
    each interval draws from its own generator (`row_generator`), so it depends on its own row's (or pair's) data only,
    not on which other rows the table holds or their order.
    """
    rows, problems = [], []
    for i, row in table.iterrows():
        scores = row_scores(row, tasks, logged)
        if scores.problem:
            problems.append((scores.label, scores.problem))
            continue
        est, low, high = interval(scores.cells, n_boot, rng=row_generator(seed, scores.label))
        rows.append((i, scores, est, low, high))
    intervals = pd.DataFrame(
        [
            {
                "label": s.label,
                "row": i,
                "estimate": e,
                "ci_low": lo,
                "ci_high": hi,
                **dict(zip(("t_low", "t_high"), seed_interval(s.cells), strict=True)),
                "seeds": len(s.cells),
            }
            for i, s, e, lo, hi in rows
        ],
        columns=["label", "row", "estimate", "ci_low", "ci_high", "t_low", "t_high", "seeds"],
    )
    ranked = sorted(rows, key=lambda r: -r[2])
    pairs = []
    for x, (_, a, *_) in enumerate(ranked):
        for _, b, *_ in ranked[x + 1 :]:
            diffs, problem = paired_cells(a, b)
            if problem:
                problems.append((f"{a.label} vs {b.label}", problem))
                continue
            est, low, high = interval(diffs, n_boot, rng=row_generator(seed, a.label, b.label))
            t_low, t_high = seed_interval(diffs)
            first, second = a.label, b.label
            if est < 0:  # ahead over all its seeds, behind on the shared ones: the pair reads best first
                first, second, est, low, high, t_low, t_high = (
                    second,
                    first,
                    -est,
                    -high,
                    -low,
                    -t_high,
                    -t_low,
                )
            pairs.append(
                {
                    "a": first,
                    "b": second,
                    "diff": est,
                    "ci_low": low,
                    "ci_high": high,
                    "t_low": t_low,
                    "t_high": t_high,
                    "verdict": verdict(low, high, t_low, t_high),
                    "seeds": len(diffs),
                }
            )
    pairs_table = pd.DataFrame(
        pairs, columns=["a", "b", "diff", "ci_low", "ci_high", "t_low", "t_high", "verdict", "seeds"]
    )
    return intervals, pairs_table, problems


def to_markdown(
    intervals: pd.DataFrame, pairs: pd.DataFrame, problems: Sequence[tuple[str, str]], title: str
) -> str:
    """stats.md: the CI of each row (best first) and every paired comparison."""
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    span = lambda lo, hi, f=pct: "—" if math.isnan(lo) else f"[{f(lo)}, {f(hi)}]"  # noqa: E731
    signed = lambda v: f"{100 * v:+.1f}"  # noqa: E731
    lines = [
        f"# {title}: confidence intervals and paired comparisons",
        "",
        "Average test score (%) with two 95% CIs: the Student t interval over the seeds' averages (rows with "
        "two seeds or more; it holds item noise too only where each seed draws its own test items) and a "
        f"hierarchical bootstrap (seeds, then test items within each seed, stratified by task; {N_BOOT} "
        "replicates), which is too narrow with few seeds (it cannot reach past the extreme seeds) and with one "
        "seed holds item noise only; results.md shows their envelope. Paired: the difference of two rows on "
        "the same seeds and test items; `better`/`worse` when its bootstrap CI and (two seeds or more) its paired t interval both exclude 0, "
        "else `tie` (no multiple-comparison correction).",
        "",
        "| rank | row | seeds | avg | 95% CI (t over seeds) | 95% CI (bootstrap) |",
        "|---|---|---|---|---|---|",
    ]
    ordered = intervals.sort_values("estimate", ascending=False, kind="stable")
    for rank, (_, r) in enumerate(ordered.iterrows(), 1):
        lines.append(
            f"| {rank} | {r['label']} | {r['seeds']} | {pct(r['estimate'])} | {span(r['t_low'], r['t_high'])} "
            f"| {span(r['ci_low'], r['ci_high'])} |"
        )
    if len(pairs):
        lines += [
            "",
            "## Paired differences (A - B, points)",
            "",
            "| A | B | seeds | A - B | 95% CI (paired t) | 95% CI (bootstrap) | verdict |",
        ]
        lines.append("|---|---|---|---|---|---|---|")
        for _, p in pairs.iterrows():
            lines.append(
                f"| {p['a']} | {p['b']} | {p['seeds']} | {signed(p['diff'])} "
                f"| {span(p['t_low'], p['t_high'], signed)} | {span(p['ci_low'], p['ci_high'], signed)} "
                f"| {p['verdict']} |"
            )
    if problems:
        lines += ["", f"## Left out ({len(problems)})", "", "| row or pair | reason |", "|---|---|"]
        lines += [f"| {what} | {why} |" for what, why in problems]
    return "\n".join(lines) + "\n"


def summarise_stats(
    table: pd.DataFrame,
    columns: Sequence[str],
    records: Sequence[dict[str, Any]],
    out: Path,
    title: str,
    plots: bool,
) -> list[Path]:
    """Write stats.md / stats.csv / pairwise.csv (+ plots/ci, plots/pairwise); add the CI to ``table``.

    Nothing is written when no row has per-example scores (e.g. runs from before they were saved)."""
    tasks = [c for c in columns if c != "avg"]
    logged = {r["path"]: {t: r["scores"].get(t) for t in tasks} for r in records}
    intervals, pairs, problems = compare(table, tasks, logged)
    if intervals.empty:
        if problems:
            log.info("no confidence intervals: %s", problems[0][1])
        return []
    shown = pd.DataFrame(
        [shown_interval(r) for _, r in intervals.iterrows()], columns=["shown_low", "shown_high"]
    )
    table["avg_ci_low"], table["avg_ci_high"] = math.nan, math.nan
    for row, (low, high) in zip(intervals["row"], shown.itertuples(index=False), strict=True):
        table.loc[row, ["avg_ci_low", "avg_ci_high"]] = [low, high]
    files = [out / "stats.md", out / "stats.csv", out / "pairwise.csv"]
    files[0].write_text(to_markdown(intervals, pairs, problems, title))
    intervals.drop(columns=["row"]).to_csv(files[1], index=False)
    pairs.to_csv(files[2], index=False)
    if plots:
        from mtpeft.results.plots import plot_ci, plot_pairwise

        order = intervals.sort_values("estimate", ascending=False, kind="stable")["label"].tolist()
        files += plot_ci(pd.concat([intervals, shown], axis=1), out / "plots")
        if len(pairs):
            files += plot_pairwise(pairs, order, out / "plots")
    return files
