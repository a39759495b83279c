"""The sandbox runner: the code that runs *inside* ``python -I -S`` for one untrusted program.

It imports nothing but the standard library (the sandbox interpreter runs without site packages and
without mtpeft on its path): ``mtpeft.metrics.sandbox`` starts ``python -I -S -c`` with a line that imports
this file from its directory (so its bytecode cache is used) and calls ``main()``, and writes a ``marshal``
header (token, limits, layers to set up, seccomp programs) and the program on standard input.

Process tree (one per program)::

    evaluating process (mtpeft)            reads stdout/stderr (capped) and the verdict pipe
    └── supervisor  (this file, main())    new user/PID/net/IPC/UTS namespaces; waits, decides the verdict
        ├── map helper (root only)         writes the supervisor's uid/gid maps from the parent namespace
        └── program process (PID 1)        own mount namespace, read-only root, tmpfs /tmp, nobody, no
            ├── main thread                capabilities, rlimits, seccomp; waits for the program thread
            └── program thread             its own seccomp filter: it cannot end the process with status 0

The verdict is decided by the supervisor, a separate process the program can neither see (PID
namespace) nor signal (seccomp). A program passes only if its process exits with status 0 *and* its main
thread wrote the run's secret token to the done pipe. The main thread does that only after the program
thread has ended (the kernel no longer knows its thread id), and the program thread ends
normally only if ``exec`` of the program returned: any exception, ``SystemExit`` included, makes it call the
``os._exit`` captured before the program ran. The program thread's seccomp filter kills the whole process
on ``exit_group`` with a status whose low byte is 0, so ``os._exit(0)`` (or ``os._exit(256)``) half way is a
failure even if the program found the token. (Ending only the program thread early with a raw ``exit``
system call would need native code: ctypes is refused by the audit hook, /tmp is noexec, execve is refused.)
"""

from __future__ import annotations

import _thread
import marshal
import os
import sys
import time

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
MNT_DETACH, AT_FDCWD, AT_RECURSIVE = 2, -100, 0x8000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 1, 2, 4
PR_SET_PDEATHSIG, PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS, SECCOMP_MODE_FILTER = 1, 22, 38, 2
NOBODY = 65534
DEVICES = ("null", "zero", "full", "random", "urandom")
FORBIDDEN_EVENTS = frozenset(
    (
        "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill",
        "os.killpg", "subprocess.Popen", "pty.spawn", "signal.pthread_kill", "socket.connect",
        "socket.bind", "socket.getaddrinfo", "socket.sendto", "ctypes.dlopen", "ctypes.dlsym",
        "ctypes.cdata", "ctypes.call_function", "sys._current_frames", "gc.get_objects",
        "gc.get_referrers", "gc.get_referents", "sys.setprofile", "sys.settrace", "os.setuid",
        "os.chroot", "resource.setrlimit", "os.putenv", "os.unsetenv", "sys.addaudithook",
    )
)  # fmt: skip
PATH_EVENTS = frozenset(
    (
        "os.remove", "os.rmdir", "os.rename", "os.mkdir", "os.chmod", "os.chown", "os.truncate",
        "os.symlink", "os.link", "os.utime", "shutil.rmtree", "os.chdir",
    )
)  # fmt: skip
FFI = ("ctypes", "_ctypes", "cffi")
"""Modules whose import the hook refuses (``importlib.import_module`` raises no import event, but every
use of ctypes does: ``ctypes.*`` events are all refused)."""
LISTING_EVENTS = frozenset(("os.listdir", "os.scandir"))  # the import system lists stdlib dirs


