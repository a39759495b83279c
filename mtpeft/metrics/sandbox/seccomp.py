"""The sandbox's seccomp filters, compiled by libseccomp (through ``pyseccomp``) into classic BPF.

The evaluating process compiles them once; the sandbox runner (which runs without site packages) only
loads the bytes with ``prctl(PR_SET_SECCOMP)``. Two filters, both "allow by default, refuse these":

* the process filter (every thread of the program process): no new processes (``clone`` without
  ``CLONE_THREAD`` or with a namespace flag, ``clone3`` answers ENOSYS so glibc falls back to ``clone``,
  ``fork``, ``vfork``), no ``execve``, no network sockets (AF_UNIX socket pairs stay, asyncio needs one),
  no signals to other processes (``kill``/``tgkill``/``rt_sigqueueinfo`` only to PID 1, the program itself
  in its PID namespace; no ``tkill``, no ``pidfd_*``), no ``ptrace`` or cross-process memory access, no
  ``mknod``/``mkfifo``, no uid/gid/capability changes, no ``chroot``/``mount``/``unshare``/``setns`` and
  the new mount API, no clearing of the parent-death signal, and no kernel-facing calls a test program
  never needs (bpf, perf events, keyrings, modules, io_uring, userfaultfd, clock setting, reboot ...);
* the program-thread filter, stacked on the program thread only: ``exit_group`` with a status whose low
  byte is 0 kills the process (SIGSYS), so the program cannot end its process "successfully" by itself.

Refused calls fail with EPERM (``clone3``: ENOSYS), which Python turns into ``OSError``.
"""

from __future__ import annotations

import errno
import platform
import tempfile
from functools import lru_cache

CLONE_THREAD = 0x00010000
NAMESPACE_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)
"""CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET."""
PR_SET_PDEATHSIG = 1
AF_UNIX = 1
REFUSED = (
    "fork", "vfork", "execve", "execveat", "socket", "tkill", "pidfd_open", "pidfd_send_signal",
    "pidfd_getfd", "ptrace", "process_vm_readv", "process_vm_writev", "process_madvise", "kcmp",
    "mknod", "mknodat", "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid",
    "setfsuid", "setfsgid", "setgroups", "capset", "chroot", "pivot_root", "mount", "umount2",
    "mount_setattr", "move_mount", "open_tree", "fsopen", "fsconfig", "fsmount", "fspick", "unshare",
    "setns", "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load", "reboot",
    "swapon", "swapoff", "acct", "quotactl", "syslog", "io_uring_setup", "io_uring_enter",
    "io_uring_register", "sethostname", "setdomainname", "settimeofday", "clock_settime",
    "clock_adjtime", "adjtimex", "iopl", "ioperm", "name_to_handle_at", "open_by_handle_at",
    "lookup_dcookie", "vhangup", "fanotify_init", "memfd_secret",
)  # fmt: skip
"""Refused outright (EPERM)."""
SIGNALS_TO_SELF_ONLY = ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo")
"""First argument must be PID 1: the program process in its own PID namespace."""
RUNNER_SYSCALLS = ("pivot_root", "mount_setattr")
"""Numbers the runner needs for raw ``syscall(2)`` calls."""


def available() -> str | None:
    """None when filters can be built here, else why not (pyseccomp or libseccomp missing)."""
    try:
        import pyseccomp  # noqa: F401
    except (ImportError, OSError, RuntimeError) as err:  # it loads libseccomp.so.2 when imported
        return f"seccomp unavailable: {err} (pip install pyseccomp; Debian package libseccomp2)"
    return None


@lru_cache(maxsize=4)
def process_filter(own_pid_namespace: bool) -> bytes:
    """BPF for the whole program process. Without its own PID namespace the program's PID is not known
    in advance, so every signal-sending call is refused."""
    import pyseccomp as sc

    refuse = sc.ERRNO(errno.EPERM)
    f = sc.SyscallFilter(sc.ALLOW)
    f.add_rule(refuse, "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_THREAD, 0))
    for flag in NAMESPACE_FLAGS:
        f.add_rule(refuse, "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    f.add_rule(refuse, "socketpair", sc.Arg(0, sc.NE, AF_UNIX))
    f.add_rule(refuse, "prctl", sc.Arg(0, sc.EQ, PR_SET_PDEATHSIG))
    for name in SIGNALS_TO_SELF_ONLY:
        if own_pid_namespace:
            f.add_rule(refuse, name, sc.Arg(0, sc.NE, 1))
        else:
            f.add_rule(refuse, name)
    for name in REFUSED:
        _add_if_known(f, refuse, name)
    return _export(f)


@lru_cache(maxsize=1)
def thread_filter() -> bytes:
    """BPF stacked on the program thread: ``exit_group`` with status 0 (mod 256) kills the process."""
    import pyseccomp as sc

    f = sc.SyscallFilter(sc.ALLOW)
    f.add_rule(sc.KILL_PROCESS, "exit_group", sc.Arg(0, sc.MASKED_EQ, 0xFF, 0))
    return _export(f)


KNOWN_NUMBERS = {
    "x86_64": {"pivot_root": 155, "mount_setattr": 442},
    "aarch64": {"pivot_root": 41, "mount_setattr": 442},
}
"""Used when libseccomp is missing (the namespace layers do not need it)."""


@lru_cache(maxsize=1)
def syscall_numbers() -> dict[str, int]:
    """Native numbers of the raw system calls the runner makes (empty when unknown: no mount namespace)."""
    if available() is None:
        import pyseccomp as sc

        return {name: sc.resolve_syscall(sc.Arch.NATIVE, name) for name in RUNNER_SYSCALLS}
    return KNOWN_NUMBERS.get(platform.machine(), {})


def _add_if_known(f, action: int, name: str) -> None:  # noqa: ANN001 (pyseccomp.SyscallFilter)
    """Add a refusal; a call this architecture does not have is skipped."""
    import pyseccomp as sc

    try:
        if sc.resolve_syscall(sc.Arch.NATIVE, name) < 0:
            return
    except (ValueError, RuntimeError, OSError):
        return
    f.add_rule(action, name)


def _export(f) -> bytes:  # noqa: ANN001 (pyseccomp.SyscallFilter)
    """The filter as raw BPF (``seccomp_export_bpf`` writes to a file descriptor)."""
    with tempfile.TemporaryFile() as out:
        f.export_bpf(out)
        out.seek(0)
        return out.read()
