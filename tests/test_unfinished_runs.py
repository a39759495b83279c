"""Evaluation, export and lm-eval take only finished runs: the adapter of a run still running or failed may
be partial or not its best checkpoint's, and its record lists the tasks in config order, not in the
adapter's task-id order (so a task would be scored with another task's adapter)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtpeft.eval import adapter_source
from mtpeft.export import load_run, main
from tests.test_export import TASKS, make_run

UNFINISHED = {
    "running": (
        {"status": "running", "pid": 4242, "tasks": ["qa", "code", "reasoning"]},
        "status 'running', pid 4242",
    ),
    "failed": (
        {"status": "failed", "error": "RuntimeError: boom", "tasks": TASKS},
        "status 'failed': RuntimeError: boom",
    ),
}


@pytest.mark.parametrize("state", sorted(UNFINISHED))
def test_unfinished_runs_are_refused_by_every_entry(state: str, tmp_path: Path, capsys) -> None:
    run_dir, _ = make_run("mtl_lora", tmp_path)
    record, detail = UNFINISHED[state]
    (run_dir / "results.json").write_text(json.dumps(record))
    for load in (load_run, adapter_source):
        with pytest.raises(ValueError, match="is not a finished run") as err:
            load(run_dir)
        assert detail in str(err.value) and "resume=auto" in str(err.value)
    assert main([str(run_dir), "--merge", "--task", "qa", "--out", str(tmp_path / "out")]) == 1
    assert "is not a finished run" in capsys.readouterr().err


def test_an_unreadable_record_names_its_file(tmp_path: Path) -> None:
    run_dir, _ = make_run("lora", tmp_path)
    (run_dir / "results.json").write_text('{"status": "succ')
    with pytest.raises(ValueError, match=r"results\.json is unreadable .*killed while writing it"):
        load_run(run_dir)


def test_a_finished_run_and_a_run_without_record_load(tmp_path: Path) -> None:
    run_dir, _ = make_run("mtl_lora", tmp_path)
    assert load_run(run_dir).tasks == TASKS
    (run_dir / "results.json").unlink()
    assert load_run(run_dir).tasks == TASKS  # the data config's tasks, sorted as the adapter's ids
