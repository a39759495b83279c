"""`mtpeft.study.sweeps`: a stop signal to the study runner reaches every process of its sweeps (the jobs a
launcher started too), no sweep starts after it, a second signal kills, and what finished is published."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import mtpeft.study.runner as runner_module
from mtpeft.study.sweeps import StudyStopped, Sweep, SweepGroups, jobs_left, run_sweeps_in_slots
from mtpeft.utils.runlock import LOCK_FILE, RunDirLock

# A sweep whose "job" is a grandchild process holding its run directory, as a joblib launcher's workers are:
# it reports the signals it gets and ends on the first unless told to hold on; next to it an idle process
# that ignores SIGTERM, as joblib's idle workers and trackers outlive their launcher.
JOB = """
import signal, sys, time
from pathlib import Path
from mtpeft.utils.runlock import RunDirLock
out, hold, run_dir = Path(sys.argv[1]), sys.argv[2] == "hold", Path(sys.argv[3])
def got(signum, frame):
    with out.open("a") as f:
        f.write(f"{signum}\\n")
    if not hold:
        sys.exit(0)
signal.signal(signal.SIGTERM, got)
signal.signal(signal.SIGINT, got)
with RunDirLock(run_dir):
    (out.parent / "job.ready").touch()
    time.sleep(120)
"""
IDLE = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"
SWEEP = """
import subprocess, sys
idle = subprocess.Popen([sys.executable, "-c", sys.argv[2], sys.argv[-1]])  # named by the run dir
sys.exit(subprocess.call([sys.executable, "-c", sys.argv[1], *sys.argv[3:]]))
"""
RUNNER = """
import sys
import threading
from pathlib import Path
from mtpeft.study.sweeps import StudyStopped, run_sweep, stop_on_signals
sweep = Path(sys.argv[-1]).parent
with stop_on_signals():
    try:
        run_sweep([sys.executable, "-c", *sys.argv[1:]], sweep)
        run_sweep([sys.executable, "-c", "pass"], sweep)
    except StudyStopped as stop:
        sys.exit(100 + stop.signum)
sys.exit(0)
"""


def _runner(tmp_path: Path, hold: bool) -> tuple[subprocess.Popen, Path]:
    received, run_dir = tmp_path / "received", tmp_path / "sweep" / "0"
    run_dir.mkdir(parents=True)
    mode = "hold" if hold else "go"
    runner = subprocess.Popen(
        [sys.executable, "-c", RUNNER, SWEEP, JOB, IDLE, str(received), mode, str(run_dir)], cwd=Path.cwd()
    )
    deadline = time.monotonic() + 60
    while not (tmp_path / "job.ready").exists():
        assert runner.poll() is None and time.monotonic() < deadline, "the job never started"
        time.sleep(0.05)
    return runner, received


def _left(tmp_path: Path) -> list[str]:
    """This test's idle process, if it still runs (found by its command line, which names the run dir)."""
    out = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if "SIG_IGN" in line and str(tmp_path) in line]


def test_a_stop_signal_reaches_the_jobs_and_no_sweep_starts_after_it(tmp_path: Path) -> None:
    runner, received = _runner(tmp_path, hold=False)
    runner.send_signal(signal.SIGTERM)  # the runner only, as `kill <pid>` does
    assert runner.wait(timeout=60) == 100 + signal.SIGTERM  # the second sweep was not started
    assert received.read_text() == f"{int(signal.SIGTERM)}\n"  # the job got it and ended
    assert not _left(tmp_path)  # and the idle process that ignores SIGTERM was killed


def test_the_runner_waits_for_a_busy_job_until_a_second_signal(tmp_path: Path) -> None:
    runner, received = _runner(tmp_path, hold=True)
    runner.send_signal(signal.SIGINT)  # Ctrl-C: passed on as SIGTERM, which this job does not act on...
    deadline = time.monotonic() + 60
    while not received.exists():
        assert time.monotonic() < deadline, "the job was not signalled"
        time.sleep(0.05)
    with pytest.raises(subprocess.TimeoutExpired):
        runner.wait(timeout=1)  # ...so the runner waits while it holds its run directory...
    runner.send_signal(signal.SIGINT)  # ...until a second signal kills the group
    assert runner.wait(timeout=60) == 100 + signal.SIGINT
    assert received.read_text() == f"{int(signal.SIGTERM)}\n" and not _left(tmp_path)


