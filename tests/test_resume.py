"""Resumable runs: a run resumed from any of its periodic checkpoints ends exactly like the uninterrupted
run (weights, optimiser state, metrics), periodic checkpoints change nothing, a SIGKILLed run continues
with ``resume=auto``; the run-directory lock; the ``running`` record; write-once success records."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from mtpeft.run import run
from mtpeft.utils.callbacks import MODULE_STATE
from mtpeft.utils.resume import find_resume_checkpoint, resume_mode
from mtpeft.utils.runlock import LOCK_FILE, RunDirBusy, RunDirLock, is_locked
from mtpeft.utils.sweep import POST_SUCCESS_FAILURE_FILE, write_record
from tests.conftest import TINY_RUN, compose_train

REPO = Path(__file__).resolve().parent.parent
#: TINY_RUN with 8 training records per task: 3 batches per epoch, so 5 steps cross an epoch boundary
#: (step 3) and validate twice (steps 2 and 4). LoRA's dropout makes every step draw random numbers.
SMALL = [
    *(o for o in TINY_RUN if ".train=" not in o and "max_steps" not in o),
    *(f"data.tasks.{t}.train=8" for t in ("qa", "code", "reasoning")),
    "trainer.max_steps=5",
    "method=lora",
    "logger=none",
]


class SnapshotLast(L.Callback):
    """Test helper: keep a copy of every ``last.ckpt`` the run writes (``at<step>.ckpt`` in ``into``)."""

    def __init__(self, last: str, into: str) -> None:
        self.last, self.into = Path(last), Path(into)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        target = self.into / f"at{trainer.global_step}.ckpt"
        if self.last.is_file() and not target.exists():
            self.into.mkdir(parents=True, exist_ok=True)
            shutil.copy(self.last, target)


class Stall(L.Callback):
    """Test helper: at step ``at_step`` (of the job with seed ``only_seed``, if given) write ``marker`` and
    hang, so that a test can SIGKILL the run at a known point."""

    def __init__(self, at_step: int, marker: str, seed: int = 0, only_seed: int | None = None) -> None:
        self.at_step, self.marker = at_step, Path(marker)
        self.active = only_seed is None or seed == only_seed

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if self.active and trainer.global_step == self.at_step:
            self.marker.write_text(str(os.getpid()))
            time.sleep(600)


def _run(out: Path, *overrides: str) -> dict:
    return run(compose_train([*SMALL, *overrides], out), out)


def _final_state(run_dir: Path) -> tuple[dict, dict]:
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    return checkpoint["state_dict"], checkpoint["optimizer_states"][0]["state"]


def _same_tensors(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_tensors(a[k], b[k]) for k in a)
    return a == b


def test_resume_from_every_checkpoint_equals_the_uninterrupted_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reference = _run(tmp_path / "plain", "checkpoint_every_n_steps=null")
    snapshots = tmp_path / "snapshots"
    caplog.clear()
    full = _run(
        tmp_path / "full",
        "checkpoint_every_n_steps=1",
        "+callbacks.snap._target_=tests.test_resume.SnapshotLast",
        f"+callbacks.snap.last={tmp_path / 'full' / 'checkpoints' / 'last.ckpt'}",
        f"+callbacks.snap.into={snapshots}",
    )
    assert full["metrics"] == reference["metrics"]  # checkpointing every step changes nothing
    assert not [r for r in caplog.records if "weights_only" in r.getMessage()], (
        "a save logged Lightning's default"
    )
    weights, optimiser = _final_state(tmp_path / "full")
    # step 2 validates (its checkpoint is written after the validation), step 3 ends an epoch
    for step in (2, 3):
        out = tmp_path / f"from{step}"
        resumed = _run(out, "checkpoint_every_n_steps=1", f"resume={snapshots / f'at{step}.ckpt'}")
        assert resumed["resumed_from"] == str(out / "checkpoints" / "last.ckpt")
        assert resumed["metrics"] == reference["metrics"], f"resumed from step {step}"
        assert resumed["best_checkpoint"] == str(out / "checkpoints" / Path(full["best_checkpoint"]).name)
        resumed_weights, resumed_optimiser = _final_state(out)
        assert _same_tensors(resumed_weights, weights), f"weights differ after resuming from step {step}"
        assert _same_tensors(resumed_optimiser, optimiser), f"optimiser differs (step {step})"


def test_module_state_names_exist() -> None:
    """`ResumeState` saves these instance attributes of the module; a rename must not drop one silently."""
    from mtpeft.module import MultiTaskModule

    source = Path(sys.modules[MultiTaskModule.__module__].__file__).read_text()
    for name in MODULE_STATE:
        assert f"self.{name} =" in source or f"self.{name}:" in source, name


def _cli(args: list[str], root: Path, log: Path | None = None) -> subprocess.Popen:
    """``python -m mtpeft.train`` in the background; output to ``log`` (a pipe nobody reads could fill up
    and block the run) or, without one, to pipes for ``communicate``."""
    # the code version is pinned: other edits of the package while the test runs must not change job hashes
    env = {**os.environ, "MTPEFT_ROOT": str(root), "MTPEFT_CODE_VERSION": "test"}
    return subprocess.Popen(
        [sys.executable, "-m", "mtpeft.train", *args],
        cwd=REPO,
        env=env,
        stdout=log.open("w") if log else subprocess.PIPE,
        stderr=subprocess.STDOUT if log else subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def kill_when(marker: Path, proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    """SIGKILL ``proc``'s process group as soon as ``marker`` exists (the run stalled at a known point);
    fail if the run ends first or the marker does not appear in time (the group is killed either way)."""
    deadline = time.monotonic() + timeout
    try:
        while not marker.exists():
            if proc.poll() is not None:
                raise AssertionError(f"the run ended before {marker} appeared:\n{log.read_text()[-3000:]}")
            assert time.monotonic() < deadline, f"{marker} did not appear within {timeout} s"
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
def test_sigkilled_run_resumes_with_resume_auto(tmp_path: Path) -> None:
    """A CLI run killed by SIGKILL after a checkpoint: its record says ``running``; the same command with
    ``resume=auto hydra.run.dir=<its dir>`` continues it and ends equal to the uninterrupted run."""
    run_dir, marker = tmp_path / "run", tmp_path / "stalled"
    args = [*SMALL, "checkpoint_every_n_steps=2", f"hydra.run.dir={run_dir}"]
    proc = _cli([*args, "+callbacks.stall._target_=tests.test_resume.Stall", "+callbacks.stall.at_step=3",
                 f"+callbacks.stall.marker={marker}"], tmp_path, log=tmp_path / "killed.log")  # fmt: skip
    kill_when(marker, proc, tmp_path / "killed.log")
    record = json.loads((run_dir / "results.json").read_text())
    assert record["status"] == "running" and record["pid"] == int(marker.read_text())
    assert not is_locked(run_dir)  # the kernel dropped the killed run's lock

    resumed = _cli([*args, "resume=auto"], tmp_path)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    record = json.loads((run_dir / "results.json").read_text())
    assert record["status"] == "success" and record["resumed_from"].endswith("checkpoints/last.ckpt")
    reference = _run(tmp_path / "reference", "checkpoint_every_n_steps=2")
    assert record["metrics"] == reference["metrics"]
    for mine, theirs in zip(_final_state(run_dir), _final_state(tmp_path / "reference"), strict=True):
        assert _same_tensors(mine, theirs)


# -- resume settings -----------------------------------------------------------------------------------
def test_resume_modes(tmp_path: Path) -> None:
    assert resume_mode(None, multirun=True) == "auto" and resume_mode(None, multirun=False) is None
    assert resume_mode(False, multirun=True) is None and resume_mode("auto", multirun=False) == "auto"
    with pytest.raises(ValueError, match="resume=3"):
        resume_mode(3, multirun=False)
    with pytest.raises(FileNotFoundError, match="resume=.*no such checkpoint"):
        find_resume_checkpoint(str(tmp_path / "nope.ckpt"), tmp_path, tmp_path, "job", multirun=False)
    # auto with nothing to resume: start fresh
    assert find_resume_checkpoint("auto", tmp_path / "run", tmp_path, "job", multirun=False) is None


# -- lock ----------------------------------------------------------------------------------------------
_HOLDER = """
import sys, time
from mtpeft.utils.runlock import RunDirLock
lock = RunDirLock(sys.argv[1]); lock.acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_run_dir_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert is_locked(tmp_path)
        with pytest.raises(RunDirBusy, match=rf"{tmp_path}.*in use.*pid {holder.pid}"):
            RunDirLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / LOCK_FILE).exists() and not is_locked(tmp_path)  # stale: the holder is dead
    with RunDirLock(tmp_path), RunDirLock(tmp_path):  # taken over; re-entrant within a process
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not is_locked(tmp_path)


