"""Running a study's sweeps as subprocesses, and stopping all of them when the study is stopped.

`mtpeft.study` runs each stage as ``python -m mtpeft.train -m ...``, whose launcher starts the jobs as
processes of their own (joblib's workers). Stopping the runner alone would leave those jobs running, holding
their run directories and the CPU, and a re-run of the study would start a second copy of every job next to
them. So each sweep runs in its own process group (`SweepGroups.start`), and while `stop_on_signals` is
active a SIGINT (Ctrl-C), SIGTERM or SIGHUP to the runner sends SIGTERM to every sweep group. SIGTERM, not
the signal received: the launcher process then exits at once, while each job (Lightning's signal handling)
ends at the end of its current training step or evaluation batch, its run staying ``running``, so the next
``python -m mtpeft.study <name>`` resumes it from its last periodic checkpoint (``checkpoint_every_n_steps``:
the steps since then are redone; on SIGINT, joblib would kill its workers mid-step instead). What the clean
end buys over a kill: the jobs' logs, CSV and wandb files are closed properly and no process is left. The
runner waits until no job holds its run directory any more (at most
`STOP_WAIT_S`), kills what is left of the group (joblib's idle workers outlive their launcher), starts no
new sweep (`StudyStopped`) and publishes what finished. A second signal kills the groups at once (the jobs
lose the same steps, but their log files may be cut mid-line).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import NamedTuple

from mtpeft.utils.runlock import LOCK_FILE, is_locked

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""Signals that stop a study (passed on to its sweeps as SIGTERM)."""
STOP_WAIT_S = 180.0
"""After a stop, how long the runner waits for a sweep's jobs to end before it kills them (a job ends after
its current training step or evaluation batch: seconds on the tiny model, about a minute on SmolLM2)."""