class Libc:
    """The few libc calls the standard library lacks (unshare, mount, pivot_root, prctl, capset).

    ctypes is imported here, before the program runs; ``forget_ctypes`` drops it again so that the program
    cannot reach it (the audit hook then refuses a fresh import)."""

    def __init__(self, numbers: dict) -> None:
        import ctypes

        self.ctypes = ctypes
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.numbers = numbers

    def check(self, result: int, what: str) -> int:
        """Raise OSError naming the call when libc returned -1."""
        if result == -1:
            err = self.ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")
        return result

    def unshare(self, flags: int) -> None:
        """unshare(2)."""
        self.check(self.libc.unshare(flags), "unshare")

    def mount(
        self, source: str | None, target: str, fstype: str | None, flags: int, data: str | None
    ) -> None:
        """mount(2)."""
        enc = [None if value is None else value.encode() for value in (source, target, fstype, data)]
        ulong = self.ctypes.c_ulong(flags)
        self.check(self.libc.mount(enc[0], enc[1], enc[2], ulong, enc[3]), f"mount {target}")

    def umount(self, target: str) -> None:
        """umount2(2) with MNT_DETACH."""
        self.check(self.libc.umount2(target.encode(), MNT_DETACH), f"umount {target}")

    def syscall(self, name: str, *args: object) -> int:
        """A raw system call by name (numbers resolved by the evaluating process)."""
        if name not in self.numbers:
            raise OSError(38, f"{name}: system call number unknown on this architecture")
        c_long = self.ctypes.c_long
        cargs = [c_long(a) if isinstance(a, int) else a for a in args]
        return self.check(self.libc.syscall(c_long(self.numbers[name]), *cargs), name)

    def readonly_tree(self, path: str) -> None:
        """Make a bind-mounted tree read-only, submounts included (mount_setattr, Linux >= 5.12)."""
        ctypes = self.ctypes
        attr = (ctypes.c_uint64 * 4)(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, 0, 0, 0)
        args = (AT_FDCWD, path.encode(), AT_RECURSIVE, ctypes.byref(attr), ctypes.sizeof(attr))
        self.syscall("mount_setattr", *args)

    def prctl(self, option: int, value: int) -> None:
        """prctl(2) with one argument."""
        c_ulong = self.ctypes.c_ulong
        self.check(self.libc.prctl(option, c_ulong(value), c_ulong(0), c_ulong(0), c_ulong(0)), "prctl")

    def seccomp(self, bpf: bytes) -> None:
        """Load a classic BPF seccomp program (exported by libseccomp) on the calling thread."""
        ctypes = self.ctypes

        class Prog(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

        buffer = ctypes.create_string_buffer(bpf, len(bpf))
        prog = Prog(len(bpf) // 8, ctypes.addressof(buffer))
        self.check(self.libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0), "seccomp")

    def drop_capabilities(self) -> None:
        """capset(2) to empty effective, permitted and inheritable sets (version 3 header)."""
        ctypes = self.ctypes
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)
        data = (ctypes.c_uint32 * 6)()
        self.check(self.libc.capset(ctypes.byref(header), ctypes.byref(data)), "capset")


