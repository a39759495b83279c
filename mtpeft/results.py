"""Tables and plots from the ``results.json`` files of a study or of any directory of runs.

    python -m mtpeft.results methods_mix3      # reads logs/methods_mix3/ (+ experiments/methods_mix3/),
                                               # writes experiments/methods_mix3/results.{md,csv,tex}, plots/
    python -m mtpeft.results logs/train/multiruns/2026-11-25_10-00-00_ab12cd   # writes into that directory
    make results STUDY=methods_mix3

A study name reads ``<root>/logs/<name>/`` (every multirun and run of the study) and committed results under
``<root>/experiments/<name>/`` (``<root>`` is ``$MTPEFT_ROOT`` or the current directory) and writes to
``<root>/experiments/<name>/``; a directory is read recursively and written into.

Rows: one per configuration apart from its seed, i.e. method x base model x task mixture x *variant*. The
variant lists the config keys that differ between the runs of one (method, model, mixture) in what is read
(e.g. HyCAM ablation switches or ``data.temperature``), so a study of one config per method has plain method
rows. Keys derived from the seed (equal to it in every run) and ``cpu_threads`` are not variants; two runs of
one row with the same seed count once (the newest).

Columns: the per-task test score (``test/<task>/score``) and their average (``test/avg/score``) as
mean ± sample standard deviation (ddof=1) over seeds, in percent, with the number of seeds ``n``; trainable
parameters (and % of the base model), wall time and peak memory (means over seeds; the CUDA allocator
peak on GPU, else the peak RSS of the process, which in a multirun is the maximum over the jobs so far). The best value of each
column is bold: highest score, lowest cost (trainable parameters among methods that train any). Columns
with one value for every row (e.g. the model in a one-model study) move to the caption.
Failed runs are listed separately and never averaged in; a failed run whose config later succeeded is
left out. ``results.csv`` holds the unformatted numbers (``<task>_mean``, ``<task>_std``, ...), ``failed.csv``
the failures.

Plots (PNG + PDF) in ``<out>/plots/``: ``per_task`` (grouped bars with error bars), ``val_curves`` (per-task
validation score vs step from each run's metrics CSV, mean over seeds), ``temperature`` (per-task score vs
the sampling temperature, when runs differ in ``data.temperature``) and ``pareto`` (average
score vs trainable parameters, log scale, with the Pareto front; the frozen base model is a dashed line).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from mtpeft.utils.confighash import hashed_part
from mtpeft.utils.sweep import RESULTS_FILE, read_results, stored_hash

log = logging.getLogger(__name__)

ROW_KEYS = ["method", "model", "mixture", "variant"]
COSTS = ["trainable_params", "total_params", "trainable_percent", "wall_time_s", "peak_memory_mb"]
NOT_VARIANT = {"seed", "cpu_threads"}
_MISSING = "—"


# -- reading ---------------------------------------------------------------------------------------
def model_label(model: Any) -> str:
    """``tiny_<arch>`` for the locally built models, else the last part of ``name_or_path``."""
    if not isinstance(model, dict):
        return _MISSING
    if model.get("kind") == "tiny":
        return f"tiny_{model.get('arch')}"
    return str(model.get("name_or_path", _MISSING)).rstrip("/").split("/")[-1]


def peak_memory(value: Any) -> float | None:
    """MB from results.json's ``peak_memory_mb``: the CUDA allocator peak if recorded, else the CPU peak RSS."""
    if isinstance(value, dict):
        value = value.get("cuda_peak_allocated_mb", value.get("cpu_peak_rss_mb"))
    return value if isinstance(value, int | float) else None


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: repr(node) if isinstance(node, list) else node}


def load_runs(roots: Iterable[Path], split: str = "test") -> list[dict[str, Any]]:
    """One flat record per ``results.json`` under ``roots``: labels, status, scores, costs, flat config."""
    records = []
    for root in roots:
        for path in sorted(Path(root).rglob(RESULTS_FILE)):
            data = read_results(path)
            if data is None:
                continue
            config = data.get("config") if isinstance(data.get("config"), dict) else {}
            tasks = data.get("tasks") or list((config.get("data") or {}).get("tasks") or {})
            metrics = (data.get("metrics") or {}).get(split) or {}
            method = data.get("method") or (config.get("method") or {}).get("name") or _MISSING
            record = {
                "path": str(path.parent),
                "status": data.get("status", "unknown"),
                "method": method,
                "model": model_label(config.get("model")),
                "mixture": "+".join(sorted(tasks)) or _MISSING,
                "seed": data.get("seed", config.get("seed")),
                "config_hash": stored_hash(data),
                "error": data.get("error"),
                "mtime": path.stat().st_mtime,
                "tasks": list(tasks),
                "flat": _flatten(hashed_part(config)),
                "scores": {task: metrics.get(f"{split}/{task}/score") for task in [*tasks, "avg"]},
            }
            record.update({key: data.get(key) for key in COSTS})
            record["peak_memory_mb"] = peak_memory(data.get("peak_memory_mb"))
            records.append(record)
    return records


