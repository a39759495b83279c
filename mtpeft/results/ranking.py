"""Does a method ranking carry over from one study to another (e.g. from the tiny model to SmolLM2)?

    python -m mtpeft.results smollm2_mix --against methods_mix3_tuned    # -> experiments/smollm2_mix/ranking.md

The rows the two studies share (same label: the method, plus its variant when the study varies other keys;
variants are named per study, so ``lora (r=8)`` of one never matches ``lora`` of the other) are ranked by
their average test score in each study, best first. Rows that train nothing (``trainable_params == 0``, e.g.
the frozen base) are reference points, not contestants: they come last in every study and would only inflate
the agreement, so they are left out. Each study is ranked on the seeds all its contestants have, and all its
contestants must have been scored on the same test items (rows scored on other items than most are left out,
with the reason).

Noise: within a study, one hierarchical bootstrap (`mtpeft.results.stats.joint_bootstrap`: seeds, then test
items within each drawn seed) draws the same seeds and items for every row, so a row's place in a replicate
moves only as far as the paired differences in ``stats.md`` allow (resampling rows separately would add each
row's own item-difficulty noise and widen every rank interval). The two studies are resampled independently
(separate generators), replicate ``i`` of one paired with replicate ``i`` of the other. Reported: each row's
rank with the 2.5 and 97.5 percentiles of its rank over the replicates (a rank interval that spans several
places is not an order the data supports), and Kendall's tau-b between the two rankings (1: same order, 0:
unrelated, -1: reversed) with the percentiles of tau over the replicates. A replicate in which a study's
averages are all tied has no tau; how many there were is reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import kendalltau, rankdata

from mtpeft.results.aggregate import aggregate
from mtpeft.results.render import row_label
from mtpeft.results.stats import (
    LEVEL,
    N_BOOT,
    RowScores,
    estimate,
    joint_bootstrap,
    row_generator,
    row_scores,
)

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
MIN_SHARED = 3
"""Fewest shared rows a ranking comparison accepts (with 2, tau can only be -1 or +1)."""


@dataclass
class StudyRows:
    """The contestant rows of one study: each row's average test score and its bootstrap replicates (drawn
    jointly for the study's rows), the seeds and tasks they average over, and the rows left out and why."""

    name: str
    averages: dict[str, float] = field(default_factory=dict)
    replicates: dict[str, np.ndarray] = field(default_factory=dict)
    seeds: list[Any] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    left_out: list[tuple[str, str]] = field(default_factory=list)


def _contestants(table: pd.DataFrame, tasks: Sequence[str], logged: dict, rows: StudyRows) -> list[RowScores]:
    """The rows that train something and have per-item scores (the others go to ``rows.left_out``)."""
    labels = [row_label(row) for _, row in table.iterrows()]
    duplicated = sorted({label for label in labels if labels.count(label) > 1})
    if duplicated:
        raise SystemExit(
            f"{rows.name}: rows {', '.join(duplicated)} occur more than once (several base models or task "
            "mixtures in one study): rank a directory that holds one model and one mixture"
        )
    contestants = []
    for _, row in table.iterrows():
        scores = row_scores(row, tasks, logged)
        trainable = row["trainable_params"]
        if pd.isna(trainable):
            rows.left_out.append((scores.label, "no trainable-parameter count in its records"))
        elif trainable == 0:
            rows.left_out.append((scores.label, "trains nothing (a reference row)"))
        elif scores.problem:
            rows.left_out.append((scores.label, scores.problem))
        else:
            contestants.append(scores)
    return contestants


def study_rows(
    name: str,
    table: pd.DataFrame,
    columns: Sequence[str],
    records: Sequence[dict[str, Any]],
    stream: str,
    seed: int = 0,
) -> StudyRows:
    """Averages and jointly drawn replicates of the contestant rows of ``table``; ``stream`` names this
    study's generator (the two studies of a comparison must use different ones: independent resampling)."""
    tasks = [c for c in columns if c != "avg"]
    logged = {r["path"]: {t: r["scores"].get(t) for t in tasks} for r in records}
    rows = StudyRows(name, tasks=tasks)
    contestants = _contestants(table, tasks, logged, rows)
    if not contestants:
        return rows
    same, reference, rows.seeds = _same_items(name, contestants)
    rows.left_out += [
        (c.label, f"scored other test items than {reference.label}") for c in contestants if c not in same
    ]
    cells = [{s: c.cells[s] for s in rows.seeds} for c in same]
    replicates = joint_bootstrap(cells, N_BOOT, row_generator(seed, "ranking", stream))
    for c, mine, drawn in zip(same, cells, replicates, strict=True):
        rows.averages[c.label] = estimate(mine)
        rows.replicates[c.label] = drawn
    return rows


