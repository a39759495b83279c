"""`mtpeft.results.ranking` (``python -m mtpeft.results A --against B``): two studies' method rankings side by
side, on hand-made runs and replicates whose rankings, rank intervals and Kendall's tau are known."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import kendalltau

from mtpeft.results import aggregate, load_runs, main
from mtpeft.results.ranking import StudyRows, compare_rankings, ranks, study_rows, tau
from tests.results_util import scored_run


def _study(root: Path, rates: dict[str, float], seeds: int = 2, n: int = 60, noisy: bool = False) -> Path:
    """One run per method and seed on the same ``n`` items per task. Not ``noisy``: method m gets the first
    ``rates[m] * n`` items right, so a better method's right items include a worse one's and every joint
    resample keeps the order (however small the gap). ``noisy``: each item is right with that rate."""
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


def _rows(root: Path, stream: str) -> StudyRows:
    records = load_runs([root])
    table, _, columns = aggregate(records)
    return study_rows(root.name, table, columns, records, stream)


def test_one_swap_in_four_gives_tau_two_thirds(tmp_path: Path) -> None:
    a = _study(tmp_path / "a", {"w": 0.8, "x": 0.6, "y": 0.4, "z": 0.2})
    b = _study(tmp_path / "b", {"w": 0.9, "x": 0.3, "y": 0.5, "z": 0.1})
    table, md = _ranking(a, b)
    assert table["rank_a"].to_dict() == {"w": 1, "x": 2, "y": 3, "z": 4}
    assert table["rank_b"].to_dict() == {"w": 1, "x": 3, "y": 2, "z": 4}
    assert table["avg_b"]["x"] == pytest.approx(30.0)
    assert table["tau"].iloc[0] == pytest.approx(4 / 6)  # 6 pairs, 5 concordant, 1 discordant
    assert "**+0.67**" in md and "| x | 60.0 | 2 | 30.0 | 3 | +1 |" in md
    assert "- a: seeds 0 1, average over tasks qa, code (2 seeds: the bootstrap cannot draw past" in md


def test_a_small_gap_on_shared_items_is_a_settled_rank(tmp_path: Path) -> None:
    """Rows are resampled jointly: 3 items in 60 between w and x, the same items in every replicate, so
    neither rank moves (separate resampling per row would swap them in many replicates)."""
    rates = {"w": 33 / 60, "x": 30 / 60, "y": 27 / 60}
    a = _study(tmp_path / "a", rates)
    b = _study(tmp_path / "b", {"w": 0.2, "x": 0.5, "y": 0.8})
    table, md = _ranking(a, b)
    assert (table["rank_a_low"] == table["rank_a"]).all() and (table["rank_a_high"] == table["rank_a"]).all()
    assert (
        table["tau"].iloc[0] == table["tau_low"].iloc[0] == table["tau_high"].iloc[0] == pytest.approx(-1.0)
    )
    assert "| x | 50.0 | 2 | 50.0 | 2 | +0 |" in md


def test_noise_only_differences_give_wide_rank_intervals_and_a_tau_interval_around_zero(
    tmp_path: Path,
) -> None:
    a = _study(tmp_path / "a", {m: 0.5 for m in "vwxyz"}, noisy=True)
    b = _study(tmp_path / "b", {m: 0.5 for m in "vwxyz"}, noisy=True, seeds=3)
    table, md = _ranking(a, b)
    assert (table["rank_a_high"] - table["rank_a_low"]).min() >= 2  # nobody's place is settled
    assert table["tau_low"].iloc[0] < 0 < table["tau_high"].iloc[0]
    assert " (1-" in md  # intervals are printed when they span places


def test_the_two_studies_are_resampled_independently(tmp_path: Path) -> None:
    """The same runs read as study A and as study B: their replicates must not be the same draws."""
    root = _study(tmp_path / "s", {"w": 0.6, "x": 0.5, "y": 0.4}, noisy=True, n=80)
    a, b = _rows(root, "a"), _rows(root, "b")
    assert a.averages == b.averages
    correlation = np.corrcoef(a.replicates["w"], b.replicates["w"])[0, 1]
    assert abs(correlation) < 0.15


def test_rank_bounds_are_places_and_tied_replicates_are_counted() -> None:
    n = 200
    rows_a = {"x": np.full(n, 0.6), "y": np.full(n, 0.5), "z": np.full(n, 0.1)}
    rows_a["y"][:3] = 0.7  # y above x in 3 of 200 replicates (1.5% < 2.5%): ranks stay settled
    rows_a["x"][3:9] = 0.4  # x below y in 6 more (4.5% in all): x's upper bound is place 2
    flat = {"x": np.full(n, 0.3), "y": np.full(n, 0.3), "z": np.full(n, 0.3)}
    flat["x"][1:] = 0.9  # replicate 0 of study B has all three averages tied: no tau there
    a = StudyRows("A", {"x": 0.6, "y": 0.5, "z": 0.1}, rows_a, [0], ["t"])
    b = StudyRows("B", {"x": 0.9, "y": 0.3, "z": 0.2}, flat, [0], ["t"])
    table, agreement = compare_rankings(a, b)
    x = table.set_index("label").loc["x"]
    assert (x["rank_a_low"], x["rank_a_high"]) == (1, 2)
    assert agreement["undefined"] == 1 and agreement["replicates"] == n
    assert not np.isnan(agreement["tau_low"])


def test_reference_rows_other_items_and_unshared_rows_are_left_out_and_listed(tmp_path: Path) -> None:
    a = _study(tmp_path / "a", {"none": 0.0, "w": 0.8, "x": 0.6, "v": 0.5, "only_a": 0.1})
    scored_run(tmp_path / "a", "fewer_items", 0, {"qa": [1] * 40, "code": [0] * 40})
    scored_run(tmp_path / "a", "fewer_items", 1, {"qa": [1] * 40, "code": [0] * 40})
    b = _study(tmp_path / "b", {"none": 0.0, "w": 0.8, "x": 0.3, "v": 0.1, "only_b": 0.9})
    table, md = _ranking(a, b)
    assert sorted(table.index) == ["v", "w", "x"]
    assert "| a | none | trains nothing (a reference row) |" in md
    assert "| a | fewer_items | scored other test items than" in md
    assert "| a | only_a | not in b |" in md and "| b | only_b | not in a |" in md


def test_a_row_left_out_for_other_items_does_not_narrow_the_seeds(tmp_path: Path) -> None:
    a = _study(tmp_path / "a", {"w": 0.8, "x": 0.6, "y": 0.4})
    scored_run(a, "q", 0, {"qa": [1] * 40, "code": [0] * 40})  # seed 0 only, other items
    rows = _rows(a, "a")
    assert rows.seeds == [0, 1] and sorted(rows.averages) == ["w", "x", "y"]
    assert [label for label, _ in rows.left_out] == ["q"]


def test_rows_are_not_given_up_for_more_seeds(tmp_path: Path) -> None:
    """a, b, c, d agree on seed 0; on seed 1, c and d were scored on other items: ranking a and b alone on
    seeds 0, 1 would lose two methods, so all four are ranked on seed 0 (q, other items on seed 0, is out)."""
    same, other = (
        {t: [1] * 30 + [0] * 30 for t in ("qa", "code")},
        {t: [1] * 20 + [0] * 20 for t in ("qa", "code")},
    )
    for method in "abcd":
        scored_run(tmp_path, method, 0, same)
        scored_run(tmp_path, method, 1, other if method in "cd" else same)
    scored_run(tmp_path, "q", 0, other)
    rows = _rows(tmp_path, "a")
    assert rows.seeds == [0] and sorted(rows.averages) == ["a", "b", "c", "d"]


def test_equal_item_counts_tie_whatever_their_rounding() -> None:
    """0 + 40 and 1 + 39 right items of 60 per task: the same average, 0.3333333333333333 and
    0.33333333333333337 in floating point; a rank or a tau must see a tie, not an order."""
    first = np.mean([np.mean([0] * 60), np.mean([1] * 40 + [0] * 20)])
    second = np.mean([np.mean([1] + [0] * 59), np.mean([1] * 39 + [0] * 21)])
    assert first != second  # the premise: they differ in the last bit
    assert ranks(np.array([first, second, 0.1])).tolist() == [1.5, 1.5, 3.0]
    assert tau(np.array([first, second, 0.1]), np.array([0.5, 0.4, 0.1])) == pytest.approx(
        kendalltau([1, 1, 0], [2, 1, 0]).statistic
    )


def test_fewer_than_three_shared_methods_is_an_error_naming_them_and_why(tmp_path: Path) -> None:
    a = _study(tmp_path / "a", {"none": 0.0, "w": 0.8, "x": 0.6})
    b = _study(tmp_path / "b", {"w": 0.8, "x": 0.6})
    with pytest.raises(SystemExit, match=r"share 2 ranked row\(s\) \(w, x\).*1 x trains nothing"):
        main([str(a), "--no-plots", "--against", str(b)])


def test_duplicated_labels_are_an_error() -> None:
    table = pd.DataFrame(
        {"method": ["lora", "lora"], "variant": ["", ""], "trainable_params": [10, 10], "runs": [[], []]}
    )
    with pytest.raises(SystemExit, match="rows lora occur more than once"):
        study_rows("mixed", table, ["qa", "avg"], [], "a")


def test_against_needs_the_test_split_and_an_existing_study(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    a = _study(tmp_path / "a", {"w": 0.8, "x": 0.6, "y": 0.1})
    with pytest.raises(SystemExit):
        main([str(a), "--split", "val", "--against", str(a)])
    assert "--against compares test rankings" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--against no_such_study: no results for 'no_such_study'"):
        main([str(a), "--against", "no_such_study"])
    assert not (a / "results.md").exists()  # checked before anything is written


def test_a_studys_published_runs_directory_is_named_after_the_study(tmp_path: Path) -> None:
    a = _study(tmp_path / "tiny" / "runs", {"w": 0.8, "x": 0.6, "y": 0.1})
    b = _study(tmp_path / "real" / "runs", {"w": 0.8, "x": 0.3, "y": 0.1})
    main([str(a), "--no-plots", "--against", str(b), "--out", str(tmp_path / "out")])
    assert "# Ranking: tiny/runs against real/runs" in (tmp_path / "out" / "ranking.md").read_text()


def test_by_ranks_the_runs_of_two_values_of_a_key_against_each_other(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``--by trainer.max_steps``: one directory with each method at two budgets; the ranking at the longer
    budget (y overtakes x) against the shorter one, values in numeric order (1200 before 240 in text)."""
    budgets = {240: {"w": 0.8, "x": 0.6, "y": 0.4, "z": 0.2}, 1200: {"w": 0.9, "x": 0.5, "y": 0.7, "z": 0.1}}
    for steps, rates in budgets.items():
        for method, rate in rates.items():
            for seed in (0, 1):
                right = round(rate * 60)
                hits = {t: [1] * right + [0] * (60 - right) for t in ("qa", "code")}
                extra = {"trainer": {"max_steps": steps}}
                scored_run(
                    tmp_path / "s", method, seed, hits, config_extra=extra, name=f"{method}_{seed}_{steps}"
                )
    main([str(tmp_path / "s"), "--no-plots", "--by", "trainer.max_steps"])
    table = pd.read_csv(tmp_path / "s" / "ranking.csv").set_index("label")
    assert table["rank_a"].to_dict() == {"w": 1, "x": 2, "y": 3, "z": 4}  # 240 steps
    assert table["rank_b"].to_dict() == {"w": 1, "x": 3, "y": 2, "z": 4}  # 1200 steps
    assert table["tau"].iloc[0] == pytest.approx(4 / 6)
    md = (tmp_path / "s" / "ranking.md").read_text()
    assert "# Ranking: s (trainer.max_steps=240) against s (trainer.max_steps=1200)" in md
    with pytest.raises(SystemExit, match=r"--by method.name: the finished runs take 4 value\(s\) of method"):
        main([str(tmp_path / "s"), "--no-plots", "--by", "method.name"])
    with pytest.raises(SystemExit, match=r"take 1 value\(s\) of no.such \(None \(16 runs\)\)"):
        main([str(tmp_path / "s"), "--no-plots", "--by", "no.such", "--out", str(tmp_path / "fresh")])
    assert not (tmp_path / "fresh").exists()  # checked before anything is written
    with pytest.raises(SystemExit):
        main([str(tmp_path / "s"), "--by", "seed", "--against", str(tmp_path / "s")])
    assert "--against and --by both write ranking.md" in capsys.readouterr().err


