"""Does a method ranking carry over from one study to another (e.g. from the tiny model to SmolLM2)?

    python -m mtpeft.results smollm2_mix --against methods_mix3_tuned    # -> experiments/smollm2_mix/ranking.md

The rows the two studies share (same label: method, and variant if any) are ranked by their average test score
in each study, best first. Rows that train nothing (``trainable_params == 0``, e.g. the frozen base) are
reference points, not contestants: they come last in every study and would only inflate the agreement, so
they are left out of the ranking.

Agreement is Kendall's tau-b between the two rankings (1: same order, 0: unrelated, -1: reversed), with a 95%
interval from the hierarchical bootstrap of `mtpeft.results.stats`: replicate ``b`` draws every row's average
in each study (seeds, then test items; the same per-row generators as the CIs in ``stats.md``, so a row's
replicates, and its interval, are those of its own study's table), and tau is recomputed on those averages.
The two studies are independent, so their replicates are paired by index only. Each row's rank also gets an
interval (2.5 and 97.5 percentiles of its rank over the replicates of its study): a rank whose interval spans
several places is not an ordering the data supports, whatever the point ranking says.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import kendalltau, rankdata

from mtpeft.results.stats import LEVEL, N_BOOT, bootstrap, estimate, row_generator, row_scores

COLUMNS = [
    "label",
    "avg_a",
    "rank_a",
    "rank_a_low",
    "rank_a_high",
    "avg_b",
    "rank_b",
    "rank_b_low",
    "rank_b_high",
]


@dataclass
class StudyRows:
    """The contestant rows of one study: each row's average test score and its bootstrap replicates."""

    name: str
    averages: dict[str, float]
    replicates: dict[str, np.ndarray]
    left_out: list[tuple[str, str]]


def study_rows(
    name: str, table: pd.DataFrame, columns: Sequence[str], records: Sequence[dict[str, Any]], seed: int = 0
) -> StudyRows:
    """Averages and replicates of every row of ``table`` that trains something and has per-item scores."""
    tasks = [c for c in columns if c != "avg"]
    logged = {r["path"]: {t: r["scores"].get(t) for t in tasks} for r in records}
    rows = StudyRows(name, {}, {}, [])
    for _, row in table.iterrows():
        scores = row_scores(row, tasks, logged)
        if not row["trainable_params"] > 0:
            rows.left_out.append((scores.label, "trains nothing (a reference row)"))
        elif scores.problem:
            rows.left_out.append((scores.label, scores.problem))
        else:
            rows.averages[scores.label] = estimate(scores.cells)
            rows.replicates[scores.label] = bootstrap(scores.cells, N_BOOT, row_generator(seed, scores.label))
    return rows


def ranks(values: np.ndarray) -> np.ndarray:
    """Rank 1 for the highest value along axis 0 (ties share the average rank)."""
    return rankdata(-values, axis=0, method="average")


