"""The capacity probe (``probe`` in a study's config): per run, the steps to a training-loss threshold and
the final and lowest training loss (``capacity.{md,csv}``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from mtpeft.results.load import CURVE_FILES


def steps_to_threshold(curve: pd.DataFrame, threshold: float) -> float:
    """The first logged step whose ``train/loss`` is <= ``threshold`` (NaN if never)."""
    reached = curve[curve["train/loss"] <= threshold]
    return float(reached["step"].iloc[0]) if len(reached) else math.nan


def capacity_table(records: Sequence[dict[str, Any]], threshold: float) -> pd.DataFrame:
    """Per run: method, seed, steps to the threshold, final and lowest training loss (from the CSV log)."""
    rows = []
    for record in records:
        path = next(
            (Path(record["path"]) / f for f in CURVE_FILES if (Path(record["path"]) / f).exists()), None
        )
        curve = pd.DataFrame()
        if path is not None:
            logged = pd.read_csv(path)
            if "train/loss" in logged:
                curve = logged[["step", "train/loss"]].dropna().sort_values("step")
        rows.append(
            {
                "method": record["method"],
                "seed": record["seed"],
                "status": record["status"],
                "steps_to_threshold": steps_to_threshold(curve, threshold) if len(curve) else math.nan,
                "final_loss": float(curve["train/loss"].iloc[-1]) if len(curve) else math.nan,
                "min_loss": float(curve["train/loss"].min()) if len(curve) else math.nan,
                "logged_steps": int(curve["step"].max()) if len(curve) else 0,
            }
        )
    columns = ["method", "seed", "status", "steps_to_threshold", "final_loss", "min_loss", "logged_steps"]
    return (
        pd.DataFrame(rows, columns=columns)
        .sort_values(["method", "seed"], kind="stable")
        .reset_index(drop=True)
    )


def write_capacity(table: pd.DataFrame, threshold: float, out: Path, title: str) -> list[Path]:
    """``capacity.csv`` and ``capacity.md``."""
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "capacity.csv", index=False)
    number = lambda v, fmt: "—" if pd.isna(v) else format(v, fmt)  # noqa: E731
    lines = [
        f"# {title}: capacity probe",
        "",
        f"One training batch (debug=overfit). Steps: the first logged step with training loss <= {threshold} "
        "(optimiser updates done before that loss; — = never within the budget).",
        "",
        "| method | seed | steps to threshold | final loss | lowest loss | steps run | status |",
        "|---|---|---|---|---|---|---|",
    ]
    for _, r in table.iterrows():
        lines.append(
            f"| {r['method']} | {r['seed']} | {number(r['steps_to_threshold'], '.0f')} | {number(r['final_loss'], '.3f')} "
            f"| {number(r['min_loss'], '.3f')} | {r['logged_steps']} | {r['status']} |"
        )
    (out / "capacity.md").write_text("\n".join(lines) + "\n")
    return [out / "capacity.md", out / "capacity.csv"]
