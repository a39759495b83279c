"""Run untrusted programs (model-written code) in separate, limited processes.

Each program runs in its own ``python -I -S`` process (isolated mode: no ``PYTHON*`` variables, no user
or site packages, no current directory on ``sys.path``) started in a new session, with:

* a wall-clock timeout (the whole process group is killed) and an ``RLIMIT_CPU`` limit;
* ``RLIMIT_AS`` (memory), ``RLIMIT_FSIZE`` (file size), ``RLIMIT_NOFILE`` and ``RLIMIT_CORE = 0``;
* a fresh temporary working directory, deleted afterwards, which is also its ``HOME`` and ``TMPDIR``;
* an environment with nothing of the parent's (no tokens, keys or proxies): ``PATH``, ``LANG`` only;
* an audit hook (PEP 578), installed before the program runs and impossible to remove from Python, that
  refuses: opening files outside the working directory (reading the standard library is allowed),
  deleting/renaming/creating paths outside it, starting processes (``fork``, ``exec``, ``spawn``,
  ``system``, ``subprocess``), sending signals (``kill``, ``killpg``), sockets, ``ctypes``, and the
  introspection that would reach the runner's secret (other threads' frames, ``gc`` object walks).

A program passes only if it runs to its end: it runs in a thread of its own, and then the runner's main
thread prints a per-run random token the program never sees; the process must exit 0 within the limits. ``sys.exit(0)`` or ``os._exit(0)`` half way
counts as a failure. Programs run ``workers`` at a time.

This is defence in depth for benchmark code, not a security boundary against a determined attacker
(audit hooks are best effort; root inside the sandbox is still root): for untrusted code at scale run the
evaluation in a container or VM without network.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

RUNNER = r"""
import sys, os, json, resource
def _main():
    payload = sys.stdin.read()
    header, _, source = payload.partition("\n")
    header = json.loads(header)
    token, root, allowed = header["token"], header["root"], tuple(header["readable"])
    for name, value in header["limits"].items():  # soft = hard: the program cannot raise them
        resource.setrlimit(getattr(resource, name), (value, value))
    realpath, sep, fspath = os.path.realpath, os.sep, os.fspath
    forbidden = frozenset((
        "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill",
        "os.killpg", "subprocess.Popen", "pty.spawn", "signal.pthread_kill", "socket.__new__",
        "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto", "ctypes.dlopen",
        "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function", "sys._current_frames",
        "gc.get_objects", "gc.get_referrers", "gc.get_referents",
        "sys.setprofile", "sys.settrace", "os.setuid", "os.chroot", "resource.setrlimit",
        "os.putenv", "os.unsetenv", "winreg.OpenKey",
    ))
    path_events = frozenset((
        "os.remove", "os.rmdir", "os.rename", "os.mkdir", "os.chmod", "os.chown", "os.truncate",
        "os.symlink", "os.link", "os.utime", "shutil.rmtree", "os.chdir",
    ))
    listing_events = frozenset(("os.listdir", "os.scandir"))  # the import system lists stdlib dirs
    def inside(path, roots):
        try:
            real = realpath(fspath(path)) if not isinstance(path, int) else None
        except Exception:
            return False
        if real is None:
            return True  # an already open file descriptor
        return any(real == r or real.startswith(r + sep) for r in roots)
    def hook(event, args):
        if event in forbidden or event == "import" and args[0] in ("ctypes", "_ctypes", "cffi"):
            raise PermissionError("sandbox: " + event + " is not allowed")
        if event == "open":
            path, mode = args[0], args[1] or "r"
            write = any(c in str(mode) for c in "wax+") or (isinstance(args[2], int) and args[2] & 0o3)
            if path is not None and not inside(path, (root,) if write else (root,) + allowed):
                raise PermissionError("sandbox: cannot open " + str(path))
        elif event in path_events or event in listing_events:
            roots = (root,) + allowed if event in listing_events else (root,)
            for path in args:
                if isinstance(path, (str, bytes, os.PathLike)) and not inside(path, roots):
                    raise PermissionError("sandbox: " + event + " outside the working directory")
        elif event == "object.__setattr__" and args[0] is hook:
            raise PermissionError("sandbox: the audit hook is read-only")
    sys.addaudithook(hook)
    out = os.fdopen(os.dup(1), "w")
    del payload, header
    import threading
    threading.stack_size(64 * 2**20)
    result = [False]
    worker = threading.Thread(target=_run, args=(source, result), daemon=True)
    worker.start()
    worker.join()
    if not result[0]:
        os._exit(1)
    out.write(token + "\n")
    out.flush()
    os._exit(0)
