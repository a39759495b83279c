"""Sweeps: a tiny CLI multirun (2 methods x 2 seeds), its results table, idempotent re-runs, failed jobs that
do not stop a sweep; plus the pieces (config hash, finished-run lookup, divergence check, study configs)."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from mtpeft.methods import available_methods
from mtpeft.results import main as results_main
from mtpeft.utils.callbacks import FailOnNonFiniteLoss, TrainingDiverged
from mtpeft.utils.confighash import config_hash
from mtpeft.utils.sweep import find_finished
from tests.conftest import CONF_DIR, TINY_RUN, compose_train

REPO = Path(__file__).resolve().parent.parent
SKIP_LINE = "skipping: identical config finished in"


def _multirun(args: list[str], root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MTPEFT_ROOT": str(root)}
    cmd = [sys.executable, "-m", "mtpeft.train", "-m", *args, *TINY_RUN, "logger=none"]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _results(root: Path) -> dict[Path, dict]:
    return {p: json.loads(p.read_text()) for p in sorted(root.rglob("results.json"))}


def test_multirun_results_table_rerun_and_failures(tmp_path: Path) -> None:
    # 1. a sweep of 2 methods x 2 seeds
    proc = _multirun(["method=lora,none", "seed=0,1"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = _results(tmp_path / "logs")
    assert len(runs) == 4 and {r["status"] for r in runs.values()} == {"success"}
    (sweep_dir,) = {p.parent.parent for p in runs}
    assert {r["config"]["run_group"] for r in runs.values()} == {f"train-{sweep_dir.name}"}  # wandb group

    # 2. the results table of that sweep, checked against the runs' own numbers
    results_main([str(sweep_dir), "--no-plots"])
    table = pd.read_csv(sweep_dir / "results.csv", keep_default_na=False, na_values=[""])
    assert sorted(table["method"]) == ["lora", "none"] and set(table["n"]) == {2}
    for method in ("lora", "none"):
        row = table[table["method"] == method].iloc[0]
        mine = [r for r in runs.values() if r["method"] == method]
        for task in ("qa", "code", "reasoning", "avg"):
            values = [r["metrics"]["test"][f"test/{task}/score"] for r in mine]
            assert row[f"{task}_mean"] == pytest.approx(statistics.mean(values), abs=1e-12)
            assert row[f"{task}_std"] == pytest.approx(statistics.stdev(values), abs=1e-12)
        assert row["trainable_params"] == mine[0]["trainable_params"]
    md = (sweep_dir / "results.md").read_text()
    assert "| lora | 2 |" in md and "| none | 2 |" in md and "Failed runs" not in md

    # 3. the same sweep again: all four jobs are skipped, nothing is re-written
    stamps = {p: p.stat().st_mtime_ns for p in runs}
    proc = _multirun(["method=lora,none", "seed=0,1"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (proc.stdout + proc.stderr).count(SKIP_LINE) == 4
    assert {p: p.stat().st_mtime_ns for p in _results(tmp_path / "logs")} == stamps

    # 4. a job that diverges (absurd learning rate) fails, is recorded, and the next job still runs
    proc = _multirun(["method=lora", "seed=2", "optimizer.lr=1e30,3e-3"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    new = {p: r for p, r in _results(tmp_path / "logs").items() if p not in stamps}
    by_status = {r["status"]: r for r in new.values()}
    assert len(new) == 2 and set(by_status) == {"failed", "success"}
    failed = by_status["failed"]
    assert "TrainingDiverged" in failed["error"] and failed["config_hash"] == config_hash(failed["config"])
    assert by_status["success"]["seed"] == 2
    summary = tmp_path / "summary"
    results_main([str(tmp_path / "logs" / "train"), "--out", str(summary), "--no-plots"])
    failed_csv = pd.read_csv(summary / "failed.csv")
    assert len(failed_csv) == 1 and "diverged" in failed_csv["error"][0]
    table = pd.read_csv(summary / "results.csv", keep_default_na=False, na_values=[""])
    assert table.loc[table["method"] == "lora", "n"].tolist() == [3]  # seeds 0, 1, 2; the failure not in

    # 5. determinism across processes: forcing the lora seed-0 job to run again reproduces its metrics
    proc = _multirun(["method=lora", "seed=0", "skip_finished=false"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (again,) = [r for p, r in _results(tmp_path / "logs").items() if p not in stamps and p not in new]
    (first,) = [r for r in runs.values() if r["method"] == "lora" and r["seed"] == 0]
    assert again["config_hash"] == first["config_hash"]
    assert (
        again["metrics"]["test"] == first["metrics"]["test"]
        and again["metrics"]["val"] == first["metrics"]["val"]
    )
    assert again["config"]["run_group"] != first["config"]["run_group"]  # a new sweep is a new group


def test_config_hash_ignores_run_directories_and_names(tmp_path: Path) -> None:
    first = compose_train(["method=lora"], tmp_path / "a")
    second = compose_train(["method=lora", "task_name=other", "tags=[x]", "logger=csv"], tmp_path / "b")
    digest = config_hash(OmegaConf.to_container(first, resolve=True))
    assert digest == config_hash(OmegaConf.to_container(second, resolve=True))
    third = compose_train(["method=lora", "seed=1"], tmp_path / "c")
    assert digest != config_hash(OmegaConf.to_container(third, resolve=True))


def test_find_finished_matches_successes_only(tmp_path: Path) -> None:
    config = {"seed": 0, "method": {"name": "lora"}, "paths": {"output_dir": "/somewhere"}}
    digest = config_hash(config)
    for name, status in (("failed", "failed"), ("ok", "success")):
        (tmp_path / name).mkdir()
        stale = {"status": status, "config": config, "config_hash": "stale-hash-from-an-old-version"}
        (tmp_path / name / "results.json").write_text(json.dumps(stale))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text("{not json")
    assert find_finished(tmp_path, digest) == tmp_path / "ok"  # hash recomputed from the stored config
    assert find_finished(tmp_path, digest, exclude=tmp_path / "ok") is None
    assert find_finished(tmp_path / "missing", digest) is None


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_loss_fails_the_run(value: float) -> None:
    class Trainer:
        global_step = 7

    callback = FailOnNonFiniteLoss()
    callback.on_train_batch_end(Trainer(), None, {"loss": torch.tensor(1.5)}, None, 0)
    with pytest.raises(TrainingDiverged, match="non-finite train/loss.*step 7"):
        callback.on_train_batch_end(Trainer(), None, {"loss": torch.tensor(value)}, None, 0)


def test_methods_study_covers_every_registered_method(tmp_path: Path) -> None:
    cfg = compose_train(["experiment=methods_mix3"], tmp_path)
    study = OmegaConf.load(CONF_DIR / "experiment" / "methods_mix3.yaml")
    assert sorted(study.hydra.sweeper.params.method.split(",")) == sorted(available_methods())
    assert cfg.task_name == "methods_mix3"


@pytest.mark.parametrize("study", ["methods_mix3", "temperature", "base_models", "hycam_ablation"])
def test_studies_are_named_tagged_multiruns(study: str) -> None:
    node = OmegaConf.load(CONF_DIR / "experiment" / f"{study}.yaml")
    assert node.task_name == study and len(node.tags) > 0
    assert node.hydra.mode == "MULTIRUN" and "seed" in node.hydra.sweeper.params


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local", "slurm"])
def test_launcher_configs_compose(launcher: str, tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher" if launcher == "joblib" else "submitit")
    compose_train([f"launcher={launcher}"], tmp_path)
