"""`mtpeft.study.status` (``python -m mtpeft.study <name> --status``): per stage, finished jobs of the
declared ones, running jobs with their checkpoint's step, interrupted and failed jobs, from a study's logs and
its published runs, one line per job whatever number of records it left."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from mtpeft.study.cli import main
from mtpeft.study.commands import declared_jobs
from mtpeft.study.config import Study, study_from_command
from mtpeft.study.status import (
    FAILED,
    FINISHED,
    INTERRUPTED,
    RUNNING,
    format_status,
    study_jobs,
)
from mtpeft.utils.runlock import RunDirLock

TUNE_SWEEP = "2026-12-02_19-37-00_e259e7_tune0"
WIDEN_SWEEP = "2026-12-02_22-01-00_a1b2c3_tune-widen1-0"


def _study(tmp_path: Path) -> Study:
    return Study(
        name="s",
        methods=["lora", "hycam", "none"],
        seeds=["0", "1"],
        log_dir=tmp_path / "logs",
        task_name="s",
        published_dir=tmp_path / "experiments" / "s" / "runs",
        tune={"seed": 0, "lr": [1e-3, 3e-3], "methods": {"none": None}},
        runner_keys=["tune"],
    )


def _write(directory: Path, method: str, lr: float, status: str, seed: int = 0, **extra: object) -> Path:
    config = {
        "method": {"name": method},
        "optimizer": {"lr": lr},
        "trainer": {"max_steps": 120},
        "seed": seed,
    }
    record = {"status": status, "method": method, "seed": seed, "config": config, "inputs": {"code": "c"}}
    directory.mkdir(parents=True)
    (directory / "results.json").write_text(json.dumps({**record, **extra}))
    return directory


def _checkpoint(directory: Path, step: int) -> None:
    (directory / "checkpoints").mkdir()
    torch.save(
        {"global_step": step, "state_dict": {"w": torch.zeros(4)}}, directory / "checkpoints" / "last.ckpt"
    )


def test_every_job_once_in_its_best_state(tmp_path: Path) -> None:
    study = _study(tmp_path)
    logs, published = tmp_path / "logs" / "s" / "multiruns", study.published_dir
    _write(published / "tune_lora_lr=0.001_s0_aaaaaaaa", "lora", 1e-3, "success", wall_time_s=1800.0)
    _write(logs / TUNE_SWEEP / "0", "lora", 1e-3, "failed")  # an earlier failure of a finished job
    running = _write(logs / TUNE_SWEEP / "1", "lora", 3e-3, "running")
    _checkpoint(running, 40)
    _write(logs / TUNE_SWEEP / "9", "lora", 3e-3, "running")  # the same job, killed before: interrupted
    interrupted = _write(logs / TUNE_SWEEP / "2", "hycam", 1e-3, "running")
    _checkpoint(interrupted, 60)
    _write(logs / TUNE_SWEEP / "3", "hycam", 3e-3, "running", superseded_by="elsewhere")  # taken over
    _write(logs / WIDEN_SWEEP / "0", "hycam", 3e-4, "failed")
    _write(published / "final_lora_lr=0.003_s1_bbbbbbbb", "lora", 3e-3, "success", seed=1, wall_time_s=2400.0)
    _write(tmp_path / "logs" / "s" / "runs" / "x", "lora", 0.1, "success")  # not launched by the runner

    with RunDirLock(running):
        jobs = study_jobs(study)
        states = {(j.stage, j.method, j.values, j.seed): (j.state, j.step) for j in jobs}
        assert states == {
            ("tune", "lora", "optimizer.lr=0.001", 0): (FINISHED, 120),
            ("tune", "lora", "optimizer.lr=0.003", 0): (RUNNING, 40),
            ("tune", "hycam", "optimizer.lr=0.001", 0): (INTERRUPTED, 60),
            ("tune", "hycam", "optimizer.lr=0.0003", 0): (FAILED, None),
            ("final", "lora", "optimizer.lr=0.003", 1): (FINISHED, 120),
        }
        text = format_status(study, jobs, declared_jobs(study))
    assert "tune: 1 finished, 1 running, 1 interrupted, 1 failed; declared 4 (+ values added" in text
    assert "median wall time of a finished trained run 30 min" in text
    assert "final: 1 finished, 0 running, 0 interrupted, 0 failed; declared 6;" in text
    assert "| tune | lora | optimizer.lr=0.003 | 0 | running | 40/120 |" in text
    assert "| tune | hycam | optimizer.lr=0.001 | 0 | interrupted | 60/120 |" in text
    assert "| tune | hycam | optimizer.lr=0.0003 | 0 | failed | -/120 |" in text
    assert "re-run `python -m mtpeft.study s` to resume" in text
    # left: tune 1 failed + 2/3 of lora 3e-3 + 1/2 of hycam 1e-3 = 2.17 x 1800 s; final 5 x 2400 s
    assert (
        "left: about 4.4 h of runs (tune 2.2, final 5.0 runs x the median wall time of their stage's 4 newest runs), 2.2 h at 2 "
        "parallel jobs\n"  # no widening note: a final job exists, so tuning is over
    ) in text
    after = {(j.stage, j.method, j.values): (j.state, j.step) for j in study_jobs(study)}  # lock released
    assert after["tune", "lora", "optimizer.lr=0.003"] == (INTERRUPTED, 40)  # the one with most steps


def test_declared_jobs_count_grid_points_and_final_seeds(tmp_path: Path) -> None:
    study = _study(tmp_path)
    study.tune["methods"]["hycam"] = {"method.routing": ["softmax", "hard_gumbel"]}
    assert declared_jobs(study) == {"tune": 2 + 4, "final": 3 * 2, "check": 0}  # no check section


def test_declared_jobs_count_the_studys_other_swept_keys(tmp_path: Path) -> None:
    study = _study(tmp_path)
    study.other_params = ["trainer.max_steps=100,200", "data.temperature=1,2,5"]
    study.check = {"overrides": ["trainer.max_steps=360"], "seeds": [0], "methods": ["lora"]}
    # every stage runs both other keys, but the check sets trainer.max_steps itself
    assert declared_jobs(study) == {"tune": 2 * 2 * 6, "final": 3 * 2 * 6, "check": 1 * 3}
    study.tune["methods"]["lora"] = {"trainer.max_steps": [100, 200, 300]}  # a grid key is the grid's...
    # tune: hycam 2 lrs x 6, lora 2 lrs x 3 max_steps x 3 temperatures; final: ...and chosen once tuned
    assert declared_jobs(study) == {"tune": 2 * 6 + 2 * 3 * 3, "final": 2 * 6 + 2 * 3 + 2 * 6, "check": 1 * 3}


def test_declared_jobs_of_real_configs_and_command_lines() -> None:
    counts = declared_jobs(study_from_command("hycam_ablation_tuned")[0])  # tune.overrides fix the variant
    assert counts["tune"] == 4 and counts["final"] == 27
    assert declared_jobs(study_from_command("methods_mix3_long")[0])["final"] == 18
    assert declared_jobs(study_from_command("methods_mix3_long", ["trainer.max_steps=2400"])[0])["final"] == 9
    assert declared_jobs(study_from_command("methods_mix3_long", ["data.temperature=1,2"])[0])["final"] == 36
    counts = declared_jobs(study_from_command("smollm2_mix", ["method=lora,none"])[0])
    assert counts == {"tune": 3, "final": 6, "check": 1}  # none is not tuned and not in the check


def test_status_of_a_real_study_config_runs_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert (
        main(["smollm2_mix", "--status", f"paths.log_dir={tmp_path}", f"paths.published_dir={tmp_path}"]) == 0
    )
    out = capsys.readouterr().out
    assert "tune: 0 finished, 0 running, 0 interrupted, 0 failed; declared 24" in out
    assert "final: 0 finished" in out and "declared 27" in out
    assert (
        main(
            ["methods_mix3_long", "--status", f"paths.log_dir={tmp_path}", f"paths.published_dir={tmp_path}"]
        )
        == 0
    )
    assert "final: 0 finished, 0 running, 0 interrupted, 0 failed; declared 18;" in capsys.readouterr().out


def test_status_counts_the_study_the_command_line_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    paths = [f"paths.log_dir={tmp_path}", f"paths.published_dir={tmp_path}"]
    assert (
        main(
            [
                "methods_mix3_tuned",
                "method=lora",
                "seed=0,1,2,3,4",
                "tune.lr=[0.001,0.01]",
                *paths,
                "--status",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "declared 2 (+" in out and "declared 5;" in out  # 1 method x 2 lrs; 1 method x 5 seeds
    optuna = ["+tune.sampler=optuna", "+tune.trials=12", "~tune.lr", "+tune.lr={low:1e-4,high:1e-1,log:true}"]
    assert main(["methods_mix3_tuned", "method=lora,hycam", *optuna, *paths, "--status"]) == 0
    out = capsys.readouterr().out
    assert "tune: 0 finished, 0 running, 0 interrupted, 0 failed; declared 24;" in out  # 2 x 12, no widening
    assert "declared 6;" in out  # 2 methods x 3 seeds


def test_work_left_scales_a_check_by_its_budget(tmp_path: Path) -> None:
    study = _study(tmp_path)
    study.check = {"overrides": ["trainer.max_steps=360"], "seeds": [0], "methods": ["lora"]}
    published = study.published_dir
    for lr in (1e-3, 3e-3):
        _write(published / f"tune_lora_{lr}", "lora", lr, "success", wall_time_s=1800.0)
        _write(published / f"tune_hycam_{lr}", "hycam", lr, "success", wall_time_s=1800.0)
    for method in ("lora", "hycam", "none"):
        for seed in (0, 1):
            _write(
                published / f"final_{method}_{seed}", method, 2e-3, "success", seed=seed, wall_time_s=1800.0
            )
    # every tune and final job finished; the check's one job: 1800 s x 360 / 120 steps = 1.5 h
    text = format_status(study, study_jobs(study), declared_jobs(study))
    assert (
        "left: about 1.5 h of runs (check 1.0 runs x the median wall time of their stage's 4 newest runs)"
        in text
    )
    assert "check timed by the other stages' seconds per step x its trainer.max_steps: rough" in text
    study.check = {"overrides": ["trainer.val_check_interval=30"], "seeds": [0], "methods": ["lora"]}
    text = format_status(study, study_jobs(study), declared_jobs(study))
    assert "left: about 0.5 h of runs (check 1.0" in text
    assert "check timed by the other stages' runs: a lower bound" in text


def test_runs_that_trained_nothing_do_not_time_their_stage(tmp_path: Path) -> None:
    """The zero-shot finals finish first and fast: the final stage is timed by the tuning runs until a trained
    final finishes, not by them (nor by a resumed run, which timed only its own part)."""
    study = _study(tmp_path)
    published = study.published_dir
    for lr in (1e-3, 3e-3):
        for method in ("lora", "hycam"):
            _write(published / f"tune_{method}_{lr}", method, lr, "success", wall_time_s=1800.0)
    for seed in (0, 1):
        _write(
            published / f"final_none_{seed}",
            "none",
            2e-3,
            "success",
            seed=seed,
            wall_time_s=600.0,
            trainable_params=0,
        )
    _write(published / "final_lora_0", "lora", 2e-3, "success", wall_time_s=900.0, resumed_from="x/last.ckpt")
    text = format_status(study, study_jobs(study), declared_jobs(study))
    assert (
        "left: about 1.5 h of runs (final 3.0 runs x the median wall time of their stage's 4 newest runs)"
        in text
    )  # 3 x 1800 s
    assert "final timed by the other stages' runs: a lower bound" in text
    _write(
        published / "final_lora_1", "lora", 2e-3, "success", seed=1, wall_time_s=3600.0, trainable_params=9
    )
    text = format_status(study, study_jobs(study), declared_jobs(study))
    assert "left: about 2.0 h of runs (final 2.0 runs" in text  # hycam's two seeds x 3600 s


def test_the_newest_runs_time_a_stage(tmp_path: Path) -> None:
    """A study spans machines: six old tuning runs of 3600 s, then four of 1800 s on this (faster) machine;
    the four newest time what is left, not the median of all ten."""
    study = _study(tmp_path)
    published = study.published_dir
    lrs = [1e-4, 2e-4, 3e-4, 5e-4, 7e-4, 1e-3, 2e-3, 3e-3, 5e-3, 7e-3]
    for i, lr in enumerate(lrs):
        run = _write(
            published / f"tune_lora_{lr}", "lora", lr, "success", wall_time_s=3600.0 if i < 6 else 1800.0
        )
        os.utime(run / "results.json", (1_000_000 + i, 1_000_000 + i))  # written in this order
    jobs = study_jobs(study)
    text = format_status(study, jobs, {"tune": 10, "final": 2, "check": 0})
    assert (
        "left: about 1.0 h of runs (final 2.0 runs x the median wall time of their stage's 4 newest runs)"
        in text
    )