def _run(source, result):
    # in its own thread: walking back from the program's frames never reaches _main (and the token)
    try:
        exec(compile(source, "<program>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        done = True
    except BaseException:  # SystemExit included: leaving early is a failure
        done = False
    result[0] = done
_main()
"""
"""The runner: reads a JSON header line (token, working dir, readable dirs, rlimits), then the program."""


@dataclass(frozen=True)
class SandboxLimits:
    """Per-program limits."""

    timeout: float = 5.0
    """Wall-clock seconds before the process group is killed."""
    memory_mb: int = 1024
    """Address-space limit (``RLIMIT_AS``); 0 = none."""
    file_size_mb: int = 16
    """Largest file a program may write (``RLIMIT_FSIZE``)."""
    open_files: int = 64
    """Most open file descriptors (``RLIMIT_NOFILE``)."""
    workers: int = 0
    """Programs run at once; 0 = ``os.cpu_count()``."""
    python: str = sys.executable
    """Interpreter that runs the programs."""


@dataclass(frozen=True)
class ProgramResult:
    """How one program ended: ``passed`` is True only for a complete run that exited 0 in time."""

    passed: bool
    reason: str
    """``ok``, ``error`` (exception or non-zero exit), ``timeout`` or ``early_exit`` (exit 0, no token)."""


def run_programs(programs: Sequence[str], limits: SandboxLimits | None = None) -> list[ProgramResult]:
    """Run every program in its own sandboxed process; results in input order."""
    limits = limits or SandboxLimits()
    if not programs:
        return []
    check_interpreter(limits.python)
    workers = limits.workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=min(workers, len(programs))) as pool:
        return list(pool.map(lambda program: run_program(program, limits), programs))


@lru_cache(maxsize=8)
def check_interpreter(python: str) -> None:
    """A sandbox interpreter must run a trivial program; otherwise every score would silently be 0."""
    result = run_program("pass\n", SandboxLimits(timeout=30.0, python=python))
    if not result.passed:
        raise RuntimeError(
            f"the code sandbox ({python} -I -S) did not start or could not run `pass` ({result.reason}); "
            "check that the interpreter runs, or raise the limits on a slow machine"
        )


def run_program(program: str, limits: SandboxLimits) -> ProgramResult:
    """Run one program in a fresh process and working directory."""
    token = secrets.token_hex(16)
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="mtpeft-sandbox-"))
    header = json.dumps(
        {"token": token, "root": workdir, "readable": _readable_roots(), "limits": _rlimits(limits)}
    )
    try:
        proc = subprocess.Popen(
            [limits.python, "-I", "-S", "-c", RUNNER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=workdir,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir},
            start_new_session=True,
        )
        try:
            stdout, _ = proc.communicate(f"{header}\n{program}".encode(), timeout=limits.timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return ProgramResult(False, "timeout")
        finally:
            _kill_group(proc)  # anything the program left running in its session
    except OSError as err:
        return ProgramResult(False, f"error: {err}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    finished = token in stdout.decode(errors="replace").split()
    if proc.returncode == 0 and finished:
        return ProgramResult(True, "ok")
    return ProgramResult(False, "early_exit" if proc.returncode == 0 else "error")


@lru_cache(maxsize=1)
def _readable_roots() -> tuple[str, ...]:
    """Directories a program may read: the interpreter's standard library (for imports)."""
    roots = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix, sys.prefix)}
    return tuple(sorted(roots))


def _rlimits(limits: SandboxLimits) -> dict[str, int]:
    """``resource.RLIMIT_*`` values the runner applies to itself before the program runs.

    (Applied in the child rather than through ``preexec_fn``, which is unsafe when the parent has threads.)
    """
    values = {
        "RLIMIT_CPU": int(limits.timeout) + 1,
        "RLIMIT_FSIZE": limits.file_size_mb * 2**20,
        "RLIMIT_NOFILE": limits.open_files,
        "RLIMIT_CORE": 0,
    }
    if limits.memory_mb:
        values["RLIMIT_AS"] = limits.memory_mb * 2**20
    return values


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill the program's whole session (it may have started threads or, if it got around the hook, processes)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def describe(results: Sequence[ProgramResult]) -> str:
    """A one-line count of outcomes, for logs."""
    counts: dict[str, int] = {}
    for result in results:
        counts[result.reason] = counts.get(result.reason, 0) + 1
    return json.dumps(counts, sort_keys=True)