def test_a_study_read_by_name_leaves_its_convergence_check_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A study's check runs (published ``check_*`` and the runner's ``..._check`` sweeps in logs/), at another
    budget, would split each checked method into two rows that match no row of the other study; read by
    name, the study is its final runs. Read as a directory, everything is read (``--by`` needs it)."""
    rates = {"w": 0.8, "x": 0.6, "y": 0.4, "z": 0.2}
    for method, rate in rates.items():
        right = round(rate * 60)
        hits = {t: [1] * right + [0] * (60 - right) for t in ("qa", "code")}
        published = tmp_path / "experiments" / "real" / "runs"
        for seed in (0, 1):
            scored_run(published, method, seed, hits, name=f"final_{method}_s{seed}_0000000{seed}")
        if method in ("w", "x"):  # checked at 3x the budget, once published, once still in logs/
            longer = {"trainer": {"max_steps": 360}}
            scored_run(published, method, 0, hits, config_extra=longer, name=f"check_{method}_s0_00000009")
            sweep = tmp_path / "logs" / "real" / "multiruns" / "2026-12-03_12-33-04_0121ba_check"
            scored_run(sweep, method, 0, hits, config_extra=longer, name=method)
    elsewhere = scored_run(tmp_path / "elsewhere", "y", 0, hits, config_extra=longer, name="7")
    skipped = tmp_path / "logs" / "real" / "multiruns" / "2026-12-03_14-00-00_1a2b3c_check" / "0"
    skipped.mkdir(parents=True)  # a check job skipped because its run had finished outside the roots
    (skipped / "skipped.json").write_text(json.dumps({"status": "skipped", "finished_in": str(elsewhere)}))
    tiny = _study(tmp_path / "experiments" / "tiny", {"w": 0.9, "x": 0.5, "y": 0.7, "z": 0.1})
    scored_run(tiny, "w", 0, hits, config_extra=longer, name="check_w_s0_00000009")  # the other side's too
    monkeypatch.setenv("MTPEFT_ROOT", str(tmp_path))
    main(["real", "--no-plots", "--against", "tiny"])
    table = pd.read_csv(tmp_path / "experiments" / "real" / "ranking.csv").set_index("label")
    assert sorted(table.index) == ["w", "x", "y", "z"] and table["rank_a"]["x"] == 2
    results = pd.read_csv(tmp_path / "experiments" / "real" / "results.csv")
    assert sorted(results["method"]) == ["w", "x", "y", "z"] and set(results["n"]) == {2}
    assert len(load_runs([tmp_path / "experiments" / "real" / "runs"])) == 10  # a directory: all of it
