"""`mtpeft.results` on hand-written results.json files (no training): grouping, mean ± std, failures, files."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pandas as pd
import pytest

from mtpeft.results import aggregate, load_runs, main, pareto_front
from mtpeft.utils.confighash import config_hash

TASKS = ["qa", "code"]


def _config(method: str, seed: int, **method_options) -> dict:
    return {
        "task_name": "study",
        "seed": seed,
        "method": {"name": method, **method_options},
        "model": {"kind": "tiny", "arch": "llama", "cache_dir": "/tmp/x"},
        "data": {"tasks": {t: {"train": 10} for t in TASKS}, "temperature": 1.0, "seed": seed},
        "trainer": {"max_steps": 10, "default_root_dir": f"/runs/{method}/{seed}"},
        "paths": {"output_dir": f"/runs/{method}/{seed}"},
    }


def _write(
    root: Path,
    name: str,
    method: str,
    seed: int,
    scores: dict | None = None,
    status: str = "success",
    params: int = 100,
    **method_options,
) -> dict:
    config = _config(method, seed, **method_options)
    data = {
        "status": status,
        "method": method,
        "seed": seed,
        "tasks": TASKS,
        "config": config,
        "config_hash": config_hash(config),
    }
    if status == "success":
        scores = scores or {}
        test = {f"test/{t}/score": v for t, v in scores.items()}
        test["test/avg/score"] = sum(scores.values()) / len(scores)
        data.update(
            metrics={"val": {"val/avg/score": 0.5}, "test": test},
            trainable_params=params,
            total_params=10_000,
            trainable_percent=params / 100,
            wall_time_s=10.0 + seed,
            peak_memory_mb={"cpu_peak_rss_mb": 500.0},
        )
    else:
        data["error"] = "ValueError: method.r must be a positive integer, got 0"
    (root / name).mkdir(parents=True)
    (root / name / "results.json").write_text(json.dumps(data))
    return data


@pytest.fixture
def study(tmp_path: Path) -> Path:
    _write(tmp_path, "0", "lora", 0, {"qa": 0.5, "code": 0.25}, r=8)
    _write(tmp_path, "1", "lora", 1, {"qa": 0.7, "code": 0.35}, r=8)
    _write(tmp_path, "2", "lora", 2, {"qa": 0.6, "code": 0.30}, r=8)
    _write(tmp_path, "3", "none", 0, {"qa": 0.1, "code": 0.0}, params=0)
    _write(tmp_path, "4", "hycam", 0, {"qa": 0.8, "code": 0.2}, params=50, apply_to="residual_sum")
    _write(tmp_path, "5", "hycam", 0, {"qa": 0.9, "code": 0.1}, params=50, apply_to="attn_output")
    _write(tmp_path, "6", "mtl_lora", 0, status="failed")
    return tmp_path


def _row(table: pd.DataFrame, method: str, variant: str = "") -> pd.Series:
    rows = table[(table["method"] == method) & (table["variant"] == variant)]
    assert len(rows) == 1, table[["method", "variant"]]
    return rows.iloc[0]


def test_mean_std_and_seed_count(study: Path) -> None:
    table, failed, columns = aggregate(load_runs([study]))
    assert columns == ["qa", "code", "avg"]
    lora = _row(table, "lora")
    assert lora["n"] == 3 and lora["seeds"] == "0 1 2"
    assert lora["qa_mean"] == pytest.approx(statistics.mean([0.5, 0.7, 0.6]))
    assert lora["qa_std"] == pytest.approx(statistics.stdev([0.5, 0.7, 0.6]))
    assert lora["avg_mean"] == pytest.approx(statistics.mean([0.375, 0.525, 0.45]))
    assert lora["wall_time_s"] == pytest.approx(11.0) and lora["peak_memory_mb"] == 500.0
    assert pd.isna(_row(table, "none")["qa_std"])  # one seed: no std


def test_a_resumed_run_has_no_wall_time_but_counts_otherwise(study: Path) -> None:
    """Its record times only the resumed process: it must neither pull the mean down nor look fastest."""
    record = json.loads((study / "0" / "results.json").read_text())
    (study / "0" / "results.json").write_text(json.dumps({**record, "resumed_from": "x/last.ckpt"}))
    runs = load_runs([study])
    assert [r["wall_time_s"] for r in runs if r["path"].endswith("/0")] == [None]
    lora = _row(aggregate(runs)[0], "lora")
    assert lora["n"] == 3 and lora["wall_time_s"] == pytest.approx(11.5)  # seeds 1 and 2: (11 + 12) / 2


def test_variants_only_where_configs_of_one_method_differ(study: Path) -> None:
    table, _, _ = aggregate(load_runs([study]))
    assert set(zip(table["method"], table["variant"], strict=True)) == {
        ("lora", ""),
        ("none", ""),
        ("hycam", "apply_to=residual_sum"),
        ("hycam", "apply_to=attn_output"),
    }


def test_runs_on_two_bases_are_two_rows(tmp_path: Path) -> None:
    """Same config, other base weights (recorded in ``inputs.base``; or not recorded): never one mean."""
    for seed, weights in enumerate(["aaaa", "aaaa", "bbbb", None]):
        data = _write(tmp_path, str(seed), "lora", seed, {"qa": 0.5, "code": 0.25})
        if weights is not None:
            data["inputs"] = {"base": {"weight_files": weights, "dtype": "float32"}}
            (tmp_path / str(seed) / "results.json").write_text(json.dumps(data))
    table, _, _ = aggregate(load_runs([tmp_path]))
    assert _row(table, "lora", "base.dtype=float32, base.weight_files=aaaa")["n"] == 2
    assert _row(table, "lora", "base.dtype=float32, base.weight_files=bbbb")["n"] == 1
    assert (
        _row(table, "lora", "base.dtype=—, base.weight_files=—")["n"] == 1
    )  # published before it was recorded


def test_validation_tables_say_so_and_gguf_models_are_named(tmp_path: Path) -> None:
    from mtpeft.results.load import model_label

    _write(tmp_path, "0", "lora", 0, {"qa": 0.5, "code": 0.25})
    main([str(tmp_path), "--split", "val", "--no-plots", "--out", str(tmp_path / "out")])
    assert "Validation score (%)" in (tmp_path / "out" / "results.md").read_text()
    gguf = {"kind": "hub", "name_or_path": None, "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
    assert model_label(gguf) == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert model_label({"kind": "hub", "name_or_path": "org/model"}) == "model"


def test_one_base_adds_no_variant(study: Path) -> None:
    for name in ("0", "1", "2"):
        data = json.loads((study / name / "results.json").read_text())
        data["inputs"] = {"base": {"weight_files": "aaaa", "dtype": "float32"}}
        (study / name / "results.json").write_text(json.dumps(data))
    table, _, _ = aggregate(load_runs([study]))
    assert _row(table, "lora")["n"] == 3


def test_failed_runs_listed_apart_and_dropped_once_redone(study: Path) -> None:
    table, failed, _ = aggregate(load_runs([study]))
    assert list(failed["method"]) == ["mtl_lora"] and "mtl_lora" not in set(table["method"])
    _write(study, "7", "lora", 3, status="failed", r=8)
    _write(study, "8", "lora", 0, status="failed", r=8)  # same config as run 0, which succeeded
    table, failed, _ = aggregate(load_runs([study]))
    assert sorted(zip(failed["method"], failed["seed"], strict=True)) == [("lora", 3), ("mtl_lora", 0)]
    assert _row(table, "lora")["n"] == 3  # failures never averaged in


def test_same_seed_twice_counts_once(study: Path) -> None:
    _write(study, "9", "lora", 0, {"qa": 0.5, "code": 0.25}, r=8)  # e.g. a copy under experiments/
    table, _, _ = aggregate(load_runs([study]))
    assert _row(table, "lora")["n"] == 3


def test_pareto_front() -> None:
    points = [(10, 0.5), (20, 0.4), (30, 0.7), (5, 0.2), (30, 0.6)]
    assert pareto_front(points) == [3, 0, 2]


def test_writes_tables_and_plots_with_best_marked(study: Path) -> None:
    out = main([str(study)])
    assert out == study
    md = (study / "results.md").read_text()
    assert "| hycam (apply_to=attn_output) | 1 | **90.0** | 10.0 | **50.0** |" in md  # best qa, tied best avg
    assert "| lora | 3 | 60.0 ± 10.0 | **30.0 ± 5.0** | 45.0 ± 7.5 | 100 (1.00%) |" in md
    assert "Failed runs (1" in md and "method.r must be a positive integer" in md
    assert "model: tiny_llama" in md and "mixture: code+qa" in md
    csv = pd.read_csv(study / "results.csv")
    assert {"qa_mean", "qa_std", "qa_n", "avg_mean", "trainable_params", "peak_memory_mb"} <= set(csv.columns)
    tex = (study / "results.tex").read_text()
    assert r"\textbf{" in tex and r"$\pm$" in tex and r"\begin{tabular}" in tex
    for name in ("per_task", "pareto"):
        for ext in ("png", "pdf"):
            assert (study / "plots" / f"{name}.{ext}").stat().st_size > 0


def test_study_name_reads_logs_and_writes_experiments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(tmp_path / "logs" / "mystudy" / "multiruns" / "a", "0", "lora", 0, {"qa": 0.5, "code": 0.5})
    monkeypatch.setenv("MTPEFT_ROOT", str(tmp_path))
    out = main(["mystudy", "--no-plots"])
    assert out == tmp_path / "experiments" / "mystudy"
    assert (out / "results.md").exists() and not (out / "plots").exists()
    with pytest.raises(SystemExit, match="no results"):
        main(["nostudy"])


def test_validation_curves_average_seeds_and_are_plotted(tmp_path: Path) -> None:
    from mtpeft.results import assign_variants, validation_curves

    for seed, scores in ((0, (0.2, 0.4)), (1, (0.4, 0.8))):
        _write(tmp_path, f"lora{seed}", "lora", seed, {"qa": 0.5, "code": 0.5})
        (tmp_path / f"lora{seed}" / "csv").mkdir()
        pd.DataFrame(
            {
                "step": [10, 20],
                "val/qa/score": list(scores),
                "val/code/score": [0.1, 0.1],
                "val/avg/score": [0, 0],
            }
        ).to_csv(tmp_path / f"lora{seed}" / "csv" / "metrics.csv", index=False)
    records = load_runs([tmp_path])
    assign_variants(records)
    curves = validation_curves(records)
    qa = curves[curves["task"] == "qa"].groupby("step")["score"].mean()
    assert qa.to_dict() == pytest.approx({10: 0.3, 20: 0.6})
    main([str(tmp_path)])
    assert (tmp_path / "plots" / "val_curves.png").exists()


def _temperature_runs(root: Path) -> None:
    for temperature, qa in ((1.0, 0.2), (5.0, 0.6)):
        name = f"lora_t{temperature}"
        _write(root, name, "lora", 0, {"qa": qa, "code": 0.5})
        path = root / name / "results.json"
        data = json.loads(path.read_text())
        data["config"]["data"]["temperature"] = temperature
        path.write_text(json.dumps(data))


def test_temperature_plot_only_where_declared(tmp_path: Path) -> None:
    from mtpeft.results import temperature_scores

    _temperature_runs(tmp_path)
    scores = temperature_scores(load_runs([tmp_path]))
    qa = scores[scores["task"] == "qa"].set_index("temperature")["score"].to_dict()
    assert qa == pytest.approx({1.0: 0.2, 5.0: 0.6})
    main([str(tmp_path)])  # a directory declares nothing: the generic plots only
    assert (tmp_path / "plots" / "per_task.png").exists()
    assert not (tmp_path / "plots" / "temperature.png").exists()
    main([str(tmp_path), "--plot", "temperature"])
    assert (tmp_path / "plots" / "temperature.png").exists()


def test_study_plots_come_from_the_experiment_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mtpeft.results import CONF_DIR, declared_plots, summarise

    assert declared_plots("temperature", CONF_DIR) == ["temperature"]  # conf/experiment/temperature.yaml
    assert declared_plots("methods_mix3", CONF_DIR) == [] and declared_plots("no_such", CONF_DIR) == []
    _temperature_runs(tmp_path / "logs" / "temperature" / "multiruns" / "a")
    monkeypatch.setenv("MTPEFT_ROOT", str(tmp_path))
    out = main(["temperature"])
    assert (out / "plots" / "temperature.png").exists()
    conf = tmp_path / "conf"
    (conf / "experiment").mkdir(parents=True)
    (conf / "experiment" / "s.yaml").write_text("report:\n  plots: [temprature]\n")
    with pytest.raises(ValueError, match=r"unknown plot 'temprature'; study plots: temperature"):
        declared_plots("s", conf)
    with pytest.raises(ValueError, match="unknown plot 'x'"):
        summarise([tmp_path / "logs"], tmp_path / "out", "t", extra_plots=["x"])


def test_no_temperature_plot_when_temperature_is_fixed(tmp_path: Path) -> None:
    from mtpeft.results import temperature_scores

    _write(tmp_path, "a", "lora", 0, {"qa": 0.2, "code": 0.5})
    _write(tmp_path, "b", "lora", 1, {"qa": 0.4, "code": 0.5})
    assert temperature_scores(load_runs([tmp_path])).empty


def test_sweep_dir_follows_skipped_jobs_to_the_runs_they_stand_for(tmp_path: Path) -> None:
    first = tmp_path / "logs" / "s" / "multiruns" / "first"
    _write(first, "0", "lora", 0, {"qa": 0.5, "code": 0.5})
    _write(first, "1", "lora", 1, {"qa": 0.7, "code": 0.5})
    rerun = tmp_path / "logs" / "s" / "multiruns" / "rerun"
    _write(rerun, "1", "lora", 2, {"qa": 0.9, "code": 0.5})  # the one job that ran this time
    for job, target in (("0", first / "0"), ("2", Path("logs/s/multiruns/first/1"))):  # absolute, relative
        (rerun / job).mkdir(parents=True)
        (rerun / job / "skipped.json").write_text(
            json.dumps({"status": "skipped", "finished_in": str(target)})
        )
    table, _, _ = aggregate(load_runs([rerun]))
    assert _row(table, "lora")["n"] == 3 and _row(table, "lora")["seeds"] == "0 1 2"
    (rerun / "3").mkdir()
    (rerun / "3" / "skipped.json").write_text(json.dumps({"status": "skipped", "finished_in": "/gone"}))
    problems: list = []
    assert len(load_runs([rerun], problems=problems)) == 3
    assert problems and "holds no results.json" in problems[0][1]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ('{"status": "success"}', "config: Field required"),
        ("[1, 2]", "JSON list"),
        ('{"status": "done", "config": {}}', "status: Input should be 'running', 'success' or 'failed'"),
        ('{"status": "success", "config": {}}', "no 'metrics'"),
        ('{"status": "running", "config": {}, "sead": 1}', "sead: Extra inputs are not permitted"),
        ("{not json", "unreadable"),
    ],
)
def test_files_that_are_not_run_records_are_reported_not_rows(study: Path, content: str, reason: str) -> None:
    (study / "bad").mkdir()
    (study / "bad" / "results.json").write_text(content)
    problems: list = []
    records = load_runs([study], problems=problems)
    assert len(records) == 7 and len(problems) == 1 and reason in problems[0][1]
    main([str(study), "--no-plots"])
    md = (study / "results.md").read_text()
    assert "Files skipped (1: not run records)" in md and str(study / "bad" / "results.json") in md
    assert pd.read_csv(study / "results.csv")["n"].sum() == 6  # the real runs only


def test_running_runs_are_listed_as_incomplete(study: Path) -> None:
    for name, seed in (("r1", 5), ("r2", 0)):  # r2: same config as lora seed 0, which succeeded
        config = _config("lora", seed, r=8)
        running = {"status": "running", "config": config, "config_hash": config_hash(config), "seed": seed}
        (study / name).mkdir()
        (study / name / "results.json").write_text(json.dumps(running))
    from mtpeft.results import incomplete_runs

    records = load_runs([study])
    table, failed, _ = aggregate(records)
    assert _row(table, "lora")["n"] == 3 and list(failed["method"]) == ["mtl_lora"]
    assert incomplete_runs(records)[["method", "seed"]].values.tolist() == [["lora", 5]]
    main([str(study), "--no-plots"])
    assert "## Incomplete runs (1" in (study / "results.md").read_text()
    assert pd.read_csv(study / "incomplete.csv")["seed"].tolist() == [5]


def test_tuned_values_get_a_starred_column_and_validation_only_runs_are_left_out(tmp_path: Path) -> None:
    for seed in (0, 1):
        _write(tmp_path, f"lora{seed}", "lora", seed, {"qa": 0.5, "code": 0.5})
        path = tmp_path / f"lora{seed}" / "results.json"
        data = json.loads(path.read_text())
        data["config"]["tuned"] = {"optimizer.lr": 0.003}
        path.write_text(json.dumps(data))
    _write(tmp_path, "tuning", "lora", 0, {"qa": 0.1, "code": 0.1})
    path = tmp_path / "tuning" / "results.json"
    data = json.loads(path.read_text())
    data["config"]["test"] = False
    path.write_text(json.dumps(data))
    table, _, _ = aggregate(load_runs([tmp_path]))
    assert len(table) == 1 and table.loc[0, "n"] == 2 and table.loc[0, "tuned.optimizer.lr"] == 0.003
    main([str(tmp_path), "--no-plots"])
    md = (tmp_path / "results.md").read_text()
    assert "| method | lr* | n |" in md and "| lora | 0.003 | 2 |" in md


def test_latex_escapes_special_characters_in_method_and_task_names(tmp_path: Path) -> None:
    from mtpeft.results import to_latex

    data = _write(tmp_path, "0", "lora", 0, {"qa": 0.5, "code": 0.25})
    data["method"] = "my_lora~v^2 50% & more"
    data["tasks"] = ["q_a", "c~d^e"]
    data["metrics"]["test"] = {"test/q_a/score": 0.5, "test/c~d^e/score": 0.25, "test/avg/score": 0.375}
    (tmp_path / "0" / "results.json").write_text(json.dumps(data))
    table, _, columns = aggregate(load_runs([tmp_path]))
    tex = to_latex(table, columns, "odd names")
    row = next(line for line in tex.splitlines() if line.startswith("my"))
    assert row.startswith(r"my\_lora\textasciitilde v\textasciicircum 2 50\% \& more & 1 & \textbf{50.0} & ")
    assert r"method & n & q\_a & c\textasciitilde d\textasciicircum e & avg & " in tex  # the header
    assert r"mixture: c\textasciitilde d\textasciicircum e+q\_a}" in tex  # the caption
    assert r"\textbf{100 (1.00\%)}" in row


def test_convergence_reports_the_last_gain_and_runs_best_at_the_budget(tmp_path: Path) -> None:
    """``convergence.md``: val avg after each validation (the CSV logs the one after step n at n - 1), the
    last interval's change, and how many runs' best checkpoint is the last step (still climbing)."""
    for seed, (early, late, best) in enumerate(((0.2, 0.5, 10), (0.4, 0.3, 5), (0.3, 0.7, 10))):
        data = _write(tmp_path, f"lora{seed}", "lora", seed, {"qa": 0.5, "code": 0.5})
        data["best_checkpoint"] = f"/runs/lora/{seed}/checkpoints/step_{best}.ckpt"
        (tmp_path / f"lora{seed}" / "results.json").write_text(json.dumps(data))
        (tmp_path / f"lora{seed}" / "csv").mkdir()
        pd.DataFrame({"step": [4, 9], "val/avg/score": [early, late]}).to_csv(
            tmp_path / f"lora{seed}" / "csv" / "metrics.csv", index=False
        )
    _write(tmp_path, "none", "none", 0, {"qa": 0.0, "code": 0.0})  # no training: no best checkpoint, no CSV
    main([str(tmp_path), "--no-plots"])
    md = (tmp_path / "convergence.md").read_text()
    assert "| method | n | val@5 | val@10 | last-interval change | best at end of budget |" in md
    assert "| lora | 3 | 30.0 | 50.0 | +20.0 | 2/3 |" in md  # changes +30, -10, +40: mean +20
    assert "| none | 1 | — | — | — | — |" in md
    assert "2 of 3 runs had their best validation at the end of their budget." in md
    table = pd.read_csv(tmp_path / "convergence.csv")
    assert table.set_index("label").loc["lora", "best_at_end"] == 2


def test_best_at_end_means_the_last_validation_and_no_runs_give_a_readable_csv(tmp_path: Path) -> None:
    """A budget the validation interval does not divide (10 steps, validation every 4): the last validation
    is at step 8, and a best checkpoint there is at the end."""
    from mtpeft.results.convergence import convergence_table, write_convergence

    data = _write(tmp_path, "lora0", "lora", 0, {"qa": 0.5, "code": 0.5})
    data["best_checkpoint"] = "/runs/lora/0/checkpoints/step_8.ckpt"
    (tmp_path / "lora0" / "results.json").write_text(json.dumps(data))
    (tmp_path / "lora0" / "csv").mkdir()
    pd.DataFrame({"step": [3, 7], "val/avg/score": [0.2, 0.4]}).to_csv(
        tmp_path / "lora0" / "csv" / "metrics.csv", index=False
    )
    table = convergence_table(load_runs([tmp_path]))
    assert table.set_index("label").loc["lora", ["best_at_end", "with_best"]].tolist() == [1, 1]
    write_convergence([], tmp_path, "empty", "test")
    assert list(pd.read_csv(tmp_path / "convergence.csv").columns) == [
        "label",
        "n",
        "best_at_end",
        "with_best",
    ]
