"""`mtpeft.study.check`: a study's convergence check (``check`` in its experiment config): the section's
validation, the check's sweeps, how many jobs it declares, and its tables and ranking against the final runs
(hand-made runs; the slow end-to-end study test runs one for real)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mtpeft.study.check import (
    check_methods,
    check_seeds,
    validate_check,
    validate_check_seeds,
    write_check,
)
from mtpeft.study.commands import check_commands, declared_jobs, final_commands, sweep_size, tuning_commands
from mtpeft.study.config import Study, load_study, split_overrides
from tests.results_util import scored_run


def _study(check: dict | None, tuned: bool = True) -> Study:
    return Study(
        name="s",
        methods=["lora", "hycam", "mtl_lora", "none"],
        log_dir=Path("/logs"),
        task_name="s",
        seeds=["0", "1", "2"],
        tune={"seed": 0, "lr": [1e-3, 1e-2], "methods": {"none": None}} if tuned else None,
        check=check,
        runner_keys=["tune", "check"],
    )


def test_check_sweeps_run_the_chosen_values_with_the_checks_overrides_and_seeds() -> None:
    study = _study({"overrides": ["trainer.max_steps=360", "trainer.val_check_interval=60"], "seeds": [0, 1]})
    chosen = {
        "lora": {"optimizer.lr": 0.01},
        "hycam": {"optimizer.lr": 0.001},
        "mtl_lora": {"optimizer.lr": 0.01},
    }
    commands = check_commands(study, chosen, ["data.batch_size=8"], ["launcher=joblib"])
    assert [directory.name.split("_", 3)[3] for _, directory in commands] == [
        "check-lora",
        "check-hycam",
        "check-mtl_lora",
    ]
    lora = commands[0][0]
    tail = lora[lora.index("experiment=s") :]
    assert tail[:4] == ["experiment=s", "~tune", "~check", "launcher=joblib"]
    assert {"method=lora", "optimizer.lr=0.01", "++tuned={optimizer.lr:0.01}", "seed=0,1"} <= set(tail)
    assert tail.index("trainer.max_steps=360") > tail.index("data.batch_size=8")  # the check's change wins
    assert "test=false" not in tail and not any(t.startswith("seed=0,1,2") for t in tail)


def test_check_defaults_are_the_tuned_methods_and_the_first_seed() -> None:
    study = _study({"overrides": ["trainer.max_steps=360"]})
    assert check_methods(study) == ["lora", "hycam", "mtl_lora"] and check_seeds(study) == ["0"]
    untuned = _study({"overrides": ["trainer.max_steps=360"]}, tuned=False)
    assert check_methods(untuned) == ["lora", "hycam", "mtl_lora", "none"]
    (command, directory), *_ = check_commands(untuned, {}, [], [])
    assert directory.name.endswith("_check") and "method=lora,hycam,mtl_lora,none" in command
    assert declared_jobs(study)["check"] == 3 and declared_jobs(_study(None))["check"] == 0


@pytest.mark.parametrize(
    ("check", "message"),
    [
        ({"overrides": ["trainer.max_steps=360"], "budget": 3}, "unknown key"),
        ({"overrides": []}, "check.overrides: a non-empty list"),
        ({"overrides": ["trainer.max_steps"]}, "check.overrides: a non-empty list of key=value"),
        (
            {"overrides": ["trainer.max_steps=9"], "methods": ["lora", "dora"]},
            "check.methods: dora not among",
        ),
        ({"overrides": ["trainer.max_steps=9"], "seeds": []}, "check.seeds: a non-empty list or null"),
        ([1], "must be a mapping"),
    ],
)
def test_bad_check_sections_name_the_key(check: object, message: str) -> None:
    with pytest.raises(SystemExit, match=message) as error:
        validate_check(_study(check))  # type: ignore[arg-type]
    assert "conf/experiment/s.yaml: check" in str(error.value)


def test_check_overrides_on_the_command_line_are_the_runners() -> None:
    given = ["check.seeds=[0,1]", "+check={overrides:['trainer.max_steps=9']}"]
    parts = split_overrides([*given, "seed=0"])
    assert parts.runner == given and parts.seeds == ["seed=0"] and not parts.jobs


def test_check_tables_and_ranking_against_the_final_runs_of_its_seeds(tmp_path: Path) -> None:
    """Finals (3 seeds) rank lora > mtl_lora > hycam; the check (seed 0, longer budget) mtl_lora > lora >
    hycam. The ranking uses the finals of the check's seeds and methods only."""
    final, check = tmp_path / "logs" / "final", tmp_path / "logs" / "check"
    n = 50

    def hits(right: int) -> dict[str, list[int]]:
        return {"qa": [1] * right + [0] * (n - right)}

    for seed in range(3):
        for method, right in (("lora", 30), ("mtl_lora", 25), ("hycam", 10), ("none", 0)):
            scored_run(final, method, seed, hits(right), trainable=0 if method == "none" else 10)
    scored_run(final, "poly", 0, hits(49))  # not checked: not in the ranking
    for method, right in (("lora", 35), ("mtl_lora", 40), ("hycam", 15)):
        scored_run(check, method, 0, hits(right))
    study = _study({"overrides": ["trainer.max_steps=360"], "methods": ["lora", "mtl_lora", "hycam"]})
    files = write_check(study, [final], [check], tmp_path / "out", plots=False)
    out = tmp_path / "out" / "check"
    assert out / "ranking.md" in files and (out / "results.md").exists() and (out / "convergence.md").exists()
    ranking = pd.read_csv(out / "ranking.csv").set_index("label")
    assert sorted(ranking.index) == ["hycam", "lora", "mtl_lora"]
    assert ranking["rank_a"].to_dict() == {"lora": 1, "mtl_lora": 2, "hycam": 3}
    assert ranking["rank_b"].to_dict() == {"mtl_lora": 1, "lora": 2, "hycam": 3}
    assert ranking.loc["lora", "avg_a"] == pytest.approx(60.0) and ranking.loc["mtl_lora", "avg_b"] == 80.0
    assert np.isclose(ranking["tau"].iloc[0], 1 / 3)  # 3 pairs: 2 concordant, 1 discordant
    md = (out / "ranking.md").read_text()
    assert "# Ranking: s against check (trainer.max_steps=360)" in md and "- s: seeds 0," in md
    assert "poly" not in md and "none" not in md  # not checked / not ranked: not even left out


