"""pass@1 by execution (code task): run each completion against its record's tests in a sandbox process.

A completion must start with ``return``; it becomes the body of ``def f(ARGS):`` followed by one
``assert f(*inputs) == output`` per test (DATA.md 4.3). Nothing runs in the parent process.

Cost: one ``python -I`` process scores a whole batch of candidates (a validation epoch costs one
process start, not hundreds). Inside it every candidate runs in a fresh namespace with its own
builtins, under a per-candidate ``setitimer`` alarm, an address-space limit, and try/except, and
reports ``<nonce> <i> <0|1>`` as soon as it finishes (candidate output is captured, so it cannot
fake a report). After the sandbox's ``<nonce> ready`` line (start-up has its own, generous limit)
the parent waits at most ``timeout + grace`` seconds for each report. If the batch process hangs
(e.g. a loop inside C code that never checks for signals) or dies, the candidate it was running is
re-checked alone in its own process, and the rest continue in a new batch (after
``max_batch_restarts`` restarts: one process each).
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO

from mtpeft.data.records import Record
from mtpeft.metrics.base import check_lengths, clean

RUNNER = r"""
import builtins, io, json, signal, sys

class _Timeout(BaseException):
    pass

def _on_alarm(signum, frame):
    raise _Timeout()

def _limit_memory(limit):
    try:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except Exception:
        pass

def main():
    payload = json.loads(sys.stdin.read())
    if payload["memory"]:
        _limit_memory(payload["memory"])
    signal.signal(signal.SIGALRM, _on_alarm)
    out, err, nonce, limit = sys.stdout, sys.stderr, payload["nonce"], payload["timeout"]
    out.write(f"{nonce} ready\n")
    out.flush()
    for i, src in enumerate(payload["programs"]):
        ok = 0
        try:
            sys.stdout = sys.stderr = io.StringIO()
            try:
                signal.setitimer(signal.ITIMER_REAL, limit)
                namespace = {"__name__": "__candidate__", "__builtins__": dict(vars(builtins))}
                exec(compile(src, "<candidate>", "exec"), namespace)
                ok = 1
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except BaseException:
            ok = 0
        sys.stdout, sys.stderr = out, err
        out.write(f"{nonce} {i} {ok}\n")
        out.flush()