def _same_items(name: str, contestants: list[RowScores]) -> tuple[list[RowScores], RowScores, list[Any]]:
    """(rows, reference, seeds): the largest group of ``contestants`` scored on the same test items on the
    seeds they all have. Once rows with other items are left out, the seeds are widened to
    those the group has in common if every row of the group still agrees on them (a left-out row must not
    narrow the others' seeds); rows are never given up for more seeds."""
    seeds = _common_seeds(name, contestants)
    same, reference = _largest_group(contestants, seeds)
    while (wider := _common_seeds(name, same)) != seeds:
        group, ref = _largest_group(same, wider)
        if len(group) < len(same):
            break
        same, reference, seeds = group, ref, wider
    return same, reference, seeds


def _common_seeds(name: str, contestants: Sequence[RowScores]) -> list[Any]:
    seeds = sorted(set.intersection(*(set(c.cells) for c in contestants)), key=str)
    if not seeds:
        raise SystemExit(f"{name}: its methods have no seed in common; rank runs of the same seeds")
    return seeds


def _largest_group(contestants: list[RowScores], seeds: list[Any]) -> tuple[list[RowScores], RowScores]:
    """The rows with the most common items signature on ``seeds`` (ties: the first such row's group)."""
    signature = [repr([c.items[s] for s in seeds]) for c in contestants]
    ref = max(range(len(contestants)), key=lambda i: (signature.count(signature[i]), -i))
    group = [c for c, sig in zip(contestants, signature, strict=True) if sig == signature[ref]]
    return group, contestants[ref]


def records_rows(name: str, records: Sequence[dict[str, Any]], stream: str) -> StudyRows:
    """`study_rows` of the table that ``records`` (of the test split) aggregate to."""
    table, _, columns = aggregate(list(records))
    return study_rows(name, table, columns, records, stream)


TIE_DECIMALS = 9
"""Averages are compared rounded to this many decimals: two rows with the same numbers of right items spread
over the tasks differently get averages that differ in the last bits (0 + 40 and 1 + 39 of 60 per task:
0.3333333333333333 and 0.33333333333333337), which must tie; distinct averages of 0/1 scores differ by at
least one item over the test set, far above 1e-9."""


def ranks(values: np.ndarray) -> np.ndarray:
    """Rank 1 for the highest value along axis 0 (ties, to `TIE_DECIMALS`, share the average rank)."""
    return rankdata(-np.round(values, TIE_DECIMALS), axis=0, method="average")


