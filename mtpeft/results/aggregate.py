"""Aggregation: runs -> one row per configuration apart from its seed, with mean ± std over seeds.

Rows: method x base model x task mixture x *variant*. The variant lists the config keys that differ between
the runs of one (method, model, mixture) in what is read (e.g. HyCAM ablation switches or
``data.temperature``), so a study of one config per method has plain method rows. Keys derived from the
seed (equal to it in every run), ``cpu_threads`` and the values a study's tuning chose (``tuned.*``, shown
in their own columns) are not variants; two runs of one row with the same seed count once (the newest).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pandas as pd

from mtpeft.results.load import COSTS, MISSING

ROW_KEYS = ["method", "model", "mixture", "variant"]
NOT_VARIANT = {"seed", "cpu_threads"}
TUNED_PREFIX = "tuned."


def assign_variants(records: list[dict[str, Any]]) -> None:
    """Set ``record["variant"]``: the config keys that vary within its (method, model, mixture) group."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault((record["method"], record["model"], record["mixture"]), []).append(record)
    for group in groups.values():
        keys = sorted({key for record in group for key in record["flat"]} - NOT_VARIANT)
        varying = []
        for key in keys:
            if key.startswith(TUNED_PREFIX):
                continue
            values = [record["flat"].get(key, MISSING) for record in group]
            if len({repr(v) for v in values}) < 2:
                continue
            if all(value == record["seed"] for value, record in zip(values, group, strict=True)):
                continue  # derived from the seed (e.g. data.seed: ${seed})
            varying.append(key)
        for record in group:
            parts = [f"{key.removeprefix('method.')}={record['flat'].get(key, MISSING)}" for key in varying]
            record["variant"] = ", ".join(parts)


def tuned_keys(records: Sequence[dict[str, Any]]) -> list[str]:
    """The config keys a study's tuning chose in any of ``records`` (``tuned`` in their configs)."""
    keys: list[str] = []
    for record in records:
        keys += [key for key in record.get("tuned") or {} if key not in keys]
    return keys


def aggregate(records: list[dict[str, Any]]) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """(table, failed, task columns): mean/std/n over seeds per row; failed runs not redone since.

    Runs still marked ``running`` are neither rows nor failures (see `incomplete_runs`)."""
    assign_variants(records)  # failed runs are labelled against every run of their method...
    success = [r for r in records if r["status"] == "success"]
    assign_variants(success)  # ...successful rows against the successful runs only
    tasks: list[str] = []
    for record in records:
        tasks += [t for t in record["tasks"] if t not in tasks]
    columns = [*tasks, "avg"]
    done = {r["config_hash"] for r in success}
    failed = [r for r in records if r["status"] == "failed" and r["config_hash"] not in done]
    tuned = tuned_keys(success)
    runs = pd.DataFrame(
        [
            {
                **{key: r[key] for key in [*ROW_KEYS, "seed", "mtime", "path", *COSTS]},
                **{f"score_{task}": r["scores"].get(task) for task in columns},
                **{f"{TUNED_PREFIX}{key}": (r.get("tuned") or {}).get(key) for key in tuned},
            }
            for r in success
        ],
        columns=[
            *ROW_KEYS,
            "seed",
            "mtime",
            "path",
            *COSTS,
            *(f"score_{t}" for t in columns),
            *(f"{TUNED_PREFIX}{k}" for k in tuned),
        ],
    )
    runs = runs.sort_values("mtime").drop_duplicates([*ROW_KEYS, "seed"], keep="last")
    rows = [
        _row(key, group, columns, tuned) for key, group in runs.groupby(ROW_KEYS, sort=False, dropna=False)
    ]
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


def _row(key: tuple, group: pd.DataFrame, columns: Sequence[str], tuned: Sequence[str]) -> dict[str, Any]:
    row: dict[str, Any] = dict(zip(ROW_KEYS, key, strict=True))
    row["n"] = len(group)
    row["seeds"] = " ".join(str(s) for s in sorted(group["seed"].tolist(), key=str))
    for task in columns:
        values = pd.to_numeric(group[f"score_{task}"], errors="coerce").dropna()
        row[f"{task}_mean"] = values.mean() if len(values) else math.nan
        row[f"{task}_std"] = values.std(ddof=1) if len(values) > 1 else math.nan
        row[f"{task}_n"] = len(values)
    for cost in COSTS:
        row[cost] = pd.to_numeric(group[cost], errors="coerce").mean()
    for name in tuned:
        values = [v for v in group[f"{TUNED_PREFIX}{name}"].tolist() if v is not None]
        row[f"{TUNED_PREFIX}{name}"] = values[-1] if values else None
    row["runs"] = list(zip(group["seed"].tolist(), group["path"].tolist(), strict=True))  # for the stats
    return row


def incomplete_runs(records: list[dict[str, Any]]) -> pd.DataFrame:
    """Runs recorded as ``running`` (killed, or still going) whose config has not succeeded since."""
    done = {r["config_hash"] for r in records if r["status"] == "success"}
    rows = [
        {key: r.get(key) for key in ["method", "model", "mixture", "seed", "path"]}
        for r in records
        if r["status"] == "running" and r["config_hash"] not in done
    ]
    return pd.DataFrame(rows, columns=["method", "model", "mixture", "seed", "path"])


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