def test_a_lock_probed_for_an_instant_is_not_busy(tmp_path: Path) -> None:
    """`is_locked` (``--status``, a stopping study) takes a free lock for an instant: a run that tries to take
    it meanwhile waits that instant instead of calling the directory busy (and retraining elsewhere)."""
    import fcntl
    import threading

    with RunDirLock(tmp_path):
        pass
    probe = os.open(tmp_path / LOCK_FILE, os.O_RDWR)
    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    threading.Timer(0.05, os.close, [probe]).start()  # the probe lets go 50 ms later
    with RunDirLock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_second_cli_run_in_a_busy_directory_fails_before_writing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = _cli([*SMALL, f"hydra.run.dir={run_dir}"], tmp_path)
        _, err = proc.communicate(timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode != 0
    assert f"run directory {run_dir}" in err and f"pid {holder.pid}" in err
    assert err.strip().splitlines()[-1].startswith("Error: run directory")
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]  # no .hydra/, log or results.json


# -- records -------------------------------------------------------------------------------------------
class RecordProbe(L.Callback):
    """Test helper: read ``results.json`` while the run trains."""

    seen: dict = {}

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_start(self, *args: Any) -> None:
        RecordProbe.seen = json.loads(self.path.read_text())


def test_running_record_then_write_once_success(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    probe = [
        "+callbacks.probe._target_=tests.test_resume.RecordProbe",
        f"+callbacks.probe.path={out / 'results.json'}",
    ]

    def broken_table(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("printing failed")

    monkeypatch.setattr("mtpeft.run.results_table", broken_table)  # fails after the success record
    with pytest.raises(RuntimeError, match="printing failed"):
        _run(out, "trainer.max_steps=2", *probe)
    running = RecordProbe.seen
    assert running["status"] == "running" and running["pid"] == os.getpid() and running["host"]
    assert running["config"]["seed"] == 0 and running["job_hash"] and running["started"]
    record = json.loads((out / "results.json").read_text())
    assert record["status"] == "success" and record["job_hash"] == running["job_hash"]
    failure = json.loads((out / POST_SUCCESS_FAILURE_FILE).read_text())
    assert failure["status"] == "failed" and "printing failed" in failure["error"]
    with pytest.raises(ValueError, match="already holds a successful run"):
        _run(out, "trainer.max_steps=2")
    assert json.loads((out / "results.json").read_text()) == record


def test_write_record_never_replaces_success(tmp_path: Path) -> None:
    write_record(tmp_path, {"status": "running"})
    write_record(tmp_path, {"status": "success", "metrics": {}})
    assert write_record(tmp_path, {"status": "failed"}) == tmp_path / POST_SUCCESS_FAILURE_FILE
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "success"
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files


# -- DataLoader workers --------------------------------------------------------------------------------
def test_resume_with_dataloader_workers_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    """A worker draws batches ahead of training; a run resumed from its periodic checkpoints (mid-epoch
    after a validation, and at an epoch's end) still ends exactly like the uninterrupted run."""
    workers = ["data.num_workers=1", "checkpoint_every_n_steps=1"]
    snapshots = tmp_path / "snapshots"
    full = _run(
        tmp_path / "full",
        *workers,
        "+callbacks.snap._target_=tests.test_resume.SnapshotLast",
        f"+callbacks.snap.last={tmp_path / 'full' / 'checkpoints' / 'last.ckpt'}",
        f"+callbacks.snap.into={snapshots}",
    )
    weights, optimiser = _final_state(tmp_path / "full")
    for step, trained in ((2, 16), (3, 24)):  # 24 training records, 3 batches of 8 per epoch
        saved = torch.load(snapshots / f"at{step}.ckpt", weights_only=False)["MultiTaskDataModule"]["sampler"]
        assert saved["position"] == trained, f"step {step}: the worker had drawn ahead"
        out = tmp_path / f"from{step}"
        resumed = _run(out, *workers, f"resume={snapshots / f'at{step}.ckpt'}")
        assert resumed["metrics"] == full["metrics"], f"resumed from step {step}"
        resumed_weights, resumed_optimiser = _final_state(out)
        assert _same_tensors(resumed_weights, weights), f"weights differ after resuming from step {step}"
        assert _same_tensors(resumed_optimiser, optimiser), f"optimiser differs (step {step})"
