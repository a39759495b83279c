"""Published study runs: `mtpeft.study.publish` copies finished runs (small files only, stable names, once)
into ``experiments/<task_name>/runs/``, the study runner publishes after each sweep, and a sweep job whose
published record has its job hash is skipped (in a fresh checkout, where ``logs/`` is empty)."""

from __future__ import annotations

import fcntl
import gzip
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import mtpeft.study.publish as publish_module
import mtpeft.study.runner as runner_module
from mtpeft.inputs import run_inputs
from mtpeft.results import load_runs
from mtpeft.study.cli import main
from mtpeft.study.commands import final_commands, launcher_overrides, sweep_size, with_sizes
from mtpeft.study.config import study_from_command
from mtpeft.study.publish import publish, published_name
from mtpeft.study.unfinished import job_configs, jobs_to_run
from mtpeft.utils.confighash import config_hash, job_hash
from mtpeft.utils.sweep import find_finished, finished_roots
from tests.conftest import TINY_RUN, compose_train

REPO = Path(__file__).resolve().parent.parent
#: The code part of the job hash is pinned here and in the subprocess (others may edit the package meanwhile).
CODE_VERSION = {"MTPEFT_CODE_VERSION": "test-publish"}
SMALL_FILES = {
    "results.json",
    "metrics.csv",
    "scores.jsonl.gz",
    ".hydra/config.yaml",
    ".hydra/overrides.yaml",
}


def _config(method: str = "lora", seed: int = 0, lr: float = 0.01) -> dict:
    return {
        "seed": seed,
        "method": {"name": method},
        "optimizer": {"lr": lr},
        "data": {"tasks": {"qa": {}}},
        "test": True,
        "paths": {"output_dir": "/elsewhere"},
    }


def _fake_run(run_dir: Path, config: dict, overrides: list[str], status: str = "success") -> str:
    """A finished job's directory as `mtpeft.train` leaves it (big files included); returns its job hash."""
    inputs = run_inputs(config)
    record = {
        "status": status,
        "method": config["method"]["name"],
        "seed": config["seed"],
        "config": config,
        "inputs": inputs,
        "job_hash": job_hash(config, inputs),
        "metrics": {"val": {"val/avg/score": 0.25}, "test": {"test/qa/score": 0.5, "test/avg/score": 0.5}},
    }
    files = {
        "results.json": json.dumps(record),
        "csv/metrics.csv": "step,train/loss\n1,2.0\n",
        ".hydra/config.yaml": "seed: 0\n",
        ".hydra/overrides.yaml": "".join(f"- {o}\n" for o in overrides),
        ".hydra/hydra.yaml": "hydra: {}\n",
        "checkpoints/last.ckpt": "weights",
        "adapter/adapter_model.safetensors": "weights",
        "wandb/offline-run-1/run.wandb": "log",
    }
    for name, text in files.items():
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text(text)
    with gzip.open(run_dir / "scores.jsonl.gz", "wt") as handle:
        handle.write('{"split": "test", "task": "qa", "index": 0, "em": 1.0}\n')
    return record["job_hash"]


def _listing(directory: Path) -> set[str]:
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}


def test_publish_copies_small_files_once_under_stable_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MTPEFT_CODE_VERSION", CODE_VERSION["MTPEFT_CODE_VERSION"])
    logs, published = tmp_path / "logs" / "study", tmp_path / "experiments" / "study" / "runs"
    sweep = logs / "multiruns" / "2026-01-02_03-04-05_ab12cd_tune0"
    overrides = ["method=lora", "seed=0", "test=false", "optimizer.lr=0.01", "launcher=joblib", "~tune"]
    job = _fake_run(sweep / "0", _config(), overrides)
    _fake_run(sweep / "1", _config(lr=0.1), [*overrides[:3], "optimizer.lr=0.1"], status="failed")
    _fake_run(sweep / "2", _config(seed=1), ["method=lora", "seed=1"], status="running")
    twin = logs / "multiruns" / "2026-01-03_00-00-00_ef34ab_tune0" / "0"  # the same job run again
    _fake_run(twin, _config(), overrides)
    (published / ".tune_lora_s0_x.tmp").mkdir(parents=True)  # left by a killed publish

    new, before = publish(logs, published)
    name = f"tune_lora_lr=0.01_s0_{job[:8]}"
    assert [p.name for p in new] == [name] and before == 1  # the twin counts as published
    assert sorted(p.name for p in published.iterdir()) == [name]  # no failed, running or leftover dirs
    assert _listing(published / name) == SMALL_FILES  # no checkpoint, adapter, wandb or hydra.yaml
    assert (published / name / "results.json").read_bytes() == (sweep / "0" / "results.json").read_bytes()
    assert (published / name / "metrics.csv").read_text() == "step,train/loss\n1,2.0\n"

    assert publish(logs, published) == ([], 2)  # idempotent
    assert sorted(p.name for p in published.iterdir()) == [name]
    # a fresh checkout: logs/ is empty, the published run is the finished job
    assert find_finished([tmp_path / "missing", published], job) == published / name
    assert find_finished(published, job_hash(_config(seed=1), run_inputs(_config(seed=1)))) is None