class StudyStopped(Exception):  # noqa: N818 - it is a stop, not an error
    """The study was stopped by a signal; ``signum`` is that signal."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


class SweepGroups:
    """The sweep processes this runner has started and not yet seen exit, each leading its process group.

    `stop` runs inside a signal handler, in whichever bytecode of the main thread the signal interrupts
    (possibly `start`, holding the lock): it takes no lock and writes with ``os.write`` only. It reads a
    snapshot of the live groups, and `start` signals a group it adds after a stop itself."""

    def __init__(self) -> None:
        self._live: dict[subprocess.Popen, Path] = {}
        self._lock = threading.Lock()
        self.stopped: int | None = None
        """The signal that stopped the study, once one did."""
        self._killed = False

    def start(self, command: list[str], directory: Path) -> subprocess.Popen:
        """Start ``command`` (a sweep writing its jobs' run directories into ``directory``) in a new process
        group, which its launcher's job processes join."""
        with self._lock:
            if self.stopped is not None:
                raise StudyStopped(self.stopped)
            process = subprocess.Popen(command, env={**os.environ}, start_new_session=True)
            self._live[process] = Path(directory)
        if self.stopped is not None:  # a stop came while it started: the handler's snapshot missed it
            _signal_group(process.pid, signal.SIGKILL if self._killed else signal.SIGTERM)
        return process

    def finished(self, process: subprocess.Popen) -> None:
        """``process`` has exited (or its caller is leaving). After a stop, its jobs may still be finishing
        their step: wait until none holds its run directory any more, then kill what is left of the group
        (joblib's idle workers and trackers, which outlive their launcher). A sweep left behind otherwise
        (an exception in its caller) is stopped the same way."""
        directory = self._live[process]
        if self.stopped is not None or process.poll() is None:
            if self.stopped is None:
                _signal_group(process.pid, signal.SIGTERM)
            if not jobs_released(directory, STOP_WAIT_S):
                log.warning("the jobs of %s did not stop within %.0f s: killing them", directory, STOP_WAIT_S)
            _signal_group(process.pid, signal.SIGKILL)
            group_ended(process.pid, 30.0)
            process.wait()
        with self._lock:
            del self._live[process]

    def signal_all(self, signum: int) -> None:
        """Send ``signum`` to every live sweep's process group (a snapshot: no lock, see the class)."""
        for process in tuple(self._live):
            _signal_group(process.pid, signum)

    def stop(self, signum: int) -> None:
        """On the first stop signal, SIGTERM to every group (jobs end cleanly); on the next ones, SIGKILL."""
        if self.stopped is None:
            self.stopped = signum
            _say(
                f"{signal.Signals(signum).name}: stopping the study; each job ends after its current step "
                "and a re-run resumes it from its last checkpoint (send it again to kill the jobs at once)"
            )
            self.signal_all(signal.SIGTERM)
        else:
            self._killed = True
            _say("killing the study's jobs")
            self.signal_all(signal.SIGKILL)


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _say(message: str) -> None:
    """Write a line to stderr from a signal handler (``os.write``: no buffered stream to re-enter)."""
    with contextlib.suppress(OSError):
        os.write(2, f"{message}\n".encode())


def jobs_released(directory: Path, timeout: float) -> bool:
    """Wait until no run directory under ``directory`` is held by a live process (True), at most
    ``timeout`` seconds (False). A job holds its run directory (`mtpeft.utils.runlock`) until it ends."""
    deadline = time.monotonic() + timeout
    while any(is_locked(lock.parent) for lock in Path(directory).glob(f"*/{LOCK_FILE}")):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
    return True


def group_ended(pgid: int, timeout: float) -> bool:
    """Wait until no live process of group ``pgid`` is left (True), at most ``timeout`` seconds (False)."""
    deadline = time.monotonic() + timeout
    while group_alive(pgid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
    return True


def group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` is running. On Linux from ``/proc`` (exited processes that no one
    has reaped yet do not count: an orphaned job is reaped by init, which a container may not do), else by
    signalling the group."""
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
        except (OSError, IndexError):
            continue  # the process ended while being read
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


SWEEPS = SweepGroups()
"""The sweeps of this process (signals are per process, so one registry per process)."""


def run_sweep(command: list[str], directory: Path) -> int:
    """Run one sweep writing into ``directory`` in its own process group; its output goes to this process's
    stdout/stderr. Returns the exit status; raises `StudyStopped` if the study was stopped before or
    during it."""
    log.info("$ %s", " ".join(command))
    process = SWEEPS.start(command, directory)
    try:
        status = process.wait()
    finally:
        SWEEPS.finished(process)
    if SWEEPS.stopped is not None:
        raise StudyStopped(SWEEPS.stopped)
    return status


@contextlib.contextmanager
def stop_on_signals(groups: SweepGroups = SWEEPS) -> Iterator[SweepGroups]:
    """While active (in the main thread), `STOP_SIGNALS` stop the study through ``groups.stop``; the
    previous handlers come back on exit. Elsewhere (not the main thread) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield groups
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        groups.stop(signum)

    groups.stopped = None
    previous = {signum: signal.signal(signum, handle) for signum in STOP_SIGNALS}
    try:
        yield groups
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: set outside Python


def jobs_left(directory: Path, jobs: int) -> int:
    """How many of the ``jobs`` jobs of the sweep writing into ``directory`` have not ended: those not started
    yet and those running (all of them when the directory cannot be read). A job has ended once its run
    directory (``<directory>/<job number>``) has a lock file that names its holder and that no live process
    holds (`mtpeft.utils.runlock`: a job, even one skipped as already finished, takes the lock when it starts
    and releases it when it returns, or the kernel drops it when its process dies). A job that started but
    has not taken its lock yet (no lock file, or one still empty) counts as running, so the count never runs
    ahead of the jobs."""
    try:
        ended = sum(_ended(lock) for lock in Path(directory).glob(f"*/{LOCK_FILE}"))
    except OSError:
        return jobs
    return max(0, jobs - ended)


def _ended(lock: Path) -> bool:
    """Whether the job of lock file ``lock`` has ended: its holder was written (under the lock, so the file
    is not empty once the lock was taken) and no one holds it now."""
    return lock.stat().st_size > 0 and not is_locked(lock.parent)


class Sweep(NamedTuple):
    """One sweep for `run_sweeps_in_slots`."""

    command: list[str]
    directory: Path
    jobs: int
    """The jobs it launches."""
    to_run: int | None = None
    """Those of them that will run (not finished before: `mtpeft.study.unfinished.jobs_to_run`); None: all."""

    @property
    def need(self) -> int:
        """Slots it starts with: one per job that runs, at least one (finished jobs are skipped in seconds)."""
        return max(1, self.jobs if self.to_run is None else self.to_run)


def run_sweeps_in_slots(
    sweeps: Sequence[Sweep | tuple[list[str], Path, int]],
    slots: int,
    runner: Callable[[list[str], Path], int] = run_sweep,
    after_each: Callable[[Path, int], None] = lambda directory, status: None,
    left: Callable[[Path, int], int] = jobs_left,
    poll_s: float = 5.0,
) -> list[int]:
    """Run `Sweep` s (or ``(command, directory, jobs)``) in their order, several at once while their jobs fit
    in ``slots`` parallel jobs (a sweep takes ``min(need, slots)``: one of 2 jobs fills 2 slots, two sweeps
    of 1 job share them, and so do two sweeps of 3 jobs of which 2 finished before). Without this, a stage
    of one-job sweeps (a check on one seed, a widened value of one method) would use one core of two. A
    running sweep gives its slots back as its jobs end (``left(directory, jobs)``, `jobs_left`, read every
    ``poll_s`` seconds while a sweep waits): the last job of a 7-job sweep on 2 slots holds one slot, and
    the next sweep's one job takes the other instead of waiting for it; a sweep needing two waits for both
    (see `mtpeft.study.commands.one_sweep_per_seed`). ``after_each(directory, status)`` runs after each
    sweep, in its thread (it must be thread-safe). Returns the exit statuses in the sweeps' order; a stop
    (`StudyStopped`) of any sweep is raised once the running ones have returned."""
    slots = max(1, slots)
    sweeps = [Sweep(*sweep) for sweep in sweeps]
    free = threading.Condition()
    held: dict[int, int] = {}
    """Slots each running sweep holds, by index: its size, then fewer as its jobs end."""
    statuses: list[int | None] = [None] * len(sweeps)
    errors: list[BaseException] = []

    def one(index: int, command: list[str], directory: Path) -> None:
        try:
            statuses[index] = runner(command, directory)
            after_each(directory, statuses[index])  # outside the lock: the other sweeps' slots move on
        except BaseException as error:  # noqa: BLE001 - StudyStopped and others: raised by the caller
            errors.append(error)
        finally:
            with free:
                held.pop(index, None)
                free.notify_all()

    def available() -> int:
        for index in tuple(held):
            _, directory, jobs, _ = sweeps[index]
            held[index] = min(held[index], left(directory, jobs))
        return slots - sum(held.values())

    threads = []
    for index, (command, directory, _, _) in enumerate(sweeps):
        need = min(sweeps[index].need, slots)
        with free:
            while not (errors or available() >= need):
                free.wait(poll_s)
            if errors:
                break
            held[index] = need
        thread = threading.Thread(target=one, args=(index, command, directory), daemon=True)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return [status if status is not None else 1 for status in statuses]