def assign_variants(records: list[dict[str, Any]]) -> None:
    """Set ``record["variant"]``: the config keys that vary within its (method, model, mixture) group."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault((record["method"], record["model"], record["mixture"]), []).append(record)
    for group in groups.values():
        keys = sorted({key for record in group for key in record["flat"]} - NOT_VARIANT)
        varying = []
        for key in keys:
            values = [record["flat"].get(key, _MISSING) for record in group]
            if len({repr(v) for v in values}) < 2:
                continue
            if all(value == record["seed"] for value, record in zip(values, group, strict=True)):
                continue  # derived from the seed (e.g. data.seed: ${seed})
            varying.append(key)
        for record in group:
            parts = [f"{key.removeprefix('method.')}={record['flat'].get(key, _MISSING)}" for key in varying]
            record["variant"] = ", ".join(parts)


# -- aggregation -----------------------------------------------------------------------------------
def aggregate(records: list[dict[str, Any]]) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """(table, failed, task columns): mean/std/n over seeds per row; failed runs not redone since."""
    assign_variants(records)  # failed runs are labelled against every run of their method...
    success = [r for r in records if r["status"] == "success"]
    assign_variants(success)  # ...successful rows against the successful runs only
    tasks: list[str] = []
    for record in records:
        tasks += [t for t in record["tasks"] if t not in tasks]
    columns = [*tasks, "avg"]
    done = {r["config_hash"] for r in success}
    failed = [r for r in records if r["status"] != "success" and r["config_hash"] not in done]
    runs = pd.DataFrame(
        [
            {
                **{key: r[key] for key in [*ROW_KEYS, "seed", "mtime", "path", *COSTS]},
                **{f"score_{task}": r["scores"].get(task) for task in columns},
            }
            for r in success
        ],
        columns=[*ROW_KEYS, "seed", "mtime", "path", *COSTS, *(f"score_{t}" for t in columns)],
    )
    runs = runs.sort_values("mtime").drop_duplicates([*ROW_KEYS, "seed"], keep="last")
    rows = []
    for key, group in runs.groupby(ROW_KEYS, sort=False, dropna=False):
        row = dict(zip(ROW_KEYS, key, strict=True))
        row["n"] = len(group)
        row["seeds"] = " ".join(str(s) for s in sorted(group["seed"].tolist(), key=str))
        for task in columns:
            values = pd.to_numeric(group[f"score_{task}"], errors="coerce").dropna()
            row[f"{task}_mean"] = values.mean() if len(values) else math.nan
            row[f"{task}_std"] = values.std(ddof=1) if len(values) > 1 else math.nan
            row[f"{task}_n"] = len(values)
        for cost in COSTS:
            row[cost] = pd.to_numeric(group[cost], errors="coerce").mean()
        rows.append(row)
    table = pd.DataFrame(rows)
    if len(table):
        table = table.sort_values(["model", "mixture", "method", "variant"], kind="stable").reset_index(
            drop=True
        )
    failed_table = pd.DataFrame(
        [{key: r.get(key) for key in [*ROW_KEYS, "seed", "error", "path"]} for r in failed],
        columns=[*ROW_KEYS, "seed", "error", "path"],
    )
    return table, failed_table, columns


def best_rows(table: pd.DataFrame, columns: Sequence[str]) -> dict[str, set[int]]:
    """Row indices holding the best value of each column (ties all count)."""
    best: dict[str, set[int]] = {}
    for task in columns:
        values = table[f"{task}_mean"]
        if values.notna().any():
            best[task] = set(table.index[values == values.max()])
    for cost in ("trainable_params", "wall_time_s", "peak_memory_mb"):
        values = table[cost]
        if cost == "trainable_params":
            values = values.where(values > 0)
        if values.notna().any():
            best[cost] = set(table.index[values == values.min()])
    return best


# -- formatting ------------------------------------------------------------------------------------
def _score(mean: float, std: float) -> str:
    if mean is None or math.isnan(mean):
        return _MISSING
    return f"{100 * mean:.1f}" if math.isnan(std) else f"{100 * mean:.1f} ± {100 * std:.1f}"


def _count(value: float) -> str:
    if value is None or math.isnan(value):
        return _MISSING
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if value >= div:
            return f"{value / div:.3g}{unit}"
    return f"{value:.0f}"


def _number(value: float, digits: int = 0) -> str:
    return _MISSING if value is None or math.isnan(value) else f"{value:.{digits}f}"


def display_table(
    table: pd.DataFrame, columns: Sequence[str]
) -> tuple[list[str], list[list[str]], list[str]]:
    """(header, cells, caption notes): formatted cells with ``**`` around the best of each column."""
    best = best_rows(table, columns)
    constant = [key for key in ("model", "mixture") if table[key].nunique() == 1]
    notes = [f"{key}: {table[key].iloc[0]}" for key in constant]
    header = [
        "method",
        *[k for k in ("model", "mixture") if k not in constant],
        "n",
        *columns,
        "trainable (% base)",
        "wall time (s)",
        "peak memory (MB)",
    ]
    cells = []
    for i, row in table.iterrows():
        label = f"{row['method']} ({row['variant']})" if row["variant"] else row["method"]
        scores = [(task, _score(row[f"{task}_mean"], row[f"{task}_std"])) for task in columns]
        costs = [
            (
                "trainable_params",
                f"{_count(row['trainable_params'])} ({_number(row['trainable_percent'], 2)}%)",
            ),
            ("wall_time_s", _number(row["wall_time_s"])),
            ("peak_memory_mb", _number(row["peak_memory_mb"])),
        ]
        marked = [f"**{text}**" if i in best.get(key, ()) else text for key, text in [*scores, *costs]]
        labels = [row[k] for k in ("model", "mixture") if k not in constant]
        cells.append([label, *labels, str(row["n"]), *marked])
    return header, cells, notes


def to_markdown(table: pd.DataFrame, failed: pd.DataFrame, columns: Sequence[str], title: str) -> str:
    lines = [f"# {title}", ""]
    if len(table):
        header, cells, notes = display_table(table, columns)
        lines += [
            "Test score (%) as mean ± std over seeds (n seeds); best per column in bold. " + "; ".join(notes),
            "",
            "| " + " | ".join(header) + " |",
            "|" + "|".join("---" for _ in header) + "|",
        ]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
    else:
        lines.append("No successful runs.")
    if len(failed):
        lines += ["", f"## Failed runs ({len(failed)}, not averaged in)", ""]
        lines += [
            "| method | variant | model | mixture | seed | error | directory |",
            "|---|---|---|---|---|---|---|",
        ]
        for _, row in failed.iterrows():
            error = str(row["error"] or "").splitlines()[0][:200].replace("|", "\\|") if row["error"] else ""
            lines.append(
                f"| {row['method']} | {row['variant']} | {row['model']} | {row['mixture']} | {row['seed']} "
                f"| {error} | {row['path']} |"
            )
    return "\n".join(lines) + "\n"


_TEX = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "_": r"\_",
    "#": r"\#",
    "$": r"\$",
    "{": r"\{",
    "}": r"\}",
    "±": r"$\pm$",
    "—": "--",
}


def _tex_escape(text: str) -> str:
    return "".join(_TEX.get(char, char) for char in text)


def to_latex(table: pd.DataFrame, columns: Sequence[str], title: str) -> str:
    if not len(table):
        return f"% {title}: no successful runs\n"
    header, cells, notes = display_table(table, columns)

    def cell(text: str) -> str:
        bold = text.startswith("**") and text.endswith("**")
        text = _tex_escape(text.strip("*") if bold else text)
        return rf"\textbf{{{text}}}" if bold else text

    lines = [
        "% " + title + " (generated by python -m mtpeft.results; needs \\usepackage{booktabs})",
        r"\begin{table}[t]",
        r"\centering",
        r"\caption{" + _tex_escape("Test score (%), mean ± std over seeds. " + "; ".join(notes)) + "}",
        r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}",
        r"\toprule",
        " & ".join(_tex_escape(h) for h in header) + r" \\",
        r"\midrule",
        *(" & ".join(cell(c) for c in row) + r" \\" for row in cells),
        r"\bottomrule",
        r"\end{tabular}",
        r"\end{table}",
    ]
    return "\n".join(lines) + "\n"


# -- plots -----------------------------------------------------------------------------------------
def _labels(table: pd.DataFrame) -> list[str]:
    varying = [key for key in ("model", "mixture") if table[key].nunique() > 1]
    labels = []
    for _, row in table.iterrows():
        label = f"{row['method']} ({row['variant']})" if row["variant"] else row["method"]
        labels.append(" / ".join([label, *(row[k] for k in varying)]))
    return labels


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
    import matplotlib.pyplot as plt

    paths = [out / f"{name}.{ext}" for ext in ("png", "pdf")]
    fig.savefig(paths[0], bbox_inches="tight", dpi=150, metadata={"Software": None})
    fig.savefig(paths[1], bbox_inches="tight", dpi=150, metadata={"CreationDate": None, "Creator": None})
    plt.close(fig)
    return paths


def plot(table: pd.DataFrame, columns: Sequence[str], out: Path) -> list[Path]:
    """Write plots/per_task.{png,pdf} and plots/pareto.{png,pdf}; return the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    labels = _labels(table)
    written: list[Path] = []

    def save(fig: Any, name: str) -> None:
        written.extend(save_figure(fig, out, name))

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
    save(fig, "per_task")

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
    save(fig, "pareto")
    return written