def tau(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall's tau-b of two score vectors over the same rows (ties to `TIE_DECIMALS`; nan when either is
    constant)."""
    return float(kendalltau(np.round(a, TIE_DECIMALS), np.round(b, TIE_DECIMALS)).statistic)


def compare_rankings(a: StudyRows, b: StudyRows, level: float = LEVEL) -> tuple[pd.DataFrame, dict[str, Any]]:
    """(rows, agreement): each shared row's average (%) and rank with its interval in both studies, best of
    ``a`` first; Kendall's tau-b with its bootstrap interval, the replicates without a tau, and the rows that
    only one study has."""
    shared = [label for label in a.averages if label in b.averages]
    if len(shared) < MIN_SHARED:
        raise SystemExit(
            f"{a.name} and {b.name} share {len(shared)} ranked row(s) ({', '.join(shared) or 'none'}): a ranking "
            f"comparison needs at least {MIN_SHARED} methods with per-example test scores in both"
            + "".join(f"; {_reasons(study)}" for study in (a, b) if study.left_out)
        )
    tail = 100 * (1 - level) / 2
    table = pd.DataFrame({"label": shared})
    drawn = {}
    for suffix, study in (("a", a), ("b", b)):
        drawn[suffix] = np.stack([study.replicates[label] for label in shared])
        replicate_ranks = ranks(drawn[suffix])
        table[f"avg_{suffix}"] = 100 * np.array([study.averages[label] for label in shared])
        table[f"rank_{suffix}"] = ranks(table[f"avg_{suffix}"].to_numpy())
        for bound, q in (("low", tail), ("high", 100 - tail)):
            table[f"rank_{suffix}_{bound}"] = np.percentile(replicate_ranks, q, axis=1, method="inverted_cdf")
    taus = np.array([tau(drawn["a"][:, i], drawn["b"][:, i]) for i in range(drawn["a"].shape[1])])
    defined = taus[~np.isnan(taus)]
    low, high = (
        np.percentile(defined, [tail, 100 - tail], method="inverted_cdf")
        if len(defined)
        else (np.nan, np.nan)
    )
    agreement = {
        "tau": tau(table["avg_a"].to_numpy(), table["avg_b"].to_numpy()),
        "tau_low": float(low),
        "tau_high": float(high),
        "undefined": int(len(taus) - len(defined)),
        "replicates": len(taus),
        "rows": len(shared),
        "only_a": sorted(set(a.averages) - set(shared)),
        "only_b": sorted(set(b.averages) - set(shared)),
    }
    return table.sort_values(["rank_a", "label"], kind="stable").reset_index(drop=True)[COLUMNS], agreement


def _reasons(study: StudyRows) -> str:
    """``<study>: 3 row(s) left out (2 x <reason>, ...)``, for an error message."""
    counts = pd.Series([why for _, why in study.left_out]).value_counts()
    return f"{study.name}: {len(study.left_out)} row(s) left out ({'; '.join(f'{n} x {why}' for why, n in counts.items())})"


def _rank_cell(rank: float, low: float, high: float) -> str:
    value = f"{rank:g}"
    return value if low == high == rank else f"{value} ({low:g}-{high:g})"


FEW_SEEDS = 5
"""Below this many seeds the bootstrap's seed stage is coarse (it cannot reach past the extreme seeds)."""


def _seed_caveat(seeds: int) -> str:
    """What a study's number of seeds leaves out of its rank and tau intervals."""
    if seeds == 1:
        return " (one seed: the intervals hold item noise only, not seed noise)"
    if seeds < FEW_SEEDS:
        return (
            f" ({seeds} seeds: the bootstrap cannot draw past the extreme seeds, so the intervals understate "
            "seed noise; stats.md gives each average's t interval over its seeds)"
        )
    return ""


def _signed(value: float) -> str:
    return "undefined" if np.isnan(value) else f"{value:+.2f}"


def to_markdown(table: pd.DataFrame, agreement: dict[str, Any], a: StudyRows, b: StudyRows) -> str:
    """ranking.md: the two rankings side by side, the agreement, what each study averages over, and what was
    left out and why."""
    undefined = agreement["undefined"]
    lines = [
        f"# Ranking: {a.name} against {b.name}",
        "",
        f"Average test score (%) and rank (1 = best; in brackets the 95% bootstrap interval of the rank when it "
        f"spans places) of the {agreement['rows']} methods both studies ranked. Kendall's tau-b between the two "
        f"rankings: **{_signed(agreement['tau'])}**, 95% interval [{_signed(agreement['tau_low'])}, "
        f"{_signed(agreement['tau_high'])}] (1 = same order, 0 = unrelated, -1 = reversed). Hierarchical "
        f"bootstrap, {agreement['replicates']} replicates: seeds, then test items, drawn once per replicate for "
        f"all rows of a study, independently for the two studies (`mtpeft/results/ranking.py`)"
        + (f"; {undefined} replicate(s) had all averages of a study tied and no tau." if undefined else "."),
        "",
    ]
    lines += [
        f"- {study.name}: seeds {' '.join(map(str, study.seeds))}, average over tasks {', '.join(study.tasks)}"
        + _seed_caveat(len(study.seeds))
        for study in (a, b)
    ]
    lines += [
        "",
        f"| method | {a.name} avg | {a.name} rank | {b.name} avg | {b.name} rank | rank in B - rank in A |",
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
