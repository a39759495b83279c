"""The tuning stage: choosing the best values per method, widening a grid at its edges, the `Tuner` that
runs the grid or Optuna searches, and ``tuning.{md,csv}``."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from mtpeft.results import load_runs
from mtpeft.study.commands import tuning_commands, with_sizes
from mtpeft.study.config import Study, _number
from mtpeft.study.sweeps import run_sweep, run_sweeps_in_slots

log = logging.getLogger(__name__)


# -- choosing --------------------------------------------------------------------------------------
def _same(a: Any, b: Any) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b or str(a) == str(b)


def _grid_value(grid_values: Sequence[Any], value: Any) -> Any:
    return next((g for g in grid_values if _same(g, value)), None)


def _order(grid: Mapping[str, Sequence[Any]], values: Mapping[str, Any]) -> tuple:
    """Tie-break order: numbers by value, anything else by its position in the grid."""
    return tuple(
        values[k]
        if isinstance(values[k], int | float) and not isinstance(values[k], bool)
        else list(grid[k]).index(values[k])
        for k in grid
    )


Grids = dict[str, dict[str, list[Any] | None]]
"""Per tuned method its grid as it stands (widened values included): key -> values, or None for an Optuna
range (any value)."""


def declared_grids(study: Study) -> Grids:
    """Every tuned method's grid as the study declares it (Optuna ranges as None)."""
    return {
        method: {k: v if isinstance(v, list) else None for k, v in grid.items()}
        for method in study.methods
        if (grid := study.grid(method)) is not None
    }


def tuning_table(records: Sequence[dict[str, Any]], study: Study, grids: Grids | None = None) -> pd.DataFrame:
    """One row per tuning job of the current ``grids`` (default: the declared ones): method, each grid key,
    status, val scores, and ``widened``: the keys whose value lies beyond the declared grid (`widen_grids`)."""
    grids = declared_grids(study) if grids is None else grids
    rows = []
    for record in records:
        grid = grids.get(record["method"])
        if grid is None:
            continue
        flat = record["flat"]
        values = {k: flat.get(k) if vs is None else _grid_value(vs, flat.get(k)) for k, vs in grid.items()}
        if any(v is None for v in values.values()):
            continue  # a job from an older grid
        declared = study.grid(record["method"]) or {}
        widened = [
            k
            for k, v in values.items()
            if isinstance(declared.get(k), list) and _grid_value(declared[k], v) is None
        ]
        scores = {f"val_{task}": score for task, score in record["scores"].items()}
        rows.append(
            {
                "method": record["method"],
                **values,
                "status": record["status"],
                **scores,
                "widened": ",".join(widened),
            }
        )
    return pd.DataFrame(rows)


