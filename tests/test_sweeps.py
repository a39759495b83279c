"""Sweeps: a tiny CLI multirun (2 methods x 2 seeds), its results table, idempotent re-runs that resume an
interrupted job, failed jobs that do not stop a sweep but make it exit non-zero; a 4-job sweep killed with
SIGKILL and re-run (slow); plus the pieces (config and job hashes with data and code digests, finished-run
lookup, sweep summary, divergence check, study configs)."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from mtpeft.inputs import run_inputs
from mtpeft.methods import available_methods
from mtpeft.results import main as results_main
from mtpeft.study.config import (
    compose_study,
    load_study,
    split_overrides,
    sweep_jobs,
    sweep_values,
    sweeper_params,
)
from mtpeft.utils.callbacks import FailOnNonFiniteLoss, TrainingDiverged
from mtpeft.utils.confighash import config_hash, job_hash, package_digest
from mtpeft.utils.sweep import SweepReport, find_finished, running_record
from tests.conftest import CONF_DIR, TINY_RUN, compose_train
from tests.test_resume import kill_when

REPO = Path(__file__).resolve().parent.parent
SKIP_LINE = "skipping: identical job finished in"
#: The code part of the job hash is pinned in these subprocesses: edits of the package by others while the
#: test runs must not turn finished jobs stale (`test_job_hash_covers_data_and_code` covers the digest).
ENV = {"MTPEFT_CODE_VERSION": "test-sweeps"}


def _command(args: list[str], root: Path) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, "MTPEFT_ROOT": str(root), **ENV}
    return [sys.executable, "-m", "mtpeft.train", "-m", *args, *TINY_RUN, "logger=none"], env


def _multirun(args: list[str], root: Path) -> subprocess.CompletedProcess:
    cmd, env = _command(args, root)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _fake_kill(record_path: Path) -> dict:
    """Turn a finished job's record back into the ``running`` record of a killed process."""
    success = json.loads(record_path.read_text())
    running = running_record(success["config"], success["inputs"])
    running["pid"] = 2**22 + 1  # no such process; nobody holds the directory's lock either
    record_path.write_text(json.dumps(running))
    return success


def _results(root: Path) -> dict[Path, dict]:
    return {p: json.loads(p.read_text()) for p in sorted(root.rglob("results.json"))}


