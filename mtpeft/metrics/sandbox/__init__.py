"""Run untrusted programs (model-written code) in kernel-isolated, limited processes.

Each program gets its own process tree (see ``mtpeft.metrics.sandbox.runner`` for the code that runs
inside): a supervisor ``python -I -S`` (isolated mode: no ``PYTHON*`` variables, no site packages, no
current directory on ``sys.path``) that enters new **user, PID, network, IPC and UTS namespaces** and forks
the program process, which

* gets its own **mount namespace** whose root is a read-only tmpfs with read-only bind mounts of the
  interpreter and system libraries, five harmless ``/dev`` nodes and a **size-capped tmpfs ``/tmp``** (its
  working directory, ``HOME`` and ``TMPDIR``): nothing of the host's files outside those is visible, and
  nothing is written to the host's disk;
* runs as **nobody** without capabilities (as root: uid/gid 65534 mapped to themselves; otherwise the
  caller's own uid), with ``no_new_privs``;
* has **rlimits** (CPU, address space, file size, open files, no core dumps) and a wall-clock timeout;
* runs under a **seccomp filter** (``mtpeft.metrics.sandbox.seccomp``, compiled by libseccomp) that
  refuses process creation except threads, ``execve``, network sockets, signals to other processes,
  ``pidfd_*``, ``ptrace``, ``mknod``/``mkfifo``, uid/gid changes, ``chroot``/``mount``/``unshare`` and more;
* keeps the **PEP 578 audit hook** as an extra layer (file access outside ``/tmp``, ctypes, frame walks).

**The verdict comes from the supervisor**, a process the program cannot see or signal: a pass needs exit
status 0 *and* a per-run secret token that the program process's main thread writes only after the
program thread has returned from the program. The program thread cannot end the process with status 0
(a seccomp filter on that thread kills the process instead), and ``SystemExit`` or any exception in the
program is a failure. Captured stdout and stderr are capped (``output_kb`` each, the rest is drained and
counted), so a program that prints gigabytes cannot grow the evaluating process.

A layer this machine cannot provide (no unprivileged user namespaces, no libseccomp) is reported once as
a warning and by :func:`sandbox_layers` / ``python -m mtpeft.metrics.sandbox``; it never silently
disappears: every run checks that the layers of the probe run are all active again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import marshal
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from mtpeft.metrics.sandbox import seccomp as sandbox_seccomp

log = logging.getLogger(__name__)

RUNNER = Path(__file__).with_name("runner.py")
BOOTSTRAP = f"import sys; sys.path.append({str(RUNNER.parent)!r}); import runner; runner.main()"
"""What ``python -I -S -c`` runs: the runner imported from its directory, so its bytecode cache is used."""
SYSTEM_DIRS = ("/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin")
"""Host directories bind-mounted read-only into the program's root (with the interpreter's prefixes)."""
MOUNTPOINTS = ("/mnt", "/media", "/srv", "/opt", "/var/tmp", "/tmp", "/run")
"""Host directories over which the new root may be mounted inside the program's mount namespace."""
PROBE = "import json, math\nassert json.loads(json.dumps(math.pi)) == math.pi\n"
"""The probe program: the standard library (pure Python and extension modules) must import as nobody."""
LAYERS = {
    "user_ns": "new user namespace",
    "pid_ns": "new PID namespace (the program is PID 1; everything dies with it)",
    "net_ns": "new network namespace (no interfaces but a down loopback)",
    "ipc_ns": "new IPC namespace",
    "uts_ns": "new UTS namespace",
    "mount_ns": "new mount namespace",
    "readonly_root": "read-only root: interpreter and system libraries only, no host files",
    "tmpfs_disk_cap": "working directory on a size-capped tmpfs (total disk cap)",
    "unprivileged_uid": "runs as nobody (when started as root) or as the unprivileged caller",
    "no_capabilities": "all capabilities dropped, no_new_privs",
    "rlimits": "CPU, memory, file size, open files, no core dumps",
    "seccomp": "seccomp filter on system calls",
    "exit_guard": "the program thread cannot exit its process with status 0",
    "audit_hook": "PEP 578 audit hook (extra layer)",
    "output_cap": "captured stdout/stderr capped",
}
"""Every layer :func:`sandbox_layers` reports, with what it does."""