def test_a_check_of_fewer_than_three_methods_writes_its_tables_without_a_ranking(tmp_path: Path) -> None:
    for method in ("lora", "hycam"):
        scored_run(tmp_path / "final", method, 0, {"qa": [1, 0, 1]})
        scored_run(tmp_path / "check", method, 0, {"qa": [1, 1, 1]})
    study = _study({"overrides": ["trainer.max_steps=360"], "methods": ["lora", "hycam"]})
    files = write_check(study, [tmp_path / "final"], [tmp_path / "check"], tmp_path / "out", plots=False)
    assert (tmp_path / "out" / "check" / "results.md") in files
    assert not (tmp_path / "out" / "check" / "ranking.md").exists()


def test_a_tuned_method_whose_tuning_chose_nothing_is_left_out_of_the_check() -> None:
    study = _study({"overrides": ["trainer.max_steps=360"]})
    commands = check_commands(study, {"lora": {"optimizer.lr": 0.01}}, [], [])
    assert [directory.name.split("_", 3)[3] for _, directory in commands] == ["check-lora"]


def test_method_on_the_command_line_narrows_the_checks_methods() -> None:
    study = _study({"overrides": ["trainer.max_steps=360"], "methods": ["lora", "hycam"]})
    study.methods = ["lora", "mtl_lora"]
    assert check_methods(study) == ["lora"]


def test_check_seeds_must_be_final_seeds() -> None:
    study = _study({"overrides": ["trainer.max_steps=360"], "seeds": [0, 7]})
    with pytest.raises(SystemExit, match="check.seeds: 7 not among the final stage's seeds"):
        validate_check_seeds(study)


def test_runner_keys_are_what_the_jobs_compose_whatever_the_command_line_adds_or_deletes() -> None:
    """The jobs never see the runner's overrides: they delete (~key) what their own config has."""
    added = "++check={overrides:['trainer.max_steps=9']}"
    assert load_study("methods_mix3_tuned", [added]).runner_keys == ["tune"]
    assert load_study("methods_mix3_tuned", ["+check.overrides=['trainer.max_steps=9']"]).runner_keys == [
        "tune"
    ]
    deleted = load_study("methods_mix3_tuned", ["~tune"])
    assert deleted.tune is None and deleted.runner_keys == ["tune"]


def test_sweeping_a_runner_key_on_the_command_line_is_refused() -> None:
    with pytest.raises(SystemExit, match=r"check.seeds=0,1: the runner reads check.\* itself"):
        split_overrides(["check.seeds=0,1"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ("['trainer.max_steps=360,720']", "sweeps; the check runs one value per key"),
        ("['seed=3']", "sets seed, which check.seeds decides"),
        ("['optimizer.lr=0.1']", "sets optimizer.lr, which the tuning decides"),
        ("['trainer.max_stepz=360']", "do not compose with the study"),
        ("['trainer.max_steps=1200']", "change nothing in the jobs' config"),
    ],
)
def test_check_overrides_that_would_not_make_a_check_are_refused(overrides: str, message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        load_study("methods_mix3_tuned", [f"+check={{overrides:{overrides}}}"])


def test_a_check_whose_runs_all_failed_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "check").mkdir()
    study = _study({"overrides": ["trainer.max_steps=360"]})
    assert write_check(study, [tmp_path / "final"], [tmp_path / "check"], tmp_path / "out") == []


def test_sweep_size_counts_the_jobs_a_command_launches() -> None:
    study = _study({"overrides": ["trainer.max_steps=360"]})
    study.seeds = ["0", "1"]
    chosen = {"lora": {"optimizer.lr": 0.01}}
    (check,) = check_commands(study, chosen, [], ["launcher=joblib", "hydra.launcher.n_jobs=2"])
    (_, final) = final_commands(study, chosen, [], [])
    tuning = tuning_commands(study, [], [])[0]
    assert sweep_size(study, check[0]) == 1  # seed 0 only
    assert sweep_size(study, final[0]) == 2  # the study's seeds
    assert sweep_size(study, tuning[0]) == 3 * 2  # 3 tuned methods share a grid of 2 lrs, tuning seed 0