def tau(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall's tau-b of two score vectors over the same rows (nan when either is constant)."""
    return float(kendalltau(a, b).statistic)


def compare_rankings(a: StudyRows, b: StudyRows, level: float = LEVEL) -> tuple[pd.DataFrame, dict[str, Any]]:
    """(rows, agreement): each shared row's average (%) and rank with its interval in both studies, best of
    ``a`` first; Kendall's tau-b with its bootstrap interval and the rows that only one study has."""
    shared = [label for label in a.averages if label in b.averages]
    if len(shared) < 2:
        why = "".join(
            f"; {study.name}: {len(study.left_out)} row(s) left out, e.g. {study.left_out[0][0]}: {study.left_out[0][1]}"
            for study in (a, b)
            if study.left_out
        )
        raise SystemExit(
            f"{a.name} and {b.name} share {len(shared)} ranked row(s) ({', '.join(shared) or 'none'}): a ranking "
            f"needs at least 2 methods with per-example test scores in both{why}"
        )
    tail = 100 * (1 - level) / 2
    table = pd.DataFrame({"label": shared})
    for suffix, study in (("a", a), ("b", b)):
        averages = np.array([study.averages[label] for label in shared])
        replicates = np.stack([study.replicates[label] for label in shared])
        replicate_ranks = ranks(replicates)
        table[f"avg_{suffix}"] = 100 * averages
        table[f"rank_{suffix}"] = ranks(averages)
        table[f"rank_{suffix}_low"] = np.percentile(replicate_ranks, tail, axis=1)
        table[f"rank_{suffix}_high"] = np.percentile(replicate_ranks, 100 - tail, axis=1)
    pairs_a = np.stack([a.replicates[label] for label in shared])
    pairs_b = np.stack([b.replicates[label] for label in shared])
    taus = np.array([tau(pairs_a[:, i], pairs_b[:, i]) for i in range(pairs_a.shape[1])])
    low, high = np.nanpercentile(taus, [tail, 100 - tail])
    agreement = {
        "tau": tau(table["avg_a"].to_numpy(), table["avg_b"].to_numpy()),
        "tau_low": float(low),
        "tau_high": float(high),
        "rows": len(shared),
        "only_a": sorted(set(a.averages) - set(shared)),
        "only_b": sorted(set(b.averages) - set(shared)),
    }
    return table.sort_values(["rank_a", "label"], kind="stable").reset_index(drop=True)[COLUMNS], agreement


def _rank_cell(rank: float, low: float, high: float) -> str:
    value = f"{rank:g}"
    return value if low == high == rank else f"{value} ({low:g}-{high:g})"


def to_markdown(table: pd.DataFrame, agreement: dict[str, Any], a: StudyRows, b: StudyRows) -> str:
    """ranking.md: the two rankings side by side, the agreement, and what was left out and why."""
    lines = [
        f"# Ranking: {a.name} against {b.name}",
        "",
        f"Average test score (%) and rank (1 = best; in brackets the 95% bootstrap interval of the rank) of the "
        f"{agreement['rows']} methods both studies ran. Kendall's tau-b between the two rankings: "
        f"**{agreement['tau']:+.2f}**, 95% CI [{agreement['tau_low']:+.2f}, {agreement['tau_high']:+.2f}] "
        f"(hierarchical bootstrap of both studies, {N_BOOT} replicates; 1 = same order, 0 = unrelated).",
        "",
        f"| method | {a.name} avg | {a.name} rank | {b.name} avg | {b.name} rank | rank change |",
        "|---|---:|---|---:|---|---:|",
    ]
    for _, r in table.iterrows():
        change = r["rank_b"] - r["rank_a"]
        lines.append(
            f"| {r['label']} | {r['avg_a']:.1f} | {_rank_cell(r['rank_a'], r['rank_a_low'], r['rank_a_high'])} "
            f"| {r['avg_b']:.1f} | {_rank_cell(r['rank_b'], r['rank_b_low'], r['rank_b_high'])} | {change:+g} |"
        )
    left_out = [(a.name, what, why) for what, why in a.left_out] + [(b.name, w, y) for w, y in b.left_out]
    left_out += [(a.name, label, f"not in {b.name}") for label in agreement["only_a"]]
    left_out += [(b.name, label, f"not in {a.name}") for label in agreement["only_b"]]
    if left_out:
        lines += ["", f"## Left out ({len(left_out)})", "", "| study | row | reason |", "|---|---|---|"]
        lines += [f"| {study} | {what} | {why} |" for study, what, why in left_out]
    return "\n".join(lines) + "\n"


def write_ranking(a: StudyRows, b: StudyRows, out: Path) -> list[Path]:
    """Write ``ranking.md`` and ``ranking.csv`` (unformatted numbers) into ``out``."""
    table, agreement = compare_rankings(a, b)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "ranking.md", out / "ranking.csv"]
    files[0].write_text(to_markdown(table, agreement, a, b))
    table.assign(tau=agreement["tau"], tau_low=agreement["tau_low"], tau_high=agreement["tau_high"]).to_csv(
        files[1], index=False
    )
    return files