def forget_ctypes() -> None:
    """Remove ctypes from ``sys.modules``; re-importing it is then an audited (refused) import."""
    for name in [name for name in sys.modules if name == "ctypes" or name.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[name]


def read_input() -> tuple[dict, str]:
    """The header (length-prefixed marshal) and the program, from standard input."""
    chunks = []
    while chunk := os.read(0, 1 << 16):
        chunks.append(chunk)
    data = b"".join(chunks)
    size = int.from_bytes(data[:4], "big")
    return marshal.loads(data[4 : 4 + size]), data[4 + size :].decode(errors="surrogatepass")


def write_map(pid: int | str, name: str, text: str) -> None:
    """Write one of /proc/PID/{uid_map,gid_map,setgroups}."""
    fd = os.open(f"/proc/{pid}/{name}", os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def enter_namespaces(libc: Libc, header: dict) -> None:
    """New user, PID, network, IPC and UTS namespaces for this supervisor (the PID namespace holds its
    next child). As root, a helper forked first writes the maps from the parent namespace: uid/gid 0 and
    65534 map to themselves, so the program can drop to nobody. Otherwise the caller maps to root inside."""
    flags = CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
    if not header["nobody"]:
        uid, gid = os.geteuid(), os.getegid()
        libc.unshare(flags)
        write_map("self", "setgroups", "deny")
        write_map("self", "uid_map", f"0 {uid} 1\n")
        write_map("self", "gid_map", f"0 {gid} 1\n")
        return
    ready_r, ready_w = os.pipe()
    me = os.getpid()
    helper = os.fork()
    if helper == 0:
        try:
            os.close(ready_w)
            if os.read(ready_r, 1) == b"1":
                for name in ("uid_map", "gid_map"):
                    write_map(me, name, f"0 0 1\n{NOBODY} {NOBODY} 1\n")
                os._exit(0)
        finally:
            os._exit(1)
    os.close(ready_r)
    try:
        libc.unshare(flags)
    finally:
        os.write(ready_w, b"1")
        os.close(ready_w)
        _, status = os.waitpid(helper, 0)
    if status != 0:
        raise OSError("could not write the namespace's uid/gid maps")


def build_root(libc: Libc, header: dict) -> None:
    """A fresh mount namespace whose root is a small read-only tmpfs holding read-only bind mounts of the
    interpreter and system libraries, /dev/{null,zero,full,random,urandom} and a size-capped tmpfs /tmp.
    Nothing else of the host's file system (no /etc, /home, /proc, the repository) is visible."""
    libc.unshare(CLONE_NEWNS)
    libc.mount(None, "/", None, MS_REC | MS_PRIVATE, None)
    new = header["mountpoint"]
    libc.mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=4096,mode=0755")
    for source in header["binds"]:
        target = new + source
        if os.path.islink(source):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.symlink(os.readlink(source), target)
            continue
        os.makedirs(target, exist_ok=True)
        libc.mount(source, target, None, MS_BIND | MS_REC, None)
        try:
            libc.readonly_tree(target)
        except OSError:  # no mount_setattr (Linux < 5.12): the top mount only, keeping its locked flags
            flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
            libc.mount(None, target, None, flags | (os.statvfs(target).f_flag & MS_NOEXEC), None)
    os.makedirs(new + "/dev")
    for device in DEVICES:
        os.close(os.open(f"{new}/dev/{device}", os.O_CREAT | os.O_WRONLY, 0o644))
        libc.mount(f"/dev/{device}", f"{new}/dev/{device}", None, MS_BIND, None)
    os.makedirs(new + "/tmp")
    size = f"size={header['disk_mb']}m,nr_inodes={header['inodes']},mode=1777"
    libc.mount("tmpfs", new + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, size)  # no native code
    os.chdir(new)
    libc.syscall("pivot_root", b".", b".")
    libc.umount(".")  # the old root, stacked on top of the new one by pivot_root(".", ".")
    os.chdir("/")
    libc.mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, None)


def drop_privileges(libc: Libc, header: dict) -> list[str]:
    """nobody (as root) and no capabilities; returns the layers this set up."""
    layers = []
    if header["nobody"]:
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)
        layers.append("nobody")
    libc.drop_capabilities()
    layers.append("no_capabilities")
    return layers


def set_limits(limits: dict) -> None:
    """soft = hard, so the program cannot raise them again."""
    import resource

    for name, value in limits.items():
        resource.setrlimit(getattr(resource, name), (value, value))


