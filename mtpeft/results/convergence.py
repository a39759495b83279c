"""Has each configuration converged at its budget? ``convergence.{md,csv}`` next to the results table.

A ranking taken while the runs still climb favours the methods that learn fastest, not the ones that end
best. For each table row (method and variant, over its seeds) this reports:

* the validation average score (%) after each validation's number of optimiser steps, mean over the seeds
  whose metrics CSV logged it (`mtpeft.results.load.validation_curves`; runs logged only to wandb have no
  curve here);
* the change over the last validation interval (last minus the one before, mean over seeds, in points);
* in how many runs the best validation checkpoint (the one tested) was the last validation (the last step
  of its curve, else ``max_steps``): when it is most of them, the scores were still rising when training
  stopped.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from mtpeft.results.load import MISSING, label, validation_curves

CONVERGENCE_FILES = ("convergence.md", "convergence.csv")


def convergence_table(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per label of the successful ``records``: ``label, n, val@<step>`` (mean val avg % after that
    many optimiser steps), ``last_change`` (points), ``best_at_end`` (runs whose best checkpoint is at their
    last step) and ``with_best`` (runs that name their best checkpoint)."""
    success = [r for r in records if r["status"] == "success"]
    rows = []
    for name in sorted({label(r) for r in success}):
        runs = [r for r in success if label(r) == name]
        curves = [validation_points(r) for r in runs]
        ends = [_last_validation(r, c) for r, c in zip(runs, curves, strict=True)]
        named = [
            (r["best_step"], end)
            for r, end in zip(runs, ends, strict=True)
            if r.get("best_step") is not None and end
        ]
        row: dict[str, Any] = {
            "label": name,
            "n": len(runs),
            "best_at_end": sum(best >= end for best, end in named),
            "with_best": len(named),
        }
        points = pd.concat(curves, ignore_index=True)
        if len(points):
            for step, scores in points.groupby("step"):
                row[f"val@{int(step)}"] = 100 * scores["score"].mean()
            row["last_change"] = _last_change(points)
        rows.append(row)
    table = pd.DataFrame(rows, columns=None if rows else ["label", "n", "best_at_end", "with_best"])
    steps = sorted((c for c in table.columns if c.startswith("val@")), key=lambda c: int(c[4:]))
    ordered = ["label", "n", *steps, *(["last_change"] if "last_change" in table else []), "best_at_end"]
    return table[[*ordered, "with_best"]] if len(table) else table


def _last_validation(record: dict[str, Any], points: pd.DataFrame) -> int | None:
    """The step of a run's last validation: from its curve, else its budget (``max_steps``; the last
    validation is there when ``val_check_interval`` divides it, as in every study config)."""
    return int(points["step"].max()) if len(points) else record.get("max_steps")


def validation_points(record: dict[str, Any]) -> pd.DataFrame:
    """``seed, step, score`` of a run's validation average, ``step`` counted in optimiser steps done: the
    CSV logger records the validation after step n of a training run at step n - 1 (a run that trained
    names its best checkpoint ``step_<n>.ckpt``)."""
    curve = validation_curves([record])
    if not len(curve):
        return pd.DataFrame(columns=["seed", "step", "score"])
    points = curve[curve["task"] == "avg"][["seed", "step", "score"]]
    return points.assign(step=points["step"] + 1) if record.get("best_step") is not None else points


def _last_change(points: pd.DataFrame) -> float:
    """Mean over seeds of (last validation score - the one before), in points; NaN with one validation."""
    changes = []
    for _, seed in points.groupby("seed"):
        scores = seed.sort_values("step")["score"].tolist()
        if len(scores) >= 2:
            changes.append(100 * (scores[-1] - scores[-2]))
    return sum(changes) / len(changes) if changes else float("nan")


def _cell(value: Any, fmt: str = ".1f", sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return MISSING
    return f"{value:+{fmt}}" if sign else f"{value:{fmt}}"


def convergence_markdown(table: pd.DataFrame, title: str, split: str) -> str:
    """The table with a caption and a one-line verdict (how many runs ended at their best)."""
    lines = [f"# {title}: convergence at the budget", ""]
    if not len(table):
        return "\n".join([*lines, "No successful runs.", ""])
    steps = [c for c in table.columns if c.startswith("val@")]
    lines += [
        "Validation avg score (%) at each validation step (mean over seeds; runs with a metrics CSV), its change "
        "over the last validation interval (points), and how many runs had their best validation checkpoint "
        f"({'the one tested' if split == 'test' else 'the one kept'}) at the end of the budget. If most runs end at their best, the scores "
        "were still rising when training stopped: the ranking is taken mid-climb and favours fast learners.",
        "",
    ]
    change = "last_change" in table
    header = ["method", "n", *steps, *(["last-interval change"] if change else []), "best at end of budget"]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in table.to_dict("records"):
        cells = [row["label"], str(row["n"]), *(_cell(row.get(s)) for s in steps)]
        cells += [_cell(row.get("last_change"), sign=True)] if change else []
        cells.append(f"{row['best_at_end']}/{row['with_best']}" if row["with_best"] else MISSING)
        lines.append("| " + " | ".join(cells) + " |")
    at_end, named = int(table["best_at_end"].sum()), int(table["with_best"].sum())
    lines += ["", f"{at_end} of {named} runs had their best validation at the end of their budget.", ""]
    return "\n".join(lines)


def write_convergence(records: Sequence[dict[str, Any]], out: Path, title: str, split: str) -> list[Path]:
    """Write ``convergence.md`` and ``convergence.csv`` into ``out``; their paths."""
    table = convergence_table(records)
    table.to_csv(out / "convergence.csv", index=False)
    (out / "convergence.md").write_text(convergence_markdown(table, title, split))
    return [out / name for name in CONVERGENCE_FILES]