main()
"""
"""The sandbox script: reads ``{nonce, timeout, memory, programs}`` as JSON from stdin."""


def build_program(completion: str, record: Record) -> str | None:
    """The test program for one completion, or None when it does not start with ``return``.

    Uses ``record["meta"]["args"]`` (argument names) and ``record["meta"]["tests"]``
    (``[[inputs...], expected]`` pairs); a record without them raises ValueError.
    """
    meta = record["meta"]
    if "args" not in meta or "tests" not in meta:
        raise ValueError(
            f"pass@1 needs meta['args'] and meta['tests'] in every record; record {record['instruction'][:60]!r} "
            f"of task {record['task']!r} has meta keys {sorted(meta)}"
        )
    if not completion.startswith("return"):
        return None
    body = "\n".join("    " + line for line in completion.splitlines())
    lines = [f"def f({', '.join(meta['args'])}):", body]
    lines += [f"assert f(*{list(inputs)!r}) == {expected!r}" for inputs, expected in meta["tests"]]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class PassAtOne:
    """pass@1 of greedy completions: 1.0 when all of the record's tests pass, else 0.0."""

    timeout: float = 2.0
    """Seconds each candidate may run."""
    memory_mb: int = 1024
    """Address-space limit of the sandbox process (0: no limit)."""
    grace: float = 2.0
    """Extra seconds the parent waits for a report (slow machines) before killing a hung sandbox."""
    startup_timeout: float = 30.0
    """Seconds the sandbox may take to start; a sandbox that never starts is an error, not a failed test."""
    max_batch_restarts: int = 3
    """Batch restarts after hangs/crashes before falling back to one process per candidate."""
    python: str = sys.executable
    """Interpreter that runs the sandbox."""

    name = "pass@1"

    def score(self, predictions: Sequence[str], records: Sequence[Record]) -> list[float]:
        """One 0/1 score per prediction."""
        check_lengths(self.name, predictions, records)
        programs = [build_program(clean(p), r) for p, r in zip(predictions, records, strict=True)]
        runnable = [i for i, prog in enumerate(programs) if prog is not None]
        passed = self.run([programs[i] for i in runnable])  # type: ignore[misc]
        scores = [0.0] * len(programs)
        for i, ok in zip(runnable, passed, strict=True):
            scores[i] = float(ok)
        return scores

    def run(self, programs: Sequence[str]) -> list[bool]:
        """Run every program; True where it finished without an exception within the time limit."""
        results: list[bool] = [False] * len(programs)
        pending = list(range(len(programs)))
        for _ in range(self.max_batch_restarts + 1):
            if not pending:
                return results
            done, culprit = self._run_batch([programs[i] for i in pending])
            for local, ok in done.items():
                results[pending[local]] = ok
            if culprit is None:
                return results
            results[pending[culprit]] = self._run_alone(programs[pending[culprit]])
            pending = pending[culprit + 1 :]
        for i in pending:
            results[i] = self._run_alone(programs[i])
        return results

    def _run_alone(self, program: str) -> bool:
        """Check one program in its own process."""
        done, _ = self._run_batch([program])
        return done.get(0, False)

    def _run_batch(self, programs: Sequence[str]) -> tuple[dict[int, bool], int | None]:
        """Run programs in one sandbox process.

        Returns the reported results and, if the process hung or died early, the index of the
        program it was running (None when all reported).
        """
        nonce = secrets.token_hex(8)
        payload = {
            "nonce": nonce,
            "timeout": self.timeout,
            "memory": self.memory_mb * 2**20,
            "programs": list(programs),
        }
        proc = subprocess.Popen(
            [self.python, "-I", "-c", RUNNER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        assert proc.stdout is not None
        lines: queue.Queue[str | None] = queue.Queue()
        pump = threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True)
        pump.start()
        try:
            _send(proc, json.dumps(payload))
            _await_ready(lines, nonce, self.startup_timeout, self.python)
            return _collect(lines, nonce, len(programs), self.timeout + self.grace)
        finally:
            _reap(proc)
            pump.join(timeout=5.0)
            proc.stdout.close()


def _send(proc: subprocess.Popen, text: str) -> None:
    """Write the payload and close stdin; a sandbox that died at start-up is detected by the reader."""
    assert proc.stdin is not None
    try:
        proc.stdin.write(text)
        proc.stdin.close()
    except (BrokenPipeError, OSError):
        pass


def _await_ready(lines: queue.Queue[str | None], nonce: str, timeout: float, python: str) -> None:
    """Wait for the sandbox's ``<nonce> ready`` line; raise RuntimeError when it does not come."""
    try:
        line = lines.get(timeout=timeout)
    except queue.Empty:
        line = None
    if line is None or line.split() != [nonce, "ready"]:
        raise RuntimeError(
            f"the code sandbox ({python} -I) did not start within {timeout:.0f} s; check that the "
            "interpreter runs, or raise PassAtOne.startup_timeout on a slow machine"
        )


def _collect(
    lines: queue.Queue[str | None], nonce: str, n: int, wait: float
) -> tuple[dict[int, bool], int | None]:
    """Read ``<nonce> <i> <ok>`` lines, waiting at most ``wait`` seconds for each."""
    done: dict[int, bool] = {}
    while len(done) < n:
        try:
            line = lines.get(timeout=wait)
        except queue.Empty:
            return done, len(done)  # hung: the next program never reported
        if line is None:
            return done, len(done)  # died before reporting everything
        parts = line.split()
        if len(parts) == 3 and parts[0] == nonce and parts[1].isdigit():
            done[int(parts[1])] = parts[2] == "1"
    return done, None


def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    """Forward a stream line by line into a queue; None marks the end."""
    for line in stream:
        lines.put(line)
    lines.put(None)


def _reap(proc: subprocess.Popen) -> None:
    """Make sure the sandbox (and anything it started in its session) is gone."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
    proc.wait()