def make_audit_hook(root: str, readable: tuple[str, ...]):  # noqa: ANN201 (returns the hook)
    """The PEP 578 hook (an extra layer, not the boundary): refuses processes, signals, ctypes, frame and
    object walks, network sockets, and file access outside ``root`` (reading ``readable`` is allowed)."""
    realpath, sep, fspath = os.path.realpath, os.sep, os.fspath

    def inside(path: object, roots: tuple[str, ...]) -> bool:
        if isinstance(path, int):
            return True  # an already open file descriptor
        try:
            real = realpath(fspath(path))
        except Exception:
            return False
        return any(real == r or real.startswith(r + sep) for r in roots)

    def guarded(function: object) -> bool:
        return getattr(function, "__module__", None) in ("posixpath", "genericpath", "os", "stat")

    def hook(event: str, args: tuple) -> None:
        if event in FORBIDDEN_EVENTS or event.startswith("ctypes.") or event == "import" and args[0] in FFI:
            raise PermissionError("sandbox: " + event + " is not allowed")
        if event == "socket.__new__" and args[1] != 1:  # AF_UNIX socketpairs (asyncio) only
            raise PermissionError("sandbox: network sockets are not allowed")
        if event == "open":
            path, mode = args[0], args[1] or "r"
            write = any(c in str(mode) for c in "wax+") or (isinstance(args[2], int) and args[2] & 0o3)
            if path is not None and not inside(path, (root,) if write else (root, *readable)):
                raise PermissionError("sandbox: cannot open " + str(path))
        elif event in PATH_EVENTS or event in LISTING_EVENTS:
            roots = (root, *readable) if event in LISTING_EVENTS else (root,)
            for path in args:
                if isinstance(path, (str, bytes, os.PathLike)) and not inside(path, roots):
                    raise PermissionError("sandbox: " + event + " outside the working directory")
        elif event == "object.__setattr__" and (
            args[0] is hook or args[1] == "__code__" and guarded(args[0])
        ):
            raise PermissionError("sandbox: the audit hook and the path functions it uses are read-only")

    return hook


def program_process(header: dict, source: str, libc: Libc, done: int) -> None:
    """The child that runs the program; never returns."""
    _exit, write = os._exit, os.write
    token = header["token"]
    try:
        layers = []
        if header["isolate"]:
            build_root(libc, header)
            layers += ["mount_ns", "readonly_root", "tmpfs_disk_cap"]
            layers += drop_privileges(libc, header)
        libc.prctl(PR_SET_PDEATHSIG, 9)  # after the uid change, which clears it
        os.chdir(header["workdir"])
        set_limits(header["limits"])
        layers.append("rlimits")
        libc.prctl(PR_SET_NO_NEW_PRIVS, 1)
        if header["bpf_process"]:
            libc.seccomp(header["bpf_process"])
            layers.append("seccomp")
        if header["bpf_thread"]:
            layers.append("exit_guard")
        if header["audit_hook"]:
            layers.append("audit_hook")
        import _signal

        _signal.signal(_signal.SIGINT, _signal.SIG_IGN)  # no Python-level handler can run in this thread
        write(done, ("layers " + ",".join(layers) + "\n").encode())
        hook = make_audit_hook(header["workdir"], tuple(header["readable"])) if header["audit_hook"] else None
        box: list = [source, libc, header["bpf_thread"], hook]
        ready = _thread.allocate_lock()
        ready.acquire()
        del source, libc, hook
        header.clear()
    except BaseException as err:
        try:
            write(2, f"sandbox setup failed: {err!r}\n".encode())
        finally:
            _exit(1)
    supervise(box, ready, done, token)


def supervise(box: list, ready: _thread.LockType, done: int, token: bytes) -> None:
    """The main thread from the program's start: wait until the kernel no longer knows the program
    thread, then write the token and exit 0.

    Once the program runs, this thread executes nothing the program could have replaced or reached: every
    function is bound before the program starts (no module attribute, global or builtin lookups), and the
    waiting loop allocates no objects that the garbage collector tracks, so no finalizer of the program can
    run here, and raises no audit event, so no audit hook the program added runs here; Python-level signal handlers run only in this thread and none is set (SIGINT is ignored, and
    ``signal.signal`` refuses other threads). Thread ids are not reused: the PID namespace is fresh and
    cannot fork. (A lock or the ``threading`` module's records would be Python objects the program could
    reach or replace.)"""
    _exit, write, gone, getscheduler = os._exit, os.write, ProcessLookupError, os.sched_getscheduler
    start, stack_size, pause = _thread.start_new_thread, _thread.stack_size, _thread.allocate_lock()
    pause.acquire()
    sleep = pause.acquire  # sleep(True, seconds): a timed wait that raises no audit event (time.sleep may)
    try:
        stack_size(64 * 2**20)  # the program thread only: deep recursion
        start(program_thread, (box, ready))
        stack_size(0)
        ready.acquire()  # the program thread has handed over its id and is about to run the program
        thread_id = box.pop()
        if box:
            _exit(1)
        while True:
            try:
                getscheduler(thread_id)
            except gone:
                break
            sleep(True, 0.001)
        write(done, b"done " + token + b"\n")
    except BaseException:
        _exit(1)
    _exit(0)