# -- entry point -----------------------------------------------------------------------------------
def resolve_target(target: str) -> tuple[list[Path], Path, str]:
    """(directories to read, output directory, title) for a study name or a directory."""
    path = Path(target)
    if path.is_dir():
        return [path], path, path.name
    root = Path(os.environ.get("MTPEFT_ROOT", "."))
    sources = [d for d in (root / "logs" / target, root / "experiments" / target) if d.is_dir()]
    if not sources:
        raise SystemExit(
            f"no results for {target!r}: it is not a directory, and neither {root / 'logs' / target} nor "
            f"{root / 'experiments' / target} exists"
        )
    return sources, root / "experiments" / target, target


CURVE_FILES = ("csv/metrics.csv", "metrics.csv")
"""Where a run keeps its logged metrics (CSV logger in the run dir, or a copy next to results.json)."""


def validation_curves(records: list[dict[str, Any]]) -> pd.DataFrame:
    """Long table ``label, seed, step, task, score`` of ``val/<task>/score`` from each run's metrics CSV."""
    frames = []
    for record in records:
        if record["status"] != "success":
            continue
        path = next(
            (Path(record["path"]) / f for f in CURVE_FILES if (Path(record["path"]) / f).exists()), None
        )
        if path is None:
            continue
        logged = pd.read_csv(path)
        label = f"{record['method']} ({record['variant']})" if record.get("variant") else record["method"]
        for task in [*record["tasks"], "avg"]:
            column = f"val/{task}/score"
            if column in logged and "step" in logged:
                points = logged[["step", column]].dropna().rename(columns={column: "score"})
                frames.append(points.assign(label=label, seed=record["seed"], task=task))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def plot_task_lines(
    data: pd.DataFrame, x: str, series: str, out: Path, name: str, ylabel: str, logx: bool = False
) -> list[Path]:
    """``plots/<name>.{png,pdf}``: one panel per task, score (mean over seeds) vs ``x``, a line per ``series``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    out.mkdir(parents=True, exist_ok=True)
    written = save_figure(fig, out, name)
    return written


def plot_curves(curves: pd.DataFrame, out: Path) -> list[Path]:
    """plots/val_curves.{png,pdf}: per-task validation score vs step, mean over seeds, one line per row."""
    return plot_task_lines(curves, "step", "label", out, "val_curves", "validation score (%)")


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


def plot_temperature(scores: pd.DataFrame, out: Path) -> list[Path]:
    """plots/temperature.{png,pdf}: per-task score (mean over seeds) vs sampling temperature T, per method."""
    return plot_task_lines(scores, "temperature", "method", out, "temperature", "score (%)", logx=True)


def summarise(
    sources: Sequence[Path], out: Path, title: str, split: str = "test", plots: bool = True
) -> dict:
    """Read every results.json under ``sources``; write the tables (and plots) into ``out``."""
    records = load_runs(sources, split)
    if not records:
        raise SystemExit(f"no {RESULTS_FILE} under {', '.join(map(str, sources))}")
    table, failed, columns = aggregate(records)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "results.csv", index=False)
    failed.to_csv(out / "failed.csv", index=False)
    (out / "results.md").write_text(to_markdown(table, failed, columns, title))
    (out / "results.tex").write_text(to_latex(table, columns, title))
    files = [out / name for name in ("results.md", "results.csv", "results.tex", "failed.csv")]
    if plots and len(table):
        files += plot(table, columns, out / "plots")
        curves = validation_curves(records)
        if len(curves):
            files += plot_curves(curves, out / "plots")
        by_temperature = temperature_scores(records)
        if len(by_temperature):
            files += plot_temperature(by_temperature, out / "plots")
    log.info("%d runs (%d rows, %d failed) -> %s", len(records), len(table), len(failed), out)
    return {"table": table, "failed": failed, "columns": columns, "files": files}


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m mtpeft.results", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", help="a study name (logs/<name>/ -> experiments/<name>/) or a directory")
    parser.add_argument("--out", type=Path, help="write here instead")
    parser.add_argument(
        "--split", default="test", choices=["test", "val"], help="which metrics (default test)"
    )
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    args = parser.parse_args(argv)
    sources, out, title = resolve_target(args.target)
    out = args.out or out
    result = summarise(sources, out, title, split=args.split, plots=not args.no_plots)
    print(f"wrote {', '.join(str(f) for f in result['files'][:4])} and {len(result['files']) - 4} plot files")
    if len(result["failed"]):
        print(f"{len(result['failed'])} failed run(s): see {out / 'results.md'}")
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