def test_a_clash_or_no_published_dir_is_reported_not_raised_past_the_runner(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A published name taken by another run is a `PublishError`: the runner's publisher logs it and the study
    goes on (it cannot replace the exception that stopped a study either); ``--publish`` says so and exits 1. With ``paths.published_dir=null`` nothing is published: the study loads, and
    ``--publish`` says why it does nothing."""
    monkeypatch.setenv("MTPEFT_CODE_VERSION", CODE_VERSION["MTPEFT_CODE_VERSION"])
    logs, published = tmp_path / "logs" / "smollm2_mix", tmp_path / "experiments" / "smollm2_mix" / "runs"
    job = _fake_run(logs / "multiruns" / "2026-01-02_03-04-05_ab12cd_tune0" / "0", _config(), ["method=lora"])
    (published / f"tune_lora_s0_{job[:8]}").mkdir(parents=True)  # hand-made: holds no run
    with pytest.raises(publish_module.PublishError, match="holds another run"):
        publish(logs, published)
    paths = [f"paths.log_dir={tmp_path / 'logs'}", f"paths.published_dir={tmp_path / 'experiments'}"]
    assert main(["smollm2_mix", "--publish", *paths]) == 1
    assert "holds another run" in capsys.readouterr().err
    publisher = publish_module.Publisher(study_from_command("smollm2_mix", paths)[0])
    with caplog.at_level(logging.ERROR, logger=publish_module.__name__):
        publisher()  # after a sweep: logged, the study goes on
    assert "holds another run" in caplog.text and publisher.published == []

    study, _ = study_from_command("smollm2_mix", ["paths.published_dir=null"])
    assert study.published_dir is None and not publish_module.Publisher(study).enabled
    assert main(["smollm2_mix", "--publish", "paths.published_dir=null"]) == 2
    assert "paths.published_dir is empty" in capsys.readouterr().out


def test_one_publisher_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A publish waits while another process (here: another open of the directory) publishes into the same
    ``runs/``, instead of deleting its staging directory; then it publishes."""
    monkeypatch.setenv("MTPEFT_CODE_VERSION", CODE_VERSION["MTPEFT_CODE_VERSION"])
    logs, published = tmp_path / "logs" / "study", tmp_path / "experiments" / "study" / "runs"
    _fake_run(logs / "multiruns" / "2026-01-02_03-04-05_ab12cd_tune0" / "0", _config(), ["method=lora"])
    published.mkdir(parents=True)
    staging = published / ".tune_lora_s0_other.tmp"  # the other publisher's copy in progress
    staging.mkdir()
    other = os.open(published, os.O_RDONLY)
    fcntl.flock(other, fcntl.LOCK_EX)
    done: list[tuple[list[Path], int]] = []
    thread = threading.Thread(target=lambda: done.append(publish(logs, published)))
    thread.start()
    thread.join(0.5)
    assert thread.is_alive() and not done and staging.is_dir()  # waiting: the other copy is left alone
    os.close(other)
    thread.join(30)
    assert [len(new) for new, _ in done] == [1] and not staging.exists()


def test_names_are_deterministic_and_without_bookkeeping(tmp_path: Path) -> None:
    config = _config(method="hycam", seed=2)
    run = tmp_path / "logs" / "multiruns" / "2026-01-02_03-04-05_ab12cd" / "7"  # a plain sweep: no stage
    (run / ".hydra").mkdir(parents=True)
    overrides = ["method=hycam", "seed=2", "method.routing=softmax", "cpu_threads=1", "++tuned={a:1}"]
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    record = {"config": config, "method": "hycam", "seed": 2}
    name = published_name(run, tmp_path / "logs", record, "0123456789abcdef")
    assert name == "hycam_routing=softmax_s2_01234567"
    assert published_name(run, tmp_path / "logs", record, "0123456789abcdef") == name
    final = tmp_path / "logs" / "multiruns" / "2026-01-02_03-04-05_ab12cd_final-hycam" / "0"
    (final / ".hydra").mkdir(parents=True)
    long = [f"data.tasks.t{i}.path='/some/dir/file {i}.jsonl'" for i in range(9)]
    (final / ".hydra" / "overrides.yaml").write_text("".join(f"- {json.dumps(o)}\n" for o in long))
    name = published_name(final, tmp_path / "logs", record, "0123456789abcdef")
    assert name.startswith("final_hycam_path=") and name.endswith("_s2_01234567") and len(name) < 100
    assert " " not in name and "/" not in name and "'" not in name


def test_study_runner_publishes_after_each_sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`run_study` (its sweeps faked) publishes the finished job; ``--publish`` alone publishes once."""
    monkeypatch.setenv("MTPEFT_ROOT", str(tmp_path))
    monkeypatch.setenv("MTPEFT_CODE_VERSION", CODE_VERSION["MTPEFT_CODE_VERSION"])
    published = tmp_path / "experiments" / "methods_mix3" / "runs"
    sweeps = []

    def fake_sweep(command: list[str], directory: Path) -> int:
        assert not published.exists() or not any(published.iterdir())  # nothing before the sweep ran
        sweeps.append(directory)
        _fake_run(directory / "0", _config(), ["method=lora", "seed=0"])
        return 0

    monkeypatch.setattr(runner_module, "run_sweep", fake_sweep)
    monkeypatch.setattr(runner_module, "summarise", lambda *args, **kwargs: {"files": []})
    result = runner_module.run_study("methods_mix3", ["method=lora", "seed=0"], launcher="basic")
    (sweep,) = sweeps
    assert (
        sweep.name.endswith("_final")
        and sweep.parent == (tmp_path / "logs" / "methods_mix3" / "multiruns").resolve()
    )
    (run,) = result["published"]
    assert run.parent == published.resolve() and run.name.startswith("final_lora_s0_")
    assert _listing(run) == SMALL_FILES

    assert main(["methods_mix3", "--publish"]) == 0  # already there: nothing copied
    assert [p.name for p in published.iterdir()] == [run.name]
    shutil.rmtree(run)
    assert main(["methods_mix3", "--publish"]) == 0
    assert [p.name for p in published.iterdir()] == [run.name]


def test_runs_are_published_while_a_sweep_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real model's tuning sweep takes hours: a run that finished is published before the sweep ends."""
    monkeypatch.setenv("MTPEFT_ROOT", str(tmp_path))
    monkeypatch.setenv("MTPEFT_CODE_VERSION", CODE_VERSION["MTPEFT_CODE_VERSION"])
    monkeypatch.setattr(publish_module, "PUBLISH_EVERY_S", 0.05)
    published = tmp_path / "experiments" / "methods_mix3" / "runs"

    def slow_sweep(command: list[str], directory: Path) -> int:
        _fake_run(directory / "0", _config(), ["method=lora", "seed=0"])
        deadline = time.monotonic() + 60
        while not (published.is_dir() and any(published.iterdir())):  # the sweep is still running
            assert time.monotonic() < deadline, "the finished run was not published while the sweep ran"
            time.sleep(0.02)
        return 0

    monkeypatch.setattr(runner_module, "run_sweep", slow_sweep)
    monkeypatch.setattr(runner_module, "summarise", lambda *args, **kwargs: {"files": []})
    result = runner_module.run_study("methods_mix3", ["method=lora", "seed=0"], launcher="basic")
    (run,) = result["published"]  # once, though published during and after the sweep
    assert [p.name for p in published.iterdir()] == [run.name]


def test_published_dir_is_a_path_outside_the_config_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MTPEFT_ROOT", str(tmp_path))
    cfg = compose_train(["task_name=mine"], tmp_path / "run")
    assert finished_roots(cfg) == [
        tmp_path / "run" / "logs" / "mine",
        tmp_path / "experiments" / "mine" / "runs",
    ]
    moved = compose_train(["task_name=mine", "paths.published_dir=/elsewhere"], tmp_path / "run")
    digest = config_hash(OmegaConf.to_container(cfg, resolve=True))
    assert digest == config_hash(OmegaConf.to_container(moved, resolve=True))


def test_sweep_job_with_a_published_record_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh checkout (no logs/) whose experiments/<task_name>/runs/ holds the job: the CLI sweep skips it,
    its skipped.json points to the published run and the results tables read that run."""
    monkeypatch.setenv("MTPEFT_ROOT", str(tmp_path))
    monkeypatch.setenv("MTPEFT_CODE_VERSION", CODE_VERSION["MTPEFT_CODE_VERSION"])
    args = ["method=none", "seed=0", "task_name=pubtest", *TINY_RUN, "logger=none"]
    config = OmegaConf.to_container(compose_train(args, tmp_path / "composed"), resolve=True)
    published = tmp_path / "experiments" / "pubtest" / "runs" / "none_s0_published"
    job = _fake_run(published, config, ["method=none", "seed=0"])

    env = {**os.environ, "MTPEFT_ROOT": str(tmp_path), **CODE_VERSION}
    command = [sys.executable, "-m", "mtpeft.train", "-m", *args]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 jobs: 0 ran, 1 skipped, 0 failed" in proc.stdout, proc.stdout[-2000:]
    (skipped,) = (tmp_path / "logs" / "pubtest").rglob("skipped.json")
    record = json.loads(skipped.read_text())
    assert Path(record["finished_in"]).resolve() == published.resolve() and record["job_hash"] == job
    assert not list((tmp_path / "logs").rglob("results.json"))  # nothing ran
    (run,) = load_runs([skipped.parent.parent])  # the sweep directory's table reads the published run
    assert Path(run["path"]).resolve() == published.resolve() and run["scores"]["avg"] == 0.5


def test_the_runner_counts_the_jobs_of_a_sweep_that_will_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A final sweep of three seeds whose seed-1 job was published as finished: the runner counts two jobs to
    run (`jobs_to_run`, which sizes the sweep's share of the cores), hashing each job as the job itself
    would (the config `python -m mtpeft.train` composes: `test_sweep_job_with_a_published_record_is_skipped`)."""
    monkeypatch.setenv("MTPEFT_ROOT", str(tmp_path))
    monkeypatch.setenv("MTPEFT_CODE_VERSION", CODE_VERSION["MTPEFT_CODE_VERSION"])
    study, parts = study_from_command("methods_mix3_tuned", ["method=lora", "seed=0,1,2", *TINY_RUN])
    chosen = {"lora": {"optimizer.lr": 0.003}}
    ((command, _),) = final_commands(
        study, chosen, [*parts.seeds, *parts.jobs], launcher_overrides("joblib", 2)
    )
    assert jobs_to_run(study, command) == 3
    job = ["method=lora", "seed=1", "optimizer.lr=0.003", "++tuned={optimizer.lr:0.003}"]
    args = [
        "experiment=methods_mix3_tuned",
        "~tune",
        *job,
        *TINY_RUN,
        "run_group=any",
    ]  # (a multirun's group)
    config = OmegaConf.to_container(compose_train(args, tmp_path / "composed"), resolve=True)
    _fake_run(tmp_path / "experiments" / "methods_mix3_tuned" / "runs" / "final_lora_s1", config, job)
    assert jobs_to_run(study, command) == 2
    other = {**config, "seed": 7}  # a finished job of another seed counts for nothing
    _fake_run(tmp_path / "experiments" / "methods_mix3_tuned" / "runs" / "final_lora_s7", other, job)
    assert jobs_to_run(study, command) == 2
    forced, parts = study_from_command(
        "methods_mix3_tuned", ["method=lora", "seed=0,1,2", *TINY_RUN, "skip_finished=false"]
    )
    ((rerun, _),) = final_commands(
        forced, chosen, [*parts.seeds, *parts.jobs], launcher_overrides("joblib", 2)
    )
    assert jobs_to_run(forced, rerun) == 3  # skip_finished=false: the finished one runs again

    # with seeds 0 and 1 finished, the sweep is given one slot, and launches one job at a time
    args = [a.replace("seed=1", "seed=0") for a in args]
    seed_0 = OmegaConf.to_container(compose_train(args, tmp_path / "composed"), resolve=True)
    _fake_run(tmp_path / "experiments" / "methods_mix3_tuned" / "runs" / "final_lora_s0", seed_0, job)
    (sweep, _) = with_sizes(study, [(command, tmp_path / "a"), (command, tmp_path / "b")], 2)
    assert (sweep.jobs, sweep.to_run, sweep.need) == (3, 1, 1)
    assert [a for a in sweep.command if a.startswith("hydra.launcher.n_jobs=")] == ["hydra.launcher.n_jobs=1"]
    assert [a for a in command if a.startswith("hydra.launcher.n_jobs=")] == ["hydra.launcher.n_jobs=2"]


@pytest.mark.parametrize(
    ("extra", "steps"),
    [
        ([], [1200, 2400]),  # the study's sweeper param trainer.max_steps=1200,2400
        (["trainer.max_steps=7"], [7]),  # replaces it
        (["++trainer.max_steps=600"], [600, 600]),  # another key for Hydra's sweeper: both stay, ++ last
        (["++trainer.max_steps=5,6"], [5, 6, 5, 6]),
    ],
)
def test_the_runner_composes_a_sweeps_jobs_in_hydras_order(
    extra: list[str], steps: list[int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The configs `jobs_to_run` hashes are the jobs' own: the study's sweeper params, then the command's
    overrides in their order, expanded like Hydra's basic sweeper (one config per job `sweep_size` counts)."""
    monkeypatch.setenv("MTPEFT_ROOT", str(tmp_path))
    study, parts = study_from_command("methods_mix3_long", ["method=lora", "seed=0", *extra])
    ((command, _),) = final_commands(study, {}, [*parts.seeds, *parts.jobs], launcher_overrides("joblib", 2))
    configs = job_configs(study, command)
    assert [c["trainer"]["max_steps"] for c in configs] == steps and len(configs) == sweep_size(
        study, command
    )
    assert {(c["method"]["name"], c["seed"]) for c in configs} == {("lora", 0)}