def choose(
    table: pd.DataFrame, study: Study, grids: Grids | None = None
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """(chosen values per method, problems): the best ``val_avg`` among successful jobs, ties broken by the
    smaller value (numbers) or the earlier one in the grid. Every method to tune must have one successful
    job. Values come back as the grid spells them (an int stays an int)."""
    grids = declared_grids(study) if grids is None else grids
    chosen, problems = {}, []
    for method in study.methods:
        grid = grids.get(method)
        if grid is None:
            continue
        mine = table[(table["method"] == method) & (table["status"] == "success")] if len(table) else table
        if mine.empty or mine["val_avg"].isna().all():
            problems.append(f"{method}: no successful tuning job (see the tuning sweep's results.json files)")
            continue
        best = mine["val_avg"].max()
        ties = [
            {k: row[k] if vs is None else _grid_value(vs, row[k]) for k, vs in grid.items()}
            for _, row in mine.iterrows()
            if math.isclose(row["val_avg"], best, abs_tol=1e-12)
        ]
        chosen[method] = min(ties, key=lambda values: _order(grid, values))
    return chosen, problems


# -- widening a grid at its edges ------------------------------------------------------------------
def _geometric(values: Sequence[float]) -> bool:
    """Positive values spaced more evenly by ratio than by difference (two values: a ratio)."""
    if values[0] <= 0:
        return False
    steps = [b - a for a, b in zip(values, values[1:], strict=False)]
    ratios = [math.log(b / a) for a, b in zip(values, values[1:], strict=False)]
    return max(ratios) / min(ratios) <= max(steps) / min(steps)


def next_value(values: Sequence[Any], side: str) -> int | float | None:
    """The value beyond the ``low`` or ``high`` end of a numeric grid, continuing its last two steps:
    geometric for positive values spaced more evenly by ratio than by difference (two positive values:
    by ratio), else arithmetic. ``1e-3, 3e-3, 1e-2, 3e-2`` goes on with ``3e-4`` and ``0.1`` (then ``1e-4``,
    ``0.3``), ``2, 4, 8`` with ``1`` and ``16``, ``0.25, 0.5, 0.75`` with ``0`` and ``1``. None when there is
    no such value: fewer than two distinct numbers, a step across zero, or an integer grid whose next
    integer is not new. Floats are rounded to 12 significant digits
    (``0.1``, not ``0.09999999999999999``), so the same grid always gives the same job."""
    if not values or not all(_number(v) for v in values):
        return None
    grid = sorted(set(values))
    if len(grid) < 2:
        return None
    inward = grid if side == "low" else grid[::-1]  # the edge value first, then its neighbours
    a, b = inward[0], inward[1]
    c = inward[2] if len(inward) > 2 else None
    geometric = _geometric(grid)
    if geometric:
        value = a * b / c if c is not None else a * a / b
    else:
        value = a + b - c if c is not None else 2 * a - b
    if (a >= 0 > value) or (a <= 0 < value):
        return None  # never across zero
    if all(isinstance(v, int) for v in values):
        value = int(round(value))
        return None if value in grid or (geometric and value <= 0) else value
    return float(f"{value:.12g}")


def widen_grids(grids: Grids, chosen: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method, for every numeric grid key whose chosen value is the lowest or highest of its grid, the
    next value beyond that edge (`next_value`); methods and keys with an interior choice (or no next value)
    are left out. Empty: nothing to widen."""
    additions: dict[str, dict[str, Any]] = {}
    for method, values in chosen.items():
        for key, value in values.items():
            grid = grids[method].get(key)
            if grid is None or len(grid) < 2 or not all(_number(v) for v in grid):
                continue
            side = "low" if _same(value, min(grid)) else "high" if _same(value, max(grid)) else None
            new = next_value(grid, side) if side else None
            if new is not None:
                additions.setdefault(method, {})[key] = new
    return additions


def extension_sweeps(grid: Mapping[str, list[Any]], added: Mapping[str, Any]) -> list[dict[str, list[Any]]]:
    """The sweeps that run exactly the jobs a widened grid adds: per added key, its new value crossed with
    the other keys' values (keys widened earlier in this list with their old values only, so no job twice)."""
    sweeps, done = [], set()
    for key, value in added.items():
        sweeps.append(
            {
                k: [value] if k == key else list(vs) if k in done or k not in added else [*vs, added[k]]
                for k, vs in grid.items()
            }
        )
        done.add(key)
    return sweeps


def widened(grid: Mapping[str, list[Any]], added: Mapping[str, Any]) -> dict[str, list[Any]]:
    """``grid`` with each added value at its end of the key's values (below the lowest or above the
    highest)."""
    return {
        k: vs if k not in added else [added[k], *vs] if added[k] < min(vs) else [*vs, added[k]]
        for k, vs in grid.items()
    }


def write_tuning(
    table: pd.DataFrame, chosen: Mapping[str, dict[str, Any]], out: Path, title: str
) -> list[Path]:
    """``tuning.csv`` (every job) and ``tuning.md`` (per method, val scores in percent, the choice marked)."""
    out.mkdir(parents=True, exist_ok=True)
    table = table.copy()
    table["chosen"] = [
        row["method"] in chosen and all(_same(row[k], v) for k, v in chosen[row["method"]].items())
        for _, row in table.iterrows()
    ]
    table.to_csv(out / "tuning.csv", index=False)
    score_columns = [c for c in table.columns if c.startswith("val_")]
    bookkeeping = ("method", "trial", "status", "chosen", "widened", *score_columns)
    keys = [c for c in table.columns if c not in bookkeeping]
    trials = ["trial"] if "trial" in table.columns else []
    header = ["method", *trials, *keys, *(c.removeprefix("val_") for c in score_columns), "status", ""]
    how = (
        "Optuna TPE trials (tune.sampler: optuna), tuning seed"
        if trials
        else "Tuning seed; values marked ⁺ lie beyond the declared grid (its best was at an edge, so the grid "
        "was widened: tune.widen)"
    )
    lines = [
        f"# {title}: tuning grid",
        "",
        f"Validation score (%) of the best checkpoint. {how}. The chosen value per method is marked "
        "(highest val avg, ties broken by the smaller value).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for _, row in table.iterrows():
        marked = str(row.get("widened") or "").split(",")
        scores = ["—" if pd.isna(row[c]) else f"{100 * row[c]:.1f}" for c in score_columns]
        values = [
            ("—" if pd.isna(row[k]) else f"{row[k]:g}" if isinstance(row[k], float) else str(row[k]))
            + ("⁺" if k in marked else "")
            for k in keys
        ]
        number = [str(row["trial"])] if trials else []
        lines.append(
            "| "
            + " | ".join(
                [row["method"], *number, *values, *scores, row["status"], "chosen" if row["chosen"] else ""]
            )
            + " |"
        )
    edges = edge_choices(table, chosen)
    if edges:
        lines += [
            "",
            "**Chosen at an edge of what was tried** (the best may lie beyond it: `tune.widen` caps how far a "
            "grid grows): " + "; ".join(edges) + ".",
        ]
    (out / "tuning.md").write_text("\n".join(lines) + "\n")
    return [out / "tuning.md", out / "tuning.csv"]


def edge_choices(table: pd.DataFrame, chosen: Mapping[str, dict[str, Any]]) -> list[str]:
    """``<method>: <key>=<value> is the highest (lowest) value tried`` for every chosen numeric value at an
    end of the values its method's jobs tried (more than one; a failed job counts: a value beyond that
    diverged was tried)."""
    notes = []
    for method, values in chosen.items():
        mine = table[table["method"] == method]
        for key, value in values.items():
            tried = sorted({v for v in mine[key].tolist() if _number(v)}) if key in mine else []
            if len(tried) > 1 and _number(value) and value in (tried[0], tried[-1]):
                side = "lowest" if value == tried[0] else "highest"
                notes.append(f"{method}: {key}={value:g} is the {side} value tried")
    return notes


# -- the tuning stage ------------------------------------------------------------------------------
SweepRunner = Callable[[list[str], Path], int]
"""Runs one sweep command writing into a directory and returns its exit status (`run_sweep`)."""


@dataclass
class Tuning:
    """What the tuning stage did: every tuning job's row, the chosen values per method, problems."""

    table: pd.DataFrame
    chosen: dict[str, dict[str, Any]]
    problems: list[str]
    directories: list[Path]


@dataclass
class Tuner:
    """Runs a study's tuning sweeps through ``runner`` (`run_sweep`; a fake in tests), calling
    ``after_sweep`` after each (publishing), and chooses per method: `grid` or `optuna`."""

    study: Study
    extra: Sequence[str] = ()
    """Overrides for every job (the command line's)."""
    launch: Sequence[str] = ()
    """Launcher overrides (`mtpeft.study.commands.launcher_overrides`)."""
    runner: SweepRunner = run_sweep
    after_sweep: Callable[[], None] = lambda: None
    parallel: int = 1
    """Parallel jobs: grid sweeps run at once while their jobs fit (`run_sweeps_in_slots`); Optuna: how many
    methods search at once (each one trial at a time)."""
    directories: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self) -> Tuning:
        return self.optuna() if self.study.sampler == "optuna" else self.grid()

    def sweep(self, sweeps: Sequence[tuple[str, Mapping[str, list[Any]]]], stage: str) -> list[Path]:
        """Run the tuning sweeps of ``(method, grid)`` pairs (`tuning_commands`), as many at once as their
        jobs fit in ``parallel`` (`run_sweeps_in_slots`); their directories."""
        commands = tuning_commands(self.study, self.extra, self.launch, sweeps, stage)

        def done(directory: Path, status: int) -> None:
            if status != 0:
                self.problems.append(f"tuning sweep {directory} exited non-zero (failed jobs?)")
            with self._lock:
                self.directories.append(directory)
                self.after_sweep()

        run_sweeps_in_slots(with_sizes(self.study, commands, self.parallel), self.parallel, self.runner, done)
        return [directory for _, directory in commands]

    def grid(self) -> Tuning:
        """Every grid point; then, up to ``tune.widen`` times, the next value beyond each numeric key's edge
        where a method's best value lies (`widen_grids`), until every best is interior."""
        grids = declared_grids(self.study)
        self.sweep(list(grids.items()), "tune")
        for round_ in range(1, self.study.widen + 1):
            table = tuning_table(load_runs(self.directories, split="val"), self.study, grids)
            additions = widen_grids(grids, choose(table, self.study, grids)[0])
            if not additions:
                break
            sweeps = []
            for method, added in additions.items():
                log.info(
                    "%s: best value at the edge of its grid; widening (round %d of at most %d) with %s",
                    method,
                    round_,
                    self.study.widen,
                    ", ".join(f"{k}={v}" for k, v in added.items()),
                )
                sweeps += [(method, grid) for grid in extension_sweeps(grids[method], added)]
                grids[method] = widened(grids[method], added)
            self.sweep(sweeps, f"tune-widen{round_}-")
        table = tuning_table(load_runs(self.directories, split="val"), self.study, grids)
        chosen, missing = choose(table, self.study, grids)
        return Tuning(in_grid_order(table, self.study), chosen, [*self.problems, *missing], self.directories)

    def optuna(self) -> Tuning:
        """An Optuna TPE search per method (`search`), ``parallel`` methods at a time."""
        grids = declared_grids(self.study)
        with ThreadPoolExecutor(max_workers=max(1, self.parallel)) as pool:
            tables = list(pool.map(lambda method: self.search(method, grids), grids))
        table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
        chosen, missing = choose(table, self.study, grids)
        return Tuning(table, chosen, [*self.problems, *missing], self.directories)

    def search(self, method: str, grids: Grids) -> pd.DataFrame:
        """``tune.trials`` trials of ``method``, asked one at a time of a TPE sampler seeded with the tuning
        seed, each an ordinary one-job sweep whose score is told back (a failed job: a failed trial). A
        re-run asks the same trials in the same order, so finished trials are skipped by their job hash
        and their scores replayed into the new search."""
        import optuna

        space = self.study.grid(method) or {}
        search = optuna.create_study(
            study_name=f"{self.study.name}:{method}",
            direction="maximize",
            sampler=optuna.samplers.TPESampler(seed=int(self.study.tune.get("seed", 0))),
        )
        rows = []
        for number in range(self.study.trials):
            trial = search.ask()
            params = {key: suggest(trial, key, spec) for key, spec in space.items()}
            stage = f"tune-optuna-{method}-{number}-"
            (directory,) = self.sweep([(method, {k: [v] for k, v in params.items()})], stage)
            row = tuning_table(load_runs([directory], split="val"), self.study, grids)
            value = (
                float(row["val_avg"].iloc[0]) if len(row) and row["status"].iloc[0] == "success" else math.nan
            )
            if math.isfinite(value):
                search.tell(trial, value)
            else:
                search.tell(trial, state=optuna.trial.TrialState.FAIL)
            rows.append(row.assign(trial=number))
        return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()


def in_grid_order(table: pd.DataFrame, study: Study) -> pd.DataFrame:
    """Rows by method (the study's order), then by the numeric grid keys' values, so a widened value sits
    next to the edge it extends."""
    if table.empty:
        return table
    order = {method: i for i, method in enumerate(study.methods)}
    bookkeeping = ("method", "status", "widened")
    keys = [
        c
        for c in table.columns
        if c not in bookkeeping and not c.startswith("val_") and pd.api.types.is_numeric_dtype(table[c])
    ]
    return table.sort_values(
        ["method", *keys], key=lambda c: c.map(order) if c.name == "method" else c, kind="stable"
    ).reset_index(drop=True)


def suggest(trial: Any, key: str, spec: list[Any] | Mapping[str, Any]) -> Any:
    """An Optuna trial's value for ``key``: a list is categorical, ``{low, high, log}`` a range (integers
    when both ends are)."""
    if isinstance(spec, list):
        return trial.suggest_categorical(key, spec)
    low, high, log = spec["low"], spec["high"], bool(spec.get("log", False))
    if isinstance(low, int) and isinstance(high, int):
        return trial.suggest_int(key, low, high, log=log)
    return trial.suggest_float(key, float(low), float(high), log=log)
