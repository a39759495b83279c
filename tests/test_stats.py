"""`mtpeft.results.stats`: the hierarchical bootstrap and paired comparisons on hand-made scores with known
answers, the per-example rows of `EvalMetrics`, and stats files written from runs' ``scores.jsonl.gz``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from mtpeft.metrics.tracker import (
    EvalMetrics,
    read_example_scores,
    record_digest,
    write_example_scores,
)
from mtpeft.results import main
from mtpeft.results.stats import (
    bootstrap,
    estimate,
    interval,
    paired_cells,
    row_scores,
    seed_interval,
    shown_interval,
    verdict,
)
from tests.results_util import scored_run


def _cells(rng: np.random.Generator, p: dict[str, float], seeds: int = 3, n: int = 200) -> dict:
    return {s: {t: (rng.random(n) < q).astype(float) for t, q in p.items()} for s in range(seeds)}


def test_constant_scores_give_a_degenerate_interval() -> None:
    cells = {s: {"qa": np.full(50, 0.25), "code": np.full(30, 0.75)} for s in range(3)}
    est, low, high = interval(cells, n_boot=200)
    assert est == pytest.approx(0.5) and low == pytest.approx(0.5) and high == pytest.approx(0.5)


def test_seed_interval_is_the_student_t_interval_of_the_seed_averages() -> None:
    """Seeds averaging 0.5, 0.6 and 0.8 (two tasks each): the t interval with 2 degrees of freedom."""
    cells = {
        s: {"qa": np.array([a - 0.1, a + 0.1]), "code": np.array([a, a, a])}
        for s, a in enumerate((0.5, 0.6, 0.8))
    }
    want = scipy_stats.t.interval(
        0.95, 2, loc=np.mean([0.5, 0.6, 0.8]), scale=scipy_stats.sem([0.5, 0.6, 0.8])
    )
    assert seed_interval(cells) == pytest.approx(want)
    assert np.isnan(seed_interval({0: cells[0]})).all()  # one seed: no seed-level interval


def test_a_verdict_needs_the_bootstrap_and_the_seed_interval_to_agree() -> None:
    assert verdict(0.01, 0.05) == "better"  # one seed: the bootstrap alone
    assert verdict(0.01, 0.05, -0.02, 0.08) == "tie"  # the seeds do not settle it
    assert verdict(0.01, 0.05, 0.005, 0.09) == "better"
    assert verdict(-0.05, -0.01, -0.09, -0.001) == "worse"
    assert verdict(-0.01, 0.05, 0.01, 0.02) == "tie"


def test_two_seeds_give_a_wide_t_interval_where_the_bootstrap_is_narrow() -> None:
    """Two seeds 4 points apart, 400 items each: the bootstrap sits between the two seeds' averages (plus
    item noise), the t interval (t(0.975, 1) = 12.7) spans about +-25 points."""
    cells = {0: {"qa": np.array([1.0] * 220 + [0.0] * 180)}, 1: {"qa": np.array([1.0] * 236 + [0.0] * 164)}}
    _, low, high = interval(cells, n_boot=2000, rng=np.random.default_rng(1))
    t_low, t_high = seed_interval(cells)
    assert high - low < 0.12 and (t_low, t_high) == pytest.approx((0.57 - 0.254, 0.57 + 0.254), abs=1e-3)


def test_a_table_shows_the_envelope_of_both_intervals_clipped_to_the_score_range() -> None:
    row = pd.Series({"seeds": 3, "ci_low": 0.30, "ci_high": 0.40, "t_low": 0.32, "t_high": 0.45})
    assert shown_interval(row) == pytest.approx((0.30, 0.45))  # shared test items: t misses item noise
    row = pd.Series({"seeds": 3, "ci_low": 0.003, "ci_high": 0.016, "t_low": -0.004, "t_high": 0.023})
    assert shown_interval(row) == pytest.approx((0.0, 0.023))
    row = pd.Series({"seeds": 1, "ci_low": 0.30, "ci_high": 0.40, "t_low": np.nan, "t_high": np.nan})
    assert shown_interval(row) == (0.30, 0.40)


def test_estimate_is_mean_over_seeds_of_task_averages() -> None:
    cells = {
        0: {"a": np.array([1.0, 0.0]), "b": np.array([1.0])},
        1: {"a": np.array([0.0]), "b": np.array([0.0])},
    }
    assert estimate(cells) == pytest.approx(((0.5 + 1.0) / 2 + 0.0) / 2)


def test_seed_noise_widens_the_interval() -> None:
    rng = np.random.default_rng(1)
    same = {s: {"t": (rng.random(300) < 0.5).astype(float)} for s in range(4)}
    shifted = {s: {"t": (rng.random(300) < 0.2 + 0.2 * s).astype(float)} for s in range(4)}
    _, lo1, hi1 = interval(same, n_boot=1000)
    _, lo2, hi2 = interval(shifted, n_boot=1000)
    assert hi2 - lo2 > 1.5 * (hi1 - lo1)


def test_interval_covers_the_true_mean_about_95_percent() -> None:
    """Coverage sanity: 60 data sets of Bernoulli items (3 seeds, 2 tasks), fixed seeds."""
    rng = np.random.default_rng(123)
    truth = {"qa": 0.3, "code": 0.6}
    hits = 0
    for _ in range(60):
        _, low, high = interval(_cells(rng, truth, n=150), n_boot=400, rng=rng)
        hits += low <= 0.45 <= high
    assert 0.8 <= hits / 60 <= 1.0


def test_identical_methods_tie_and_a_constant_difference_is_exact() -> None:
    rng = np.random.default_rng(0)
    a = _cells(rng, {"qa": 0.5, "code": 0.4})
    same, _ = _as_pair(a, a)
    est, low, high = interval(same, n_boot=300)
    assert est == 0 and low == 0 and high == 0 and verdict(low, high) == "tie"
    plus = {s: {t: v + 0.1 for t, v in tasks.items()} for s, tasks in a.items()}
    diffs, _ = _as_pair(plus, a)
    est, low, high = interval(diffs, n_boot=300)
    assert (est, low, high) == pytest.approx((0.1, 0.1, 0.1)) and verdict(low, high) == "better"


def test_noise_alone_is_a_tie_and_a_real_gap_is_not() -> None:
    rng = np.random.default_rng(7)
    a, b = _cells(rng, {"qa": 0.5}, n=300), _cells(rng, {"qa": 0.5}, n=300)
    diffs, _ = _as_pair(a, b)
    assert verdict(*interval(diffs, n_boot=1000)[1:]) == "tie"
    c = _cells(rng, {"qa": 0.7}, n=300)
    diffs, _ = _as_pair(c, a)
    assert verdict(*interval(diffs, n_boot=1000)[1:]) == "better"
    diffs, _ = _as_pair(a, c)
    assert verdict(*interval(diffs, n_boot=1000)[1:]) == "worse"


def test_pairing_needs_common_seeds_and_the_same_items() -> None:
    from mtpeft.results.stats import RowScores

    a = RowScores("a", {0: {"t": np.ones(2)}}, {0: {"t": ["0:x", "1:y"]}})
    b = RowScores("b", {0: {"t": np.zeros(2)}}, {0: {"t": ["0:x", "1:z"]}})
    assert "different test items" in paired_cells(a, b)[1]
    c = RowScores("c", {1: {"t": np.zeros(2)}}, {1: {"t": ["0:x", "1:y"]}})
    assert paired_cells(a, c)[1] == "no seed in common"


def test_bootstrap_is_reproducible_and_rejects_empty_input() -> None:
    cells = _cells(np.random.default_rng(0), {"qa": 0.5}, seeds=2, n=20)
    first = bootstrap(cells, 50, np.random.default_rng(3))
    assert np.array_equal(first, bootstrap(cells, 50, np.random.default_rng(3)))
    with pytest.raises(ValueError, match="at least one seed"):
        bootstrap({}, 10)


def _as_pair(a: dict, b: dict) -> tuple[dict, str | None]:
    from mtpeft.results.stats import RowScores

    items = {s: {t: [str(i) for i in range(len(v))] for t, v in tasks.items()} for s, tasks in a.items()}
    return paired_cells(RowScores("a", a, items), RowScores("b", b, items))


# -- per-example rows from the metric tracker -------------------------------------------------------
def _record(task: str, answer: str) -> dict:
    return {
        "task": task,
        "instruction": f"q {answer}",
        "input": "",
        "output": answer,
        "answer": answer,
        "meta": {},
    }


def test_eval_metrics_rows_match_the_computed_metrics(tmp_path: Path) -> None:
    tracker = EvalMetrics("test", {"qa": ["exact_match", "f1"], "code": ["bleu", "exact_match"]})
    qa = [_record("qa", "red fox"), _record("qa", "blue"), _record("qa", "green")]
    tracker.update("qa", [["red fox"], ["blue sky"], ["nope"]], qa, [0, 1, 2])
    code = [_record("code", "a b c d"), _record("code", "x y z w")]
    tracker.update("code", [["a b c d"], ["x y"]], code, [3, 4])
    metrics = tracker.compute()
    rows = tracker.example_rows()
    assert [r["index"] for r in rows] == [0, 1, 2, 3, 4]
    qa_rows = [r for r in rows if r["task"] == "qa"]
    assert [r["score"] for r in qa_rows] == [1.0, 0.0, 0.0]
    assert np.mean([r["scores"]["f1"] for r in qa_rows]) == pytest.approx(metrics["test/qa/f1"])
    assert np.mean([r["score"] for r in qa_rows]) == pytest.approx(metrics["test/qa/score"])
    code_rows = [r for r in rows if r["task"] == "code"]
    assert all(r["score"] is None for r in code_rows)  # BLEU is a corpus metric: no per-example score
    assert [r["scores"]["exact_match"] for r in code_rows] == [1.0, 0.0]
    assert rows[0]["item"] == record_digest(qa[0]) and rows[0]["prediction"] == "red fox"
    path = write_example_scores(tmp_path / "scores.jsonl.gz", rows)
    first = path.read_bytes()
    assert read_example_scores(path) == json.loads(json.dumps(rows))
    write_example_scores(path, rows)
    assert path.read_bytes() == first  # no time stamp in the gzip header


# -- stats files from runs --------------------------------------------------------------------------
def test_a_pair_reads_best_first_on_the_seeds_both_rows_have(tmp_path: Path) -> None:
    """x has a strong extra seed (ahead over all its seeds) but is behind y on the seed both have."""
    half = {t: [1] * 30 + [0] * 30 for t in ("qa", "code")}
    scored_run(tmp_path, "x", 0, {t: [1] * 25 + [0] * 35 for t in ("qa", "code")})
    scored_run(tmp_path, "x", 1, {t: [1] * 60 for t in ("qa", "code")})
    scored_run(tmp_path, "y", 0, half)
    main([str(tmp_path), "--no-plots"])
    pair = pd.read_csv(tmp_path / "pairwise.csv").iloc[0]
    assert (pair["a"], pair["b"], pair["seeds"]) == ("y", "x", 1) and pair["diff"] == pytest.approx(5 / 60)
    assert pair["ci_low"] <= pair["diff"] <= pair["ci_high"]


def test_a_pair_the_bootstrap_calls_is_a_tie_when_the_seeds_disagree(tmp_path: Path) -> None:
    """x beats y by 6, 30 and 36 items of 300 per task on seeds 0, 1, 2: the bootstrap's interval stays above
    0 (it cannot draw past seed 0's +2 points), the paired t interval over +2, +10, +12 points does not."""
    for seed, more in enumerate((6, 30, 36)):
        scored_run(tmp_path, "y", seed, {t: [1] * 150 + [0] * 150 for t in ("qa", "code")})
        scored_run(tmp_path, "x", seed, {t: [1] * (150 + more) + [0] * (150 - more) for t in ("qa", "code")})
    main([str(tmp_path), "--no-plots"])
    pair = pd.read_csv(tmp_path / "pairwise.csv").iloc[0]
    assert (pair["a"], pair["b"]) == ("x", "y") and pair["diff"] == pytest.approx(0.08)
    assert pair["ci_low"] > 0 and pair["t_low"] < 0 < pair["t_high"] and pair["verdict"] == "tie"


def test_stats_files_ci_column_and_pairwise_verdicts(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for seed in range(3):
        base = {t: (rng.random(80) < 0.3).astype(int).tolist() for t in ("qa", "code")}
        scored_run(tmp_path, "lora", seed, base)
        scored_run(tmp_path, "lora_copy", seed, base)  # the same predictions: a tie at exactly 0
        scored_run(tmp_path, "hycam", seed, {t: [1] * 80 for t in base})  # every item right: better than both
    main([str(tmp_path)])
    intervals = pd.read_csv(tmp_path / "stats.csv")
    assert list(intervals.sort_values("estimate")["label"])[-1] == "hycam"
    hycam = intervals[intervals["label"] == "hycam"].iloc[0]
    assert hycam["ci_low"] == hycam["ci_high"] == 1.0
    pairs = pd.read_csv(tmp_path / "pairwise.csv")
    verdicts = {(p["a"], p["b"]): p["verdict"] for _, p in pairs.iterrows()}
    assert verdicts[("hycam", "lora")] == verdicts[("hycam", "lora_copy")] == "better"
    assert set(verdicts.values()) == {"better", "tie"} and len(verdicts) == 3
    tie = pairs[pairs["verdict"] == "tie"].iloc[0]
    assert tie["diff"] == tie["ci_low"] == tie["ci_high"] == 0.0
    md = (tmp_path / "results.md").read_text()
    assert (
        "avg 95% CI" in md
        and "| hycam | 3 | **100.0 ± 0.0** | **100.0 ± 0.0** | **100.0 ± 0.0** | [100.0, 100.0] |" in md
    )
    lora = intervals[intervals["label"] == "lora"].iloc[0]  # 3 seeds: the table shows the seed t interval
    table = pd.read_csv(tmp_path / "results.csv")
    shown = table[table["method"] == "lora"].iloc[0]
    assert (shown["avg_ci_low"], shown["avg_ci_high"]) == pytest.approx((lora["t_low"], lora["t_high"]))
    assert (
        lora["t_high"] - lora["t_low"] > 0 and "95% CI (t over seeds)" in (tmp_path / "stats.md").read_text()
    )
    assert "## Paired differences" in (tmp_path / "stats.md").read_text()
    for name in ("ci", "pairwise"):
        assert (tmp_path / "plots" / f"{name}.png").stat().st_size > 0


def test_scores_that_disagree_with_the_logged_metric_are_rejected(tmp_path: Path) -> None:
    scored_run(tmp_path, "lora", 0, {"qa": [1, 0, 1, 1]})
    path = tmp_path / "lora_0" / "results.json"
    data = json.loads(path.read_text())
    data["metrics"]["test"]["test/qa/score"] = 0.5  # 0.75 in the per-example file
    path.write_text(json.dumps(data))
    from mtpeft.results import aggregate, load_runs

    records = load_runs([tmp_path])
    table, _, columns = aggregate(records)
    scores = row_scores(table.iloc[0], ["qa"], {r["path"]: {"qa": r["scores"]["qa"]} for r in records})
    assert scores.problem and "!= logged 0.500000" in scores.problem


def test_a_run_writes_per_example_scores_that_average_to_its_metrics(tmp_path: Path) -> None:
    from mtpeft.run import run
    from tests.conftest import TINY_RUN, compose_train

    results = run(compose_train([*TINY_RUN, "method=lora", "logger=none"], tmp_path), tmp_path)
    rows = read_example_scores(tmp_path / "scores.jsonl.gz")
    for split in ("val", "test"):
        mine = [r for r in rows if r["split"] == split]
        assert len({r["index"] for r in mine}) == len(mine) == 18  # 6 items x 3 tasks, each once
        for task in ("qa", "code", "reasoning"):
            values = [r["score"] for r in mine if r["task"] == task]
            assert len(values) == 6
            assert np.mean(values) == pytest.approx(
                results["metrics"][split][f"{split}/{task}/score"], abs=1e-12
            )


def test_intervals_depend_on_their_own_data_only() -> None:
    """A row's interval is the same whatever order its seeds and tasks were read in and whatever other rows
    the table holds (a table rebuilt from published runs matches the one built from the logs)."""
    cells = _cells(np.random.default_rng(1), {"qa": 0.4, "code": 0.6}, seeds=3, n=30)
    shuffled = {s: dict(reversed(cells[s].items())) for s in reversed(list(cells))}
    assert np.array_equal(bootstrap(cells, 200), bootstrap(shuffled, 200))


def test_a_rows_interval_does_not_change_when_other_rows_come_or_go(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for seed in range(2):
        scored_run(tmp_path / "both", "lora", seed, {"qa": (rng.random(40) < 0.5).astype(int).tolist()})
        scored_run(tmp_path / "both", "hycam", seed, {"qa": (rng.random(40) < 0.3).astype(int).tolist()})
    (tmp_path / "lora").mkdir()
    for seed in range(2):
        (tmp_path / "both" / f"lora_{seed}").rename(tmp_path / "lora" / f"lora_{seed}")
    scored_run(
        tmp_path / "lora", "a_first", 0, {"qa": [1, 0] * 5}
    )  # a row before lora, drawing less than hycam
    main([str(tmp_path / "lora"), "--no-plots"])
    alone = pd.read_csv(tmp_path / "lora" / "stats.csv").set_index("label").loc["lora"]
    for seed in range(2):
        (tmp_path / "lora" / f"lora_{seed}").rename(tmp_path / "both" / f"lora_{seed}")
    main([str(tmp_path / "both"), "--no-plots"])
    together = pd.read_csv(tmp_path / "both" / "stats.csv").set_index("label").loc["lora"]
    assert (alone["ci_low"], alone["ci_high"]) == (together["ci_low"], together["ci_high"])
    assert alone["ci_low"] < alone["ci_high"]