def test_multirun_results_table_rerun_and_failures(tmp_path: Path) -> None:
    # 1. a sweep of 2 methods x 2 seeds
    proc = _multirun(["method=lora,none", "seed=0,1", "checkpoint_every_n_steps=2"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 jobs: 4 ran, 0 skipped, 0 failed" in proc.stdout
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

    # 3. the same sweep again, after "killing" the lora seed-1 job (its record says running, its process is
    # gone): three jobs are skipped, the killed one resumes from its last checkpoint in the new sweep,
    # ends with the same metrics and supersedes the killed record; the new sweep's table has all four once
    (killed,) = [p for p, r in runs.items() if r["method"] == "lora" and r["seed"] == 1]
    original = _fake_kill(killed)
    stamps = {p: p.stat().st_mtime_ns for p in runs if p != killed}
    proc = _multirun(["method=lora,none", "seed=0,1", "checkpoint_every_n_steps=2"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (proc.stdout + proc.stderr).count(SKIP_LINE) == 3
    assert "4 jobs: 1 ran, 3 skipped, 0 failed" in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    superseded = json.loads(killed.read_text())
    assert (
        superseded["status"] == "running" and "resumed from its last checkpoint" in superseded["interrupted"]
    )
    (redone,) = [r for p, r in _results(tmp_path / "logs").items() if p not in runs]
    assert redone["status"] == "success" and superseded["superseded_by"] in redone["resumed_from"]
    assert redone["metrics"] == original["metrics"] and redone["job_hash"] == original["job_hash"]
    (rerun_dir,) = {p.parent.parent for p in _results(tmp_path / "logs") if p not in runs}
    rerun_table = tmp_path / "rerun_table"
    results_main([str(rerun_dir), "--out", str(rerun_table), "--no-plots"])
    again = pd.read_csv(rerun_table / "results.csv", keep_default_na=False, na_values=[""])
    assert sorted(again["method"]) == ["lora", "none"] and set(again["n"]) == {2}
    for column in ("qa_mean", "code_mean", "reasoning_mean", "avg_mean", "avg_std"):
        assert list(again.sort_values("method")[column]) == list(table.sort_values("method")[column])
    runs = {p: json.loads(p.read_text()) for p in _results(tmp_path / "logs")}

    # 4. a job that diverges (absurd learning rate) fails, is recorded, the next job still runs, and the
    # sweep exits non-zero after its last job, saying how many failed
    proc = _multirun(["method=lora", "seed=2", "optimizer.lr=1e30,3e-3"], tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "2 jobs: 1 ran, 0 skipped, 1 failed" in proc.stdout and "1 of 2 sweep jobs failed" in proc.stderr
    new = {p: r for p, r in _results(tmp_path / "logs").items() if p not in runs}
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
    # seeds 0, 1 (the resumed one counted once), 2; the failure and the superseded record not in
    assert table.loc[table["method"] == "lora", "n"].tolist() == [3]

    # 5. determinism across processes: forcing the lora seed-0 job to run again reproduces its metrics
    proc = _multirun(["method=lora", "seed=0", "skip_finished=false"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (again,) = [r for p, r in _results(tmp_path / "logs").items() if p not in runs and p not in new]
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


def test_find_finished_matches_fresh_successes_only(tmp_path: Path) -> None:
    config = {"seed": 0, "method": {"name": "lora"}, "paths": {"output_dir": "/somewhere"}}
    inputs = run_inputs(config)
    job = job_hash(config, inputs)
    for name, status in (("failed", "failed"), ("running", "running"), ("ok", "success")):
        (tmp_path / name).mkdir()
        stale = {
            "status": status,
            "config": config,
            "inputs": inputs,
            "job_hash": "stale-hash-of-an-old-version",
        }
        (tmp_path / name / "results.json").write_text(json.dumps(stale))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text("{not json")
    (tmp_path / "old").mkdir()  # written before data and code were part of the identity: never fresh
    (tmp_path / "old" / "results.json").write_text(json.dumps({"status": "success", "config": config}))
    assert find_finished(tmp_path, job) == tmp_path / "ok"  # hash recomputed from the stored config/inputs
    assert find_finished(tmp_path, job, exclude=tmp_path / "ok") is None
    assert find_finished(tmp_path / "missing", job) is None


def test_job_hash_covers_data_and_code(tmp_path: Path) -> None:
    """Editing a data file the config reads, or the code, changes the job hash: the job is not skipped."""
    data = tmp_path / "tasks.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    cfg = compose_train(["data=files", f"data.paths=[{data}]"], tmp_path / "run")
    config = OmegaConf.to_container(cfg, resolve=True)
    inputs = run_inputs(config)
    assert list(inputs["data"]) == [f"data.paths[0]: {data}"]
    finished = tmp_path / "logs" / "done"
    finished.mkdir(parents=True)
    record = {"status": "success", "config": config, "inputs": inputs, "metrics": {}}
    (finished / "results.json").write_text(json.dumps(record))
    assert find_finished(tmp_path / "logs", job_hash(config, run_inputs(config))) == finished
    data.write_text('{"instruction": "a", "output": "c"}\n')  # same size, other content
    os.utime(data, ns=(time.time_ns(), time.time_ns() + 10**9))  # a later modification time, as edits have
    edited = run_inputs(config)
    assert edited["data"] != inputs["data"] and config_hash(config) == record_hash(record)
    assert find_finished(tmp_path / "logs", job_hash(config, edited)) is None  # not skipped
    # the code part: a digest of the package files (hidden files and bytecode left out)
    package = tmp_path / "pkg"
    (package / "__pycache__").mkdir(parents=True)
    (package / "m.py").write_text("x = 1\n")
    digest = package_digest(package)
    (package / "__pycache__" / "m.pyc").write_bytes(b"junk")
    (package / ".m.py.swp").write_bytes(b"junk")
    assert package_digest(package) == digest
    (package / "m.py").write_text("x = 2\n")
    assert package_digest(package) != digest


def test_code_part_of_the_job_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    """Default: the results version (a study survives unrelated edits); a new version or a new torch re-runs
    jobs; ``MTPEFT_CODE_VERSION=digest`` keys on the package files; the digest itself is audit-only."""
    import mtpeft

    config = {"seed": 0, "method": {"name": "lora"}}
    monkeypatch.delenv("MTPEFT_CODE_VERSION", raising=False)
    inputs = run_inputs(config)
    assert inputs["code"]["sources"] == f"results-version:{mtpeft.RESULTS_VERSION}"
    audited = {**inputs, "code": {**inputs["code"], "sources_digest": "another-edit"}}
    assert job_hash(config, audited) == job_hash(config, inputs)
    monkeypatch.setattr(mtpeft, "RESULTS_VERSION", mtpeft.RESULTS_VERSION + "-next")
    assert job_hash(config, run_inputs(config)) != job_hash(config, inputs)
    upgraded = {**inputs, "code": {**inputs["code"], "packages": {"torch": "9.9"}}}
    assert job_hash(config, upgraded) != job_hash(config, inputs)
    monkeypatch.setenv("MTPEFT_CODE_VERSION", "digest")
    strict = run_inputs(config)["code"]
    assert strict["sources"] == strict["sources_digest"] != inputs["code"]["sources"]


def record_hash(record: dict) -> str:
    return config_hash(record["config"])


@pytest.mark.slow
def test_sweep_killed_mid_job_and_rerun(tmp_path: Path) -> None:
    """Fault injection: a 4-job sweep SIGKILLed in its third job (after a checkpoint), then re-run: every job
    is present once as a success, the killed one resumed and equal to an uninterrupted run, none stale."""
    marker = tmp_path / "stalled"
    args = ["method=lora", "seed=0,1,2,3", "checkpoint_every_n_steps=1"]
    stall = ["+callbacks.stall._target_=tests.test_resume.Stall", "+callbacks.stall.at_step=3",
             f"+callbacks.stall.marker={marker}", "+callbacks.stall.seed=${seed}", "+callbacks.stall.only_seed=2"]  # fmt: skip
    cmd, env = _command([*args, *stall], tmp_path)
    log = tmp_path / "killed.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    kill_when(marker, proc, log)
    first = _results(tmp_path / "logs")
    assert sorted(r["status"] for r in first.values()) == ["running", "success", "success"]
    (killed,) = [p for p, r in first.items() if r["status"] == "running"]

    proc = _multirun(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 jobs: 2 ran, 2 skipped, 0 failed" in proc.stdout
    assert json.loads(killed.read_text())["superseded_by"]
    new = {p: r for p, r in _results(tmp_path / "logs").items() if p not in first}
    assert sorted(r["seed"] for r in new.values()) == [2, 3] and {r["status"] for r in new.values()} == {
        "success"
    }
    (resumed,) = [r for r in new.values() if r["seed"] == 2]
    assert resumed["resumed_from"]
    (rerun_dir,) = {p.parent.parent for p in new}
    results_main([str(rerun_dir), "--out", str(tmp_path / "table"), "--no-plots"])
    table = pd.read_csv(tmp_path / "table" / "results.csv", keep_default_na=False, na_values=[""])
    assert table["n"].tolist() == [4]  # every job once: 2 skipped (followed), 1 resumed, 1 new
    from mtpeft.run import run

    reference_dir = tmp_path / "reference"
    overrides = [*TINY_RUN, "logger=none", "method=lora", "seed=2", "checkpoint_every_n_steps=1"]
    reference = run(compose_train(overrides, reference_dir), reference_dir)
    assert resumed["metrics"] == reference["metrics"]
    (resumed_dir,) = [p.parent for p, r in new.items() if r["seed"] == 2]
    mine = torch.load(resumed_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    theirs = torch.load(reference_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def _fake_sweep(root: Path, outcomes: dict[str, dict | None]) -> Path:
    for name, record in outcomes.items():
        (root / name / ".hydra").mkdir(parents=True)
        if record is not None:
            file = "skipped.json" if record.get("status") == "skipped" else "results.json"
            (root / name / file).write_text(json.dumps(record))
    return root


@pytest.mark.parametrize("allow_failures", [False, True])
def test_sweep_report_counts_jobs_and_exits_non_zero_on_failures(
    tmp_path: Path, allow_failures: bool, capsys: pytest.CaptureFixture
) -> None:
    sweep = _fake_sweep(
        tmp_path / "sweep",
        {
            "0": {"status": "success", "metrics": {}},
            "1": {"status": "skipped", "finished_in": "elsewhere"},
            "2": {"status": "failed", "error": "TrainingDiverged: boom"},
            "3": {"status": "running"},  # the job process died
            "4": None,  # died before writing anything
        },
    )
    config = OmegaConf.create({"allow_failures": allow_failures, "hydra": {"sweep": {"dir": str(sweep)}}})
    report = SweepReport()
    report.on_multirun_start(config)
    if allow_failures:
        report.on_multirun_end(config)
    else:
        with pytest.raises(SystemExit) as exit_:
            report.on_multirun_end(config)
        assert exit_.value.code == 1
    out, err = capsys.readouterr()
    assert f"sweep {sweep}: 5 jobs: 1 ran, 1 skipped, 3 failed" in out
    assert "failed: 2: TrainingDiverged: boom" in out
    assert ("3 of 5 sweep jobs failed" in err) is not allow_failures


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_loss_fails_the_run(value: float) -> None:
    class Trainer:
        global_step = 7

    callback = FailOnNonFiniteLoss()
    callback.on_train_batch_end(Trainer(), None, {"loss": torch.tensor(1.5)}, None, 0)
    with pytest.raises(TrainingDiverged, match="non-finite train/loss.*step 7"):
        callback.on_train_batch_end(Trainer(), None, {"loss": torch.tensor(value)}, None, 0)


@pytest.mark.parametrize("study", ["methods_mix3", "methods_mix3_tuned"])
def test_methods_study_sweeps_every_registered_method(study: str, tmp_path: Path) -> None:
    """The study lists no method: ``method: glob(*)`` launches every registered method x every seed, so a
    new method (its module + ``conf/method/<name>.yaml``) joins the study without an edit here."""
    cfg = compose_train([f"experiment={study}"], tmp_path)
    params = OmegaConf.load(CONF_DIR / "experiment" / f"{study}.yaml").hydra.sweeper.params
    assert params.method.startswith("glob(")
    jobs = sweep_jobs(sweeper_params(compose_study(study)))
    expected = [[f"method={m}", f"seed={s}"] for m in available_methods() for s in (0, 1, 2)]
    assert sorted(map(sorted, jobs)) == sorted(map(sorted, expected))
    assert cfg.task_name == study


def test_sweep_jobs_expand_like_hydras_basic_sweeper() -> None:
    """``a,b`` and ``glob`` (with ``exclude``, options of the config group only: presets in sub-folders
    such as ``method/moe_lora/`` are no options) cross like Hydra's sweeps; a later key replaces."""
    trained = [m for m in available_methods() if m != "none"]
    assert sweep_values("method", "glob(*,exclude=none)") == trained
    assert sweep_values("method", "glob(*)") == available_methods()
    assert sweep_values("method", "glob([lora,poly])") == ["lora", "poly"]
    assert sweep_values("method", "lora") == ["lora"]
    assert sweep_jobs(["method=glob(mtl*)", "seed=0,1", "seed=2"]) == [["method=mtl_lora", "seed=2"]]
    # the study runner reads its methods the same way, from the config and from the command line
    assert load_study("capacity").methods == trained
    assert split_overrides(["method=glob(*,exclude=none)"]).methods == trained


@pytest.mark.parametrize("study", ["methods_mix3", "temperature", "base_models", "hycam_ablation"])
def test_studies_are_named_tagged_multiruns(study: str) -> None:
    node = OmegaConf.load(CONF_DIR / "experiment" / f"{study}.yaml")
    assert node.task_name == study and len(node.tags) > 0
    assert node.hydra.mode == "MULTIRUN" and "seed" in node.hydra.sweeper.params


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local", "slurm"])
def test_launcher_configs_compose(launcher: str, tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher" if launcher == "joblib" else "submitit")
    compose_train([f"launcher={launcher}"], tmp_path)