@dataclass(frozen=True)
class SandboxLimits:
    """Per-program limits."""

    timeout: float = 5.0
    """Wall-clock seconds before the program is killed."""
    memory_mb: int = 1024
    """Address-space limit (``RLIMIT_AS``); 0 = none."""
    file_size_mb: int = 16
    """Largest file a program may write (``RLIMIT_FSIZE``)."""
    open_files: int = 64
    """Most open file descriptors (``RLIMIT_NOFILE``)."""
    workers: int = 0
    """Programs run at once; 0 = ``os.cpu_count()``."""
    python: str = sys.executable
    """Interpreter that runs the programs (run through its real path, without site packages)."""
    disk_mb: int = 64
    """Total size of the program's ``/tmp`` (tmpfs); with no mount namespace only ``file_size_mb`` holds."""
    output_kb: int = 64
    """Captured stdout and stderr, each; the rest is read, counted and dropped."""
    audit_hook: bool = True
    """The PEP 578 hook layer; False only to test that the kernel layers hold on their own."""


@dataclass(frozen=True)
class ProgramResult:
    """How one program ended: ``passed`` is True only for a complete run that exited 0 in time."""

    passed: bool
    reason: str
    """``ok``, ``timeout``, ``early_exit`` (exit 0 without finishing) or ``error`` (exception, non-zero
    exit, killed by a signal such as SIGSYS from seccomp, or a sandbox that could not start)."""
    detail: str = ""
    """For ``error``: the exit status, signal or setup problem."""
    stdout: str = ""
    """The first ``output_kb`` KiB of standard output."""
    stderr: str = ""
    """The first ``output_kb`` KiB of standard error."""
    output_bytes: int = 0
    """Bytes the program wrote to stdout and stderr in all (also what was dropped)."""
    layers: tuple[str, ...] = field(default=())
    """Isolation layers active for this run."""


@dataclass(frozen=True)
class _Setup:
    """How programs run on this machine with one interpreter (probed once)."""

    exe: str
    binds: tuple[str, ...]
    readable: tuple[str, ...]
    mountpoint: str
    isolate: bool
    bpf_process: bytes
    bpf_thread: bytes
    syscalls: dict
    layers: tuple[str, ...]


def run_programs(programs: Sequence[str], limits: SandboxLimits | None = None) -> list[ProgramResult]:
    """Run every program in its own sandbox; results in input order."""
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
    setup = _setup(python)
    result = _run(setup, "pass\n", SandboxLimits(timeout=30.0, python=python)) if setup else None
    if result is None or not result.passed:
        reason = f"{result.reason} {result.detail}".strip() if result else "the interpreter does not run"
        raise RuntimeError(
            f"the code sandbox ({python} -I -S) did not start or could not run `pass` ({reason}); "
            "check that the interpreter runs, or raise the limits on a slow machine"
        )


def run_program(program: str, limits: SandboxLimits) -> ProgramResult:
    """Run one program in a fresh sandbox."""
    setup = _setup(limits.python)
    if setup is None:
        return ProgramResult(False, "error", f"{limits.python} does not run")
    result = _run(setup, program, limits)
    expected = [layer for layer in setup.layers if limits.audit_hook or layer != "audit_hook"]
    missing = [layer for layer in expected if layer not in result.layers]
    if missing and result.reason != "timeout":
        return ProgramResult(False, "error", f"sandbox layers missing in this run: {missing}", result.stdout)
    return result


def sandbox_layers(python: str = sys.executable) -> dict[str, bool]:
    """Which isolation layers are active on this machine (probed once per interpreter)."""
    setup = _setup(python)
    active = set(setup.layers) if setup else set()
    return {layer: layer in active for layer in LAYERS}


def describe(results: Sequence[ProgramResult]) -> str:
    """A one-line count of outcomes, for logs."""
    counts: dict[str, int] = {}
    for result in results:
        counts[result.reason] = counts.get(result.reason, 0) + 1
    return json.dumps(counts, sort_keys=True)