def test_groups_refuse_to_start_a_sweep_after_a_stop() -> None:
    groups = SweepGroups()
    groups.stop(signal.SIGTERM)
    with pytest.raises(StudyStopped, match="SIGTERM"):
        groups.start([sys.executable, "-c", "pass"], Path("."))


def test_runs_finished_before_a_stop_are_published(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.test_publish import CODE_VERSION, _config, _fake_run

    monkeypatch.setenv("MTPEFT_ROOT", str(tmp_path))
    monkeypatch.setenv("MTPEFT_CODE_VERSION", CODE_VERSION["MTPEFT_CODE_VERSION"])

    def stopped_sweep(command: list[str], directory: Path) -> int:
        _fake_run(directory / "0", _config(), ["method=lora", "seed=0"])
        raise StudyStopped(signal.SIGTERM)

    monkeypatch.setattr(runner_module, "run_sweep", stopped_sweep)
    with pytest.raises(StudyStopped):
        runner_module.run_study("methods_mix3", ["method=lora", "seed=0"], launcher="basic")
    published = tmp_path / "experiments" / "methods_mix3" / "runs"
    assert [p.name.startswith("final_lora_s0_") for p in published.iterdir()] == [True]


def test_exited_processes_nobody_reaped_do_not_keep_a_group_alive() -> None:
    from mtpeft.study.sweeps import group_alive

    process = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    deadline = time.monotonic() + 60
    while group_alive(process.pid):  # it exits, and stays a zombie until waited for
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert process.poll() == 0


SIGNAL_IN_START = """
import os, signal, subprocess, sys
from pathlib import Path
import mtpeft.study.sweeps as sweeps
real = subprocess.Popen
def popen_then_signal(*args, **kwargs):  # the signal lands while start() holds its lock
    process = real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)
    return process
sweeps.subprocess.Popen = popen_then_signal
groups = sweeps.SweepGroups()
with sweeps.stop_on_signals(groups):
    process = groups.start([sys.executable, "-c", "import time; time.sleep(120)"], Path(sys.argv[1]))
    print(process.wait(timeout=30))
    groups.finished(process)
"""


def test_a_signal_while_a_sweep_starts_neither_deadlocks_nor_misses_it(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SIGNAL_IN_START, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(-signal.SIGTERM)  # the new sweep got the stop too
    assert "SIGTERM: stopping the study" in done.stderr


# -- several sweeps at once while their jobs fit ----------------------------------------------------
class _Timeline:
    """A fake `run_sweep` that records how many sweeps run at once (each takes ``seconds``)."""

    def __init__(self, seconds: float = 0.15, fail: set[str] | None = None, stop: str | None = None) -> None:
        self.seconds, self.fail, self.stop = seconds, fail or set(), stop
        self.active = self.most = 0
        self.started: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, command: list[str], directory: Path) -> int:
        with self.lock:
            self.active += 1
            self.most = max(self.most, self.active)
            self.started.append(directory.name)
        time.sleep(self.seconds)
        with self.lock:
            self.active -= 1
        if directory.name == self.stop:
            raise StudyStopped(signal.SIGTERM)
        return 1 if directory.name in self.fail else 0


def _sweeps(*jobs: int) -> list[tuple[list[str], Path, int]]:
    return [([], Path(f"s{i}"), n) for i, n in enumerate(jobs)]


@pytest.mark.parametrize(
    ("jobs", "slots", "most"), [((1, 1, 1, 1), 2, 2), ((2, 2, 2), 2, 1), ((1, 1, 1), 1, 1), ((5, 1), 2, 1)]
)
def test_one_job_sweeps_share_the_slots_and_full_sweeps_run_alone(jobs: tuple, slots: int, most: int) -> None:
    timeline, seen = _Timeline(), []
    statuses = run_sweeps_in_slots(_sweeps(*jobs), slots, timeline, lambda d, s: seen.append(d.name))
    assert timeline.most == most, (jobs, slots)
    assert statuses == [0] * len(jobs) and sorted(seen) == [f"s{i}" for i in range(len(jobs))]
    assert timeline.started == [f"s{i}" for i in range(len(jobs))]  # started in their order


def test_sweeps_whose_jobs_mostly_finished_before_share_the_slots() -> None:
    """Three seeds declared, two finished: each sweep runs one job, so two of them run side by side."""
    timeline = _Timeline()
    sweeps = [Sweep([], Path(f"s{i}"), 3, to_run) for i, to_run in enumerate((1, 1, 0, 3, None))]
    assert [sweep.need for sweep in sweeps] == [1, 1, 1, 3, 3]
    assert run_sweeps_in_slots(sweeps[:3], 2, timeline) == [0, 0, 0]
    assert timeline.most == 2
    full = _Timeline()
    run_sweeps_in_slots(sweeps[3:], 2, full)
    assert full.most == 1


def test_statuses_come_back_in_order_and_a_stop_starts_nothing_more() -> None:
    timeline = _Timeline(fail={"s1"})
    assert run_sweeps_in_slots(_sweeps(1, 1, 1), 2, timeline) == [0, 1, 0]
    stopping = _Timeline(stop="s0")
    with pytest.raises(StudyStopped):
        run_sweeps_in_slots(_sweeps(2, 1, 1), 2, stopping)
    assert stopping.started == ["s0"]


def test_a_sweep_gives_its_slots_back_as_its_jobs_end() -> None:
    """A 7-job sweep on 2 slots whose jobs end but its last: the one-job sweep behind it starts beside that last
    job (found by polling while it waits), not after the whole sweep; one that needs both slots still waits."""
    started = time.monotonic()

    def left(directory: Path, jobs: int) -> int:  # s0 is down to its last job after 0.1 s
        return 1 if directory.name == "s0" and time.monotonic() - started > 0.1 else jobs

    timeline = _Timeline(seconds=0.5)
    assert run_sweeps_in_slots(_sweeps(7, 1), 2, timeline, left=left, poll_s=0.01) == [0, 0]
    assert timeline.most == 2 and timeline.started == ["s0", "s1"]
    started = time.monotonic()
    both = _Timeline(seconds=0.3)
    run_sweeps_in_slots(_sweeps(7, 2), 2, both, left=left, poll_s=0.01)
    assert both.most == 1
    busy = _Timeline(seconds=0.3)
    run_sweeps_in_slots(_sweeps(7, 1), 2, busy, left=lambda directory, jobs: jobs, poll_s=0.01)
    assert busy.most == 1


def test_jobs_left_counts_the_jobs_not_started_or_holding_their_run_directory(tmp_path: Path) -> None:
    for job in ("0", "1", "2", "3"):
        (tmp_path / job).mkdir()
    with RunDirLock(tmp_path / "1"):
        pass  # ended: its lock file names its holder, no one holds it
    (tmp_path / "3" / LOCK_FILE).touch()  # created, not locked yet: a job starting
    assert jobs_left(tmp_path, 5) == 5 - 1  # 0 started without its lock yet, 2 and 3 starting, 4 not started
    holder = subprocess.Popen(
        [sys.executable, "-c", JOB, str(tmp_path / "signals"), "go", str(tmp_path / "2")], cwd=Path.cwd()
    )
    try:
        for _ in range(600):  # another process holds job 2's directory (the runner's case)
            if (tmp_path / "job.ready").exists():
                break
            time.sleep(0.05)
        assert (tmp_path / "job.ready").exists()
        assert jobs_left(tmp_path, 5) == 4
    finally:
        holder.terminate()
        holder.wait()
    assert jobs_left(tmp_path, 5) == 3  # its process ended: the lock is free
    assert jobs_left(tmp_path, 1) == 0
    assert jobs_left(tmp_path / "missing", 3) == 3
