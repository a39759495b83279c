"""Plots (PNG + PDF, no creation dates so re-running gives identical files) in ``<out>/plots/``.

Every table gets ``per_task`` (grouped bars with error bars), ``pareto`` (average score vs trainable
parameters, log scale, with the Pareto front; the frozen base model is a dashed line), ``val_curves``
(per-task validation score vs step, mean over seeds), and from the statistics of `mtpeft.results.stats`
``ci`` (rows ordered by average score with 95% CI bars) and ``pairwise`` (a better / tie / worse matrix of the paired
differences).

Study-specific plots are declared by the study, not chosen here: `STUDY_PLOTS` maps a plot kind to the
function that draws it from the run records, and a study names the kinds it wants in its experiment config
(``report: {plots: [temperature]}`` in ``conf/experiment/<name>.yaml``, `declared_plots`; ``--plot`` on
the command line for a directory). Kinds: ``temperature`` (per-task score vs the mixture temperature
``data.temperature``, a line per method; written when the runs differ in it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from mtpeft.results.render import row_label


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _labels(table: pd.DataFrame) -> list[str]:
    varying = [key for key in ("model", "mixture") if table[key].nunique() > 1]
    return [" / ".join([row_label(row), *(row[k] for k in varying)]) for _, row in table.iterrows()]


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats (fewer or equal parameters and a higher score)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def save_figure(fig: Any, out: Path, name: str) -> list[Path]:
    """Write ``<name>.png`` and ``<name>.pdf`` without creation dates (re-running gives identical files)."""
    plt = _pyplot()
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.{ext}" for ext in ("png", "pdf")]
    fig.savefig(paths[0], bbox_inches="tight", dpi=150, metadata={"Software": None})
    fig.savefig(paths[1], bbox_inches="tight", dpi=150, metadata={"CreationDate": None, "Creator": None})
    plt.close(fig)
    return paths


def plot(table: pd.DataFrame, columns: Sequence[str], out: Path) -> list[Path]:
    """Write plots/per_task.{png,pdf} and plots/pareto.{png,pdf}; return the files."""
    plt = _pyplot()
    out.mkdir(parents=True, exist_ok=True)
    labels = _labels(table)
    n = len(table)
    width = 0.8 / max(n, 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(columns) + 0.15 * n * len(columns)), 4))
    for j, (_, row) in enumerate(table.iterrows()):
        xs = [i + (j - (n - 1) / 2) * width for i in range(len(columns))]
        means = [100 * row[f"{t}_mean"] for t in columns]
        errs = [0.0 if math.isnan(row[f"{t}_std"]) else 100 * row[f"{t}_std"] for t in columns]
        ax.bar(xs, means, width, yerr=errs, capsize=2, label=labels[j])
    ax.set_xticks(range(len(columns)), columns)
    ax.set_ylabel("test score (%)")
    ax.legend(fontsize="small", ncol=max(1, n // 12), loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("Per-task test score (mean ± std over seeds)")
    written = save_figure(fig, out, "per_task")
    return written + _pareto(table, labels, out)


def _pareto(table: pd.DataFrame, labels: list[str], out: Path) -> list[Path]:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    points = []
    for j, (_, row) in enumerate(table.iterrows()):
        mean, std, params = 100 * row["avg_mean"], row["avg_std"], row["trainable_params"]
        if math.isnan(mean) or math.isnan(params):
            continue
        if params <= 0:
            ax.axhline(mean, ls="--", color="grey", lw=1)
            ax.annotate(labels[j], (0.01, mean), xycoords=("axes fraction", "data"), fontsize="small")
            continue
        err = 0.0 if math.isnan(std) else 100 * std
        ax.errorbar(params, mean, yerr=err, fmt="o", capsize=2)
        ax.annotate(labels[j], (params, mean), fontsize="small", xytext=(3, 3), textcoords="offset points")
        points.append((params, mean))
    if points:
        front = sorted((points[i] for i in pareto_front(points)), key=lambda p: p[0])
        ax.step(
            [p[0] for p in front],
            [p[1] for p in front],
            where="post",
            color="black",
            lw=1,
            label="Pareto front",
        )
        ax.set_xscale("log")
        ax.legend(fontsize="small")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("average test score (%)")
    ax.set_title("Score vs trainable parameters")
    return save_figure(fig, out, "pareto")


def plot_task_lines(
    data: pd.DataFrame, x: str, series: str, out: Path, name: str, ylabel: str, logx: bool = False
) -> list[Path]:
    """``plots/<name>.{png,pdf}``: one panel per task, score (mean over seeds) vs ``x``, a line per ``series``."""
    plt = _pyplot()
    tasks = list(dict.fromkeys(data["task"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.2), sharey=True, squeeze=False)
    mean = data.groupby([series, "task", x])["score"].mean().reset_index()
    for ax, task in zip(axes[0], tasks, strict=True):
        for label, line in mean[mean["task"] == task].groupby(series):
            ax.plot(line[x], 100 * line["score"], marker="o", markersize=3, label=label)
        if logx:
            ax.set_xscale("log")
        ax.set_title(task)
        ax.set_xlabel(x)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=7, loc="best")
    return save_figure(fig, out, name)


def plot_curves(curves: pd.DataFrame, out: Path) -> list[Path]:
    """plots/val_curves.{png,pdf}: per-task validation score vs step, mean over seeds, one line per row."""
    return plot_task_lines(curves, "step", "label", out, "val_curves", "validation score (%)")


def plot_temperature(scores: pd.DataFrame, out: Path) -> list[Path]:
    """plots/temperature.{png,pdf}: per-task score (mean over seeds) vs sampling temperature T, per method."""
    return plot_task_lines(scores, "temperature", "method", out, "temperature", "score (%)", logx=True)


def temperature_scores(records: list[dict[str, Any]]) -> pd.DataFrame:
    """Long table ``method, temperature, task, score`` of successful runs (empty unless T varies)."""
    rows = [
        {
            "method": r["method"],
            "temperature": r["flat"].get("data.temperature"),
            "task": task,
            "score": score,
        }
        for r in records
        if r["status"] == "success"
        for task, score in r["scores"].items()
        if score is not None
    ]
    table = pd.DataFrame(rows)
    if table.empty or table["temperature"].nunique() < 2:
        return pd.DataFrame()
    return table


def temperature_plot(records: list[dict[str, Any]], out: Path) -> list[Path]:
    """Study plot ``temperature``: `plot_temperature` of `temperature_scores` (nothing if T is fixed)."""
    scores = temperature_scores(records)
    return plot_temperature(scores, out) if len(scores) else []


StudyPlot = Callable[[list[dict[str, Any]], Path], list[Path]]
STUDY_PLOTS: dict[str, StudyPlot] = {"temperature": temperature_plot}
"""Plot kinds a study can declare (``report.plots``): name -> f(run records, plots dir) -> files written."""


def check_study_plots(names: Sequence[str], where: str = "report.plots") -> list[str]:
    """``names`` as a list, every one a kind of `STUDY_PLOTS` (else a ValueError naming it and the kinds)."""
    if isinstance(names, str) or not all(isinstance(name, str) for name in names):
        raise ValueError(f"{where} must be a list of plot names, e.g. [temperature]; got {names!r}")
    unknown = [name for name in names if name not in STUDY_PLOTS]
    if unknown:
        raise ValueError(
            f"{where}: unknown plot {unknown[0]!r}; study plots: {', '.join(sorted(STUDY_PLOTS))} "
            "(register a new kind in mtpeft/results/plots.py STUDY_PLOTS)"
        )
    return list(names)


def study_plots(names: Sequence[str], records: list[dict[str, Any]], out: Path) -> list[Path]:
    """Draw the study plots ``names`` (`STUDY_PLOTS`) into ``out``; return the files written."""
    return [path for name in check_study_plots(names) for path in STUDY_PLOTS[name](records, out)]


def declared_plots(name: str, conf_dir: Path) -> list[str]:
    """The study plots that ``<conf_dir>/experiment/<name>.yaml`` declares (``report.plots``); none when
    there is no such file (a directory, or a study name that is not an experiment config)."""
    path = conf_dir / "experiment" / f"{name}.yaml"
    if not path.is_file():
        return []
    report = (yaml.safe_load(path.read_text()) or {}).get("report") or {}
    return check_study_plots(report.get("plots") or [], where=f"report.plots in {path}")


def plot_ci(intervals: pd.DataFrame, out: Path) -> list[Path]:
    """plots/ci.{png,pdf}: average test score per row, best first, with the 95% CI the results table shows
    (columns ``shown_low``, ``shown_high``: `mtpeft.results.stats.shown_interval`)."""
    plt = _pyplot()
    data = intervals.sort_values("estimate", ascending=True)
    fig, ax = plt.subplots(figsize=(6, 0.35 * len(data) + 1.2))
    ys = range(len(data))
    est = 100 * data["estimate"]
    err = [est - 100 * data["shown_low"], 100 * data["shown_high"] - est]
    ax.errorbar(est, list(ys), xerr=err, fmt="o", capsize=3)
    ax.set_yticks(list(ys), data["label"].tolist())
    ax.set_xlabel(
        "average test score (%), 95% CI (t over seeds and bootstrap, envelope; one seed: bootstrap)"
    )
    ax.set_title("Methods ordered by average test score")
    return save_figure(fig, out, "ci")


def plot_pairwise(pairs: pd.DataFrame, order: Sequence[str], out: Path) -> list[Path]:
    """plots/pairwise.{png,pdf}: cell (row A, column B) is A - B in points, coloured better / tie / worse."""
    plt = _pyplot()
    from matplotlib.colors import ListedColormap

    index = {label: i for i, label in enumerate(order)}
    n = len(order)
    verdict = [[math.nan] * n for _ in range(n)]
    text = [[""] * n for _ in range(n)]
    for _, pair in pairs.iterrows():
        for a, b, sign in ((pair["a"], pair["b"], 1), (pair["b"], pair["a"], -1)):
            i, j = index[a], index[b]
            verdict[i][j] = {"better": 1, "tie": 0, "worse": -1}[pair["verdict"]] * sign
            text[i][j] = f"{100 * sign * pair['diff']:+.1f}"
    fig, ax = plt.subplots(figsize=(0.7 * n + 2.5, 0.6 * n + 1.5))
    cmap = ListedColormap(["#d6604d", "#f0f0f0", "#4393c3"])
    ax.imshow(verdict, cmap=cmap, vmin=-1.5, vmax=1.5)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, text[i][j], ha="center", va="center", fontsize=7)
    ax.set_xticks(range(n), order, rotation=45, ha="right")
    ax.set_yticks(range(n), order)
    ax.set_title("Row minus column (points): blue better, red worse, grey tie (a 95% CI contains 0)")
    return save_figure(fig, out, "pairwise")