def _run(setup: _Setup, program: str, limits: SandboxLimits) -> ProgramResult:
    """Start the supervisor, feed it header and program, collect capped output and its verdict."""
    token = secrets.token_hex(16).encode()
    hostdir = None if setup.isolate else os.path.realpath(tempfile.mkdtemp(prefix="mtpeft-sandbox-"))
    workdir = "/tmp" if setup.isolate else hostdir
    verdict_r, verdict_w = os.pipe()
    header = marshal.dumps(_header(setup, limits, token, workdir, verdict_w))
    try:
        proc = subprocess.Popen(
            [setup.exe, "-I", "-S", "-c", BOOTSTRAP],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(verdict_w,),
            cwd=workdir if hostdir else "/",
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir},
            start_new_session=True,
        )
    except OSError as err:
        os.close(verdict_r)
        if hostdir:
            shutil.rmtree(hostdir, ignore_errors=True)
        return ProgramResult(False, "error", str(err))
    finally:
        os.close(verdict_w)
    try:
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(len(header).to_bytes(4, "big") + header + program.encode(errors="surrogatepass"))  # type: ignore[union-attr]
            proc.stdin.close()  # type: ignore[union-attr]
        streams = _collect(proc, verdict_r, limits)
    finally:
        _kill_group(proc)
        os.close(verdict_r)
        if hostdir:
            shutil.rmtree(hostdir, ignore_errors=True)
    return _result(streams, limits)


def _header(setup: _Setup, limits: SandboxLimits, token: bytes, workdir: str, verdict_fd: int) -> dict:
    """What the runner needs (``marshal``: the runner must not import json, too slow to start)."""
    return {
        "token": token,
        "timeout": float(limits.timeout),
        "limits": _rlimits(limits),
        "isolate": setup.isolate,
        "nobody": os.geteuid() == 0,
        "binds": list(setup.binds),
        "readable": list(setup.readable),
        "mountpoint": setup.mountpoint,
        "disk_mb": limits.disk_mb,
        "inodes": 4096,
        "workdir": workdir,
        "bpf_process": setup.bpf_process,
        "bpf_thread": setup.bpf_thread,
        "audit_hook": limits.audit_hook,
        "syscalls": setup.syscalls,
        "verdict_fd": verdict_fd,
    }


def _collect(proc: subprocess.Popen, verdict_fd: int, limits: SandboxLimits) -> dict:
    """Read stdout, stderr (each kept up to ``output_kb``) and the verdict until all close or the
    deadline (the runner's own timeout plus time to start) passes."""
    cap = limits.output_kb * 1024
    kept = {"stdout": bytearray(), "stderr": bytearray(), "verdict": bytearray()}
    counts = {"stdout": 0, "stderr": 0, "verdict": 0}
    deadline = time.monotonic() + limits.timeout + 10.0
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ, "stdout")  # type: ignore[arg-type]
        sel.register(proc.stderr, selectors.EVENT_READ, "stderr")  # type: ignore[arg-type]
        sel.register(verdict_fd, selectors.EVENT_READ, "verdict")
        while sel.get_map() and (left := deadline - time.monotonic()) > 0:
            for key, _ in sel.select(left):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                name = key.data
                counts[name] += len(chunk)
                room = (cap if name != "verdict" else 1 << 16) - len(kept[name])
                kept[name] += chunk[: max(room, 0)]
        timed_out = bool(sel.get_map())
    return {"kept": kept, "counts": counts, "timed_out": timed_out}


def _result(streams: dict, limits: SandboxLimits) -> ProgramResult:
    """The verdict the supervisor reported, with the captured output."""
    kept, counts = streams["kept"], streams["counts"]
    out = {name: kept[name].decode(errors="replace") for name in ("stdout", "stderr")}
    total = counts["stdout"] + counts["stderr"]
    if streams["timed_out"]:
        return ProgramResult(False, "timeout", "", out["stdout"], out["stderr"], total)
    try:
        verdict = marshal.loads(bytes(kept["verdict"]))
    except (EOFError, ValueError, TypeError):
        detail = "the sandbox supervisor reported no verdict"
        return ProgramResult(False, "error", detail, out["stdout"], out["stderr"], total)
    layers = tuple(verdict["layers"])
    if "nobody" in layers or os.geteuid() != 0:
        layers += ("unprivileged_uid",)
    layers += ("output_cap",)
    passed, reason, detail = verdict["passed"], verdict["reason"], verdict["detail"]
    return ProgramResult(passed, reason, detail, out["stdout"], out["stderr"], total, layers)


