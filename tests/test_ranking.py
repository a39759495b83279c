"""`mtpeft.results.ranking` (``python -m mtpeft.results A --against B``): two studies' method rankings side by
side, on hand-made runs whose rankings, rank intervals and Kendall's tau are known."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mtpeft.results import main
from tests.results_util import scored_run


def _study(root: Path, rates: dict[str, float], seeds: int = 2, n: int = 60, noisy: bool = False) -> Path:
    """One run per method and seed; each test item of method m is right with rate ``rates[m]`` (exactly that
    fraction of items when not ``noisy``, so every bootstrap replicate is the same)."""
    rng = np.random.default_rng(len(rates))
    for method, rate in rates.items():
        for seed in range(seeds):
            if noisy:
                hits = {t: (rng.random(n) < rate).astype(int).tolist() for t in ("qa", "code")}
            else:
                right = round(rate * n)
                hits = {t: [1] * right + [0] * (n - right) for t in ("qa", "code")}
            scored_run(root, method, seed, hits, trainable=0 if method == "none" else 10)
    return root


def _ranking(a: Path, b: Path) -> tuple[pd.DataFrame, str]:
    main([str(a), "--no-plots", "--against", str(b)])
    return pd.read_csv(a / "ranking.csv").set_index("label"), (a / "ranking.md").read_text()


def test_one_swap_in_four_gives_tau_two_thirds(tmp_path: Path) -> None:
    a = _study(tmp_path / "a", {"w": 0.8, "x": 0.6, "y": 0.4, "z": 0.2})
    b = _study(tmp_path / "b", {"w": 0.9, "x": 0.3, "y": 0.5, "z": 0.1})
    table, md = _ranking(a, b)
    assert table["rank_a"].to_dict() == {"w": 1, "x": 2, "y": 3, "z": 4}
    assert table["rank_b"].to_dict() == {"w": 1, "x": 3, "y": 2, "z": 4}
    assert table["avg_b"]["x"] == pytest.approx(30.0)
    tau = table["tau"].iloc[0]
    assert tau == pytest.approx(4 / 6)  # 6 pairs, 5 concordant, 1 discordant
    assert table["tau_low"].iloc[0] == table["tau_high"].iloc[0] == pytest.approx(tau)  # no noise: no spread
    assert "**+0.67**" in md and "| x | 60.0 | 2 | 30.0 | 3 | +1 |" in md


def test_reversed_ranking_is_minus_one(tmp_path: Path) -> None:
    rates = {"w": 0.8, "x": 0.6, "y": 0.4}
    a = _study(tmp_path / "a", rates)
    b = _study(tmp_path / "b", {m: 1 - r for m, r in rates.items()})
    table, _ = _ranking(a, b)
    assert table["tau"].iloc[0] == pytest.approx(-1.0)


def test_noise_only_differences_give_wide_rank_intervals_and_a_tau_interval_around_zero(
    tmp_path: Path,
) -> None:
    same = {m: 0.5 for m in "vwxyz"}
    a = _study(tmp_path / "a", same, noisy=True)
    b = _study(tmp_path / "b", {m: 0.5 for m in "zyxwv"}, noisy=True)
    table, md = _ranking(a, b)
    assert (table["rank_a_high"] - table["rank_a_low"]).min() >= 2  # nobody's place is settled
    assert table["tau_low"].iloc[0] < 0 < table["tau_high"].iloc[0]
    assert " (1-" in md  # intervals are printed when they span places


def test_clear_gaps_give_settled_ranks(tmp_path: Path) -> None:
    rates = {"w": 0.9, "x": 0.6, "y": 0.3}
    a = _study(tmp_path / "a", rates, noisy=True, n=200)
    b = _study(tmp_path / "b", rates, noisy=True, n=200)
    table, _ = _ranking(a, b)
    assert (table["rank_a_low"] == table["rank_a_high"]).all() and table["tau_low"].iloc[0] == 1.0


def test_reference_rows_and_unshared_rows_are_left_out_and_listed(tmp_path: Path) -> None:
    a = _study(tmp_path / "a", {"none": 0.0, "w": 0.8, "x": 0.6, "only_a": 0.1})
    b = _study(tmp_path / "b", {"none": 0.0, "w": 0.8, "x": 0.3, "only_b": 0.9})
    table, md = _ranking(a, b)
    assert sorted(table.index) == ["w", "x"]
    assert "| a | none | trains nothing (a reference row) |" in md
    assert "| a | only_a | not in b |" in md and "| b | only_b | not in a |" in md


def test_fewer_than_two_shared_methods_is_an_error_naming_them(tmp_path: Path) -> None:
    a = _study(tmp_path / "a", {"w": 0.8, "x": 0.6})
    b = _study(tmp_path / "b", {"w": 0.8, "y": 0.6})
    with pytest.raises(SystemExit, match=r"share 1 ranked row\(s\) \(w\)"):
        main([str(a), "--no-plots", "--against", str(b)])


def test_against_needs_the_test_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _study(tmp_path / "a", {"w": 0.8, "x": 0.6})
    with pytest.raises(SystemExit):
        main([str(a), "--split", "val", "--against", str(a)])
    assert "--against compares test rankings" in capsys.readouterr().err


def test_a_studys_published_runs_directory_is_named_after_the_study(tmp_path: Path) -> None:
    a = _study(tmp_path / "tiny" / "runs", {"w": 0.8, "x": 0.6})
    b = _study(tmp_path / "real" / "runs", {"w": 0.8, "x": 0.3})
    main([str(a), "--no-plots", "--against", str(b), "--out", str(tmp_path / "out")])
    assert "# Ranking: tiny/runs against real/runs" in (tmp_path / "out" / "ranking.md").read_text()