def program_thread(box: list, ready: _thread.LockType) -> None:
    """Run the program; only a normal return of ``exec`` ends this thread, anything else exits 1."""
    _exit = os._exit
    try:
        source, libc, bpf, hook = box
        box.clear()
        box.append(_thread.get_native_id())
        if bpf:
            libc.seccomp(bpf)  # this thread (and threads it starts) cannot exit the process with status 0
        del libc, bpf
        forget_ctypes()
        if hook is not None:
            sys.addaudithook(hook)
        del hook, box
        ready.release()
        del ready
    except BaseException as err:
        try:
            os.write(2, f"sandbox setup failed: {err!r}\n".encode())
        finally:
            _exit(1)
    try:
        exec(compile(source, "<program>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    except BaseException:  # SystemExit included: leaving early is a failure; a SyntaxError too
        try:
            sys.excepthook(*sys.exc_info())
            sys.stderr.flush()
        finally:
            _exit(1)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass


def wait_for(pid: int, timeout: float) -> int | None:
    """The child's wait status, or None when it is still running after ``timeout`` seconds."""
    import select

    try:
        fd = os.pidfd_open(pid)
    except OSError:
        fd = None
    if fd is not None:
        try:
            select.select([fd], [], [], timeout)
        finally:
            os.close(fd)
        done, status = os.waitpid(pid, os.WNOHANG)
        return status if done else None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.002)
    return None


def verdict(status: int | None, done_lines: list[bytes], token: bytes) -> tuple[bool, str, str]:
    """Pass only for exit status 0 *and* the token written after the program thread ended.
    Returns (passed, reason: ok | error | timeout | early_exit, detail)."""
    if status is None:
        return False, "timeout", ""
    finished = b"done " + token in done_lines
    if os.WIFEXITED(status):
        code = os.WEXITSTATUS(status)
        if code == 0:
            return (True, "ok", "") if finished else (False, "early_exit", "exit status 0 before the end")
        return False, "error", f"exit status {code}"
    return False, "error", f"killed by signal {os.WTERMSIG(status)}"


def read_all(fd: int) -> bytes:
    """Everything left in a pipe whose writers are gone."""
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def main() -> None:
    """Supervisor: set up namespaces, fork the program process, wait, report the verdict on the
    verdict descriptor (a marshal dict). Exits 0 when it could report, whatever the program did."""
    header, source = read_input()
    report = header["verdict_fd"]
    token = header["token"]
    result = {"passed": False, "reason": "error", "detail": "sandbox setup", "layers": []}
    try:
        libc = Libc(header["syscalls"])
        namespaces = []
        if header["isolate"]:
            enter_namespaces(libc, header)
            namespaces = ["user_ns", "pid_ns", "net_ns", "ipc_ns", "uts_ns"]
        libc.prctl(PR_SET_PDEATHSIG, 9)  # the evaluating process gone (killed), this supervisor goes too
        done_r, done_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(done_r)
            os.close(report)
            program_process(header, source, libc, done_w)
        os.close(done_w)
        status = wait_for(pid, header["timeout"])
        if status is None:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        lines = read_all(done_r).split(b"\n")
        layers = lines[0][len(b"layers ") :].decode(errors="replace").split(",") if lines else []
        if lines and not lines[0].startswith(b"layers "):
            layers = []
        passed, reason, detail = verdict(status, lines[1:], token)
        layers = namespaces + [x for x in layers if x]
        result = {"passed": passed, "reason": reason, "detail": detail, "layers": layers}
    except OSError as err:
        result["detail"] = f"sandbox setup: {err}"
    os.write(report, marshal.dumps(result))
    os._exit(0)


if __name__ == "__main__":
    main()