def _rlimits(limits: SandboxLimits) -> dict[str, int]:
    """``resource.RLIMIT_*`` values the program process applies to itself before the program runs."""
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
    """Kill the supervisor's session (the program process is in it and dies with the supervisor)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream:
            stream.close()


@lru_cache(maxsize=8)
def _setup(python: str) -> _Setup | None:
    """Probe once: the interpreter's prefixes, seccomp, then a full-isolation run of ``pass``; fall back
    (with one warning naming what is missing) to no namespaces if that run fails. None: no interpreter."""
    exe = shutil.which(python) or python
    exe = os.path.realpath(exe)
    prefixes = _prefixes(exe)
    if prefixes is None:
        return None
    binds = _binds(exe, prefixes)
    readable = tuple(sorted({os.path.realpath(b) for b in binds} | {"/dev"}))
    why_no_seccomp = sandbox_seccomp.available()
    syscalls = sandbox_seccomp.syscall_numbers()
    base = dict(exe=exe, binds=binds, readable=readable, mountpoint=_mountpoint(binds), syscalls=syscalls)
    first_failure = None
    for isolate in (True, False):
        bpf = b"" if why_no_seccomp else sandbox_seccomp.process_filter(isolate)
        guard = b"" if why_no_seccomp else sandbox_seccomp.thread_filter()
        setup = _Setup(**base, isolate=isolate, bpf_process=bpf, bpf_thread=guard, layers=())
        probe = _run(setup, PROBE, SandboxLimits(timeout=30.0, python=python))
        if probe.passed:
            setup = _Setup(**{**setup.__dict__, "layers": probe.layers})
            _warn_missing(setup, why_no_seccomp, first_failure if not isolate else None)
            return setup
        first_failure = " ".join([probe.reason, probe.detail, *probe.stderr.strip().splitlines()[-1:]])
    return _Setup(**base, isolate=False, bpf_process=b"", bpf_thread=b"", layers=())


def _warn_missing(setup: _Setup, why_no_seccomp: str | None, why_no_namespaces: str | None) -> None:
    """Say once which layers this machine lacks, and why."""
    missing = [layer for layer in LAYERS if layer not in setup.layers]
    if not missing:
        return
    reasons = [
        r for r in (why_no_namespaces and f"namespaces failed: {why_no_namespaces}", why_no_seccomp) if r
    ]
    log.warning(
        "code sandbox: layers NOT active on this machine: %s (%s); run `python -m mtpeft.metrics.sandbox`",
        ", ".join(missing),
        "; ".join(reasons) or "see the layer list",
    )


def _prefixes(exe: str) -> list[str] | None:
    """The interpreter's own prefix and exec prefix, or None when it does not run."""
    try:
        out = subprocess.run(
            [exe, "-I", "-S", "-c", "import sys; print(sys.prefix); print(sys.exec_prefix)"],
            capture_output=True,
            timeout=60,
            check=True,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        ).stdout.decode()
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.split()
    return [os.path.realpath(p) for p in lines] if len(lines) == 2 else None


def _binds(exe: str, prefixes: list[str]) -> tuple[str, ...]:
    """System directories and the interpreter's, outermost first, without ones already inside another."""
    wanted = [d for d in SYSTEM_DIRS if os.path.lexists(d)] + prefixes + [os.path.dirname(exe)]
    binds: list[str] = []
    for path in sorted(set(wanted), key=lambda p: (p.count("/"), p)):
        covered = any(
            path == b or path.startswith(b.rstrip("/") + "/") for b in binds if not os.path.islink(b)
        )
        if not covered:
            binds.append(path)
    return tuple(binds)


def _mountpoint(binds: Sequence[str]) -> str:
    """A host directory, unrelated to any bind source, to mount the new root on (in the namespace only)."""
    for candidate in MOUNTPOINTS:
        related = any(
            b == candidate or b.startswith(candidate + "/") or candidate.startswith(b + "/") for b in binds
        )
        if os.path.isdir(candidate) and not os.path.islink(candidate) and not related:
            return candidate
    return "/tmp"
