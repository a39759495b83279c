"""Hostile programs against the code sandbox, all run at once: none may pass, change a file outside its
own /tmp, leak /etc/passwd, signal a process outside, or leave a process behind. Each program asserts that
its attack worked, so a pass would be an escape (or a forged pass). Then generated correct programs of
every output shape must all pass.

The attacks are those found against the audit-hook-only sandbox (process creation without audit events,
``dir_fd``/``fchdir`` path tricks, replacing the hook's ``realpath``, pidfd signals, forged exits,
unbounded output, disk filling) and the usual ones (fork bombs, sockets, ctypes, privilege changes)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from mtpeft.metrics.sandbox import ProgramResult, SandboxLimits, run_programs, sandbox_layers

LIMITS = SandboxLimits(timeout=3.0, memory_mb=512, workers=4)
MARKER = f"mtpeftsbx{uuid.uuid4().hex[:12]}"
"""In every command line a hostile program tries to start: no process with it may survive."""
HUNT = (
    "import os\ncands = {{v for v in values if isinstance(v, (bytes, str)) and len(v) == 32}}\n"
    "for fd in range(3, 64):\n    for c in cands:\n        try:\n"
    "            os.write(fd, b'done ' + (c if isinstance(c, bytes) else c.encode()) + b'\\n')\n"
    "        except OSError:\n            pass\nos._exit(0)\n"
)
"""Tail of the token hunts: write every 32-character candidate as the runner's "done" line, exit 0."""

FORK_EXEC = (
    "import _posixsubprocess, os\nr, w = os.pipe()\n"
    "pid = _posixsubprocess.fork_exec([b'/bin/sh', b'-c', {cmd!r}], [b'/bin/sh'], True, (), None, None,"
    " -1, -1, -1, -1, -1, -1, r, w, True, {setsid}, -1, None, None, None, -1, None, False)\n"
    "import time\ntime.sleep(0.5)\nassert os.path.exists({proof!r})\n"
)

HOSTILE: dict[str, str] = {
    # process creation (fork_exec has no audit event; seccomp refuses clone without CLONE_THREAD)
    "fork_exec_shell": FORK_EXEC.format(
        cmd="cat /etc/passwd > {dir}/stolen; echo x > {dir}/pwned", setsid=False, proof="{dir}/pwned"
    ),
    "fork_exec_setsid_sleep": FORK_EXEC.format(cmd="sleep 30 # {marker}", setsid=True, proof="/nonexistent"),
    "os_fork": "import os\npid = os.fork()\nassert pid >= 0\n",
    "fork_bomb": "import os\nwhile True:\n    os.fork()\n",
    "forkpty": "import os\nos.forkpty()\n",
    "posix_spawn": "import os\nos.posix_spawn('/bin/sleep', ['sleep', '30', '{marker}'], {{}})\n",
    "os_system": "import os\nassert os.system('sleep 30 # {marker}') == 0\n",
    "subprocess_run": "import subprocess\nsubprocess.run(['sleep', '30', '{marker}'], check=True)\n",
    "popen_shell": "import subprocess\nprint(subprocess.check_output('cat /etc/passwd', shell=True))\n",
    "multiprocessing_spawn": (
        "import multiprocessing as mp\np = mp.get_context('spawn').Process(target=print)\np.start()\n"
        "p.join()\nassert p.exitcode == 0\n"
    ),
    "multiprocessing_fork": "import multiprocessing as mp\nmp.get_context('fork').Process(target=print).start()\n",
    "process_pool": (
        "from concurrent.futures import ProcessPoolExecutor\n"
        "with ProcessPoolExecutor(1) as ex:\n    assert ex.submit(abs, -1).result() == 1\n"
    ),
    "execv_true": "import os\nos.execv('/bin/true', ['true'])\n",
    "pty_spawn": "import pty\npty.spawn(['/bin/sh', '-c', 'sleep 30 # {marker}'])\n",
    # signals to processes outside
    "kill_victim": "import os\nos.kill({victim}, 9)\nassert False, 'no error'\n",
    "kill_parent": "import os\nos.kill(os.getppid(), 9)\nassert os.getppid() != 0\n",
    "killpg_own_group": "import os\nos.killpg(0, 9)\n",
    "kill_everyone": "import os\nos.kill(-1, 9)\n",
    "pidfd_victim": "import os, signal\nsignal.pidfd_send_signal(os.pidfd_open({victim}), 9)\n",
    "pidfd_getfd": "import os\nos.pidfd_open(1)\n",
    "pthread_kill": "import signal, threading\nsignal.pthread_kill(threading.get_ident(), 0)\nassert False\n",
    "kill_self_then_fail": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\nassert False\n",
    # files outside the working directory
    "read_passwd": "print(open('/etc/passwd').read())\n",
    "read_passwd_dir_fd": (
        "import os\nfd = os.open('/etc', os.O_RDONLY)\n"
        "data = open('passwd', opener=lambda p, f: os.open(p, f, dir_fd=fd)).read()\nprint(data)\n"
    ),
    "read_passwd_fchdir": (
        "import os\nos.fchdir(os.open('/etc', os.O_RDONLY))\nprint(open('passwd').read())\n"
    ),
    "write_canary_dir_fd": (
        "import os\nfd = os.open({dir!r}, os.O_RDONLY)\n"
        "with open('canary.txt', 'w', opener=lambda p, f: os.open(p, f, dir_fd=fd)) as out:\n"
        "    out.write('dead')\n"
    ),
    "unlink_canary_dir_fd": "import os\nos.unlink('canary.txt', dir_fd=os.open({dir!r}, os.O_RDONLY))\n",
    "realpath_code_swap": (
        "import posixpath\nposixpath.realpath.__code__ = (lambda path, strict=False: '/tmp/x').__code__\n"
        "open({canary!r}, 'w').write('dead')\n"
    ),
    "realpath_rebind": (
        "import os, posixpath\nposixpath.realpath = lambda p, strict=False: '/tmp/x'\n"
        "os.path.realpath = posixpath.realpath\nopen({canary!r}, 'w').write('dead')\n"
    ),
    "mkfifo_outside": "import os\nos.mkfifo({dir!r} + '/fifo')\n",
    "mkfifo_inside": "import os\nos.mkfifo('fifo')\nassert os.path.exists('fifo')\n",
    "mknod_dev": "import os, stat\nos.mknod('sda', stat.S_IFBLK | 0o600, os.makedev(8, 0))\n",
    "remove_canary": "import os\nos.remove({canary!r})\n",
    "rmtree_dir": "import shutil\nshutil.rmtree({dir!r})\n",
    "rename_canary": "import os\nos.rename({canary!r}, 'stolen')\n",
    "symlink_canary": "import os\nos.symlink({canary!r}, 'link')\nopen('link', 'w').write('dead')\n",
    "hardlink_canary": "import os\nos.link({canary!r}, 'hard')\nopen('hard', 'w').write('dead')\n",
    "chmod_canary": "import os\nos.chmod({canary!r}, 0o777)\n",
    "utime_canary": "import os\nos.utime({canary!r}, (0, 0))\n",
    "truncate_canary": "import os\nos.truncate({canary!r}, 0)\n",
    "append_canary": "open({canary!r}, 'a').write('dead')\n",
    "read_canary": "print(open({canary!r}).read())\nassert False\n",
    "write_new_outside": "open({dir!r} + '/new.txt', 'w').write('x')\n",
    "write_repo": "open({repo!r} + '/{marker}.txt', 'w').write('x')\n",
    "write_dev_shm": "open('/dev/shm/{marker}', 'w').write('x')\n",
    "write_var_tmp": "open('/var/tmp/{marker}', 'w').write('x')\n",
    "write_usr": "open('/usr/{marker}', 'w').write('x')\n",
    "write_root_tmpfs": "import os\nos.mkdir('/{marker}')\n",
    "proc_environ": "print(open('/proc/1/environ').read())\n",
    "proc_mem": "open('/proc/self/mem', 'rb')\n",
    "listdir_root_raw": "import os\nassert 'etc' in os.listdir(os.open('/', os.O_RDONLY))\n",
    "disk_fill": (
        "for i in range(40):\n    with open(f'big{{i}}', 'wb') as out:\n        out.write(b'x' * 8 * 2**20)\n"
    ),
    "file_over_fsize": "open('huge', 'wb').write(b'x' * 40 * 2**20)\n",
    "inode_fill": "for i in range(20000):\n    open(f'f{{i}}', 'w').close()\n",
    # privileges, namespaces, mounts
    "setuid_root": "import os\nos.setuid(0)\nassert os.getuid() == 0\n",
    "setgid": "import os\nos.setgid(0)\n",
    "chroot": "import os\nos.chroot('/tmp')\n",
    "ctypes_unshare": "import ctypes\nassert ctypes.CDLL(None).unshare(0x10000000) == 0\n",
    "ctypes_importlib_kill": (
        "import importlib\nlibc = importlib.import_module('ctypes').CDLL(None)\nassert libc.kill({victim}, 9) == 0\n"
    ),
    "ctypes_exit_group_0": "import importlib\nimportlib.import_module('ctypes').CDLL(None).syscall(231, 0)\n",
    "ctypes_sysmodules": "import sys\nassert 'ctypes' in sys.modules\nsys.modules['ctypes'].CDLL(None)\n",
    "native_code_from_tmp": (
        "import shutil, sys, glob\nso = glob.glob(sys.base_prefix + '/lib/python3*/lib-dynload/_json*.so')[0]\n"
        "shutil.copy(so, '/tmp/_json.' + so.split('_json.', 1)[1])\nsys.path.insert(0, '/tmp')\n"
        "sys.modules.pop('_json', None)\nimport _json\nassert _json.__file__.startswith('/tmp')\n"
    ),
    # network
    "tcp_connect": "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n",
    "udp_socket": "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('8.8.8.8', 53))\n",
    "unix_socket": "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect('/run/systemd/notify')\n",
    "getaddrinfo": "import socket\nsocket.getaddrinfo('example.com', 80)\n",
    "urlopen": "import urllib.request\nurllib.request.urlopen('http://example.com', timeout=1)\n",
    # forged passes
    "os_exit_patched_then_fail": "import os\nos._exit = lambda *a: None\nassert False\n",
    "os_exit_0": "import os\nos._exit(0)\nassert False\n",
    "os_exit_256": "import os\nos._exit(256)\n",
    "sys_exit_0": "import sys\nsys.exit(0)\nassert False\n",
    "raise_system_exit": "raise SystemExit\n",
    "atexit_exit_0": "import atexit, os\natexit.register(lambda: os._exit(0))\nassert False\n",
    "thread_exits_0": (
        "import os, threading, time\nthreading.Thread(target=lambda: os._exit(0)).start()\n"
        "time.sleep(0.5)\nassert False\n"
    ),
    "excepthook_swallow": "import sys\nsys.excepthook = lambda *a: None\nassert False\n",
    "fake_done_on_all_fds": (
        "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'done ' + b'0' * 32 + b'\\n')\n"
        "    except OSError:\n        pass\nos._exit(0)\n"
    ),
    "frame_walk_token": (
        "import sys\nf = sys._getframe()\nvalues = []\nwhile f is not None:\n"
        "    values += f.f_locals.values()\n    f = f.f_back\n" + "{hunt}"
    ),
    "finalizer_in_main_thread": (
        "import sys, threading, time\nme = threading.get_native_id()\nclass Bomb:\n"
        "    def __init__(self):\n        self.me = self\n    def __del__(self):\n"
        "        if threading.get_native_id() == me:\n            return\n        values = []\n"
        "        f = sys._getframe()\n        while f is not None:\n            values += f.f_locals.values()\n"
        "            f = f.f_back\n{hunt_in_method}"
        "for _ in range(100000):\n    Bomb()\n    if _ % 1000 == 0:\n        time.sleep(0.002)\n"
        "time.sleep(0.5)\nassert False\n"
    ),
    "audit_hook_in_main_thread": (
        "import sys, threading, time\nme = threading.get_native_id()\ndef spy(event, args):\n"
        "    if threading.get_native_id() == me:\n        return\n    values = []\n"
        "    f = sys._getframe()\n    while f is not None:\n        values += f.f_locals.values()\n"
        "        f = f.f_back\n{hunt_in_function}\nsys.addaudithook(spy)\ntime.sleep(0.5)\nassert False\n"
    ),
    "current_frames_token": (
        "import sys\nvalues = []\nfor f in sys._current_frames().values():\n    while f is not None:\n"
        "        values += f.f_locals.values()\n        f = f.f_back\n" + "{hunt}"
    ),
    "gc_walk_token": (
        "import gc\nvalues = [v for o in gc.get_objects() if isinstance(o, (dict, list, tuple))\n"
        "          for v in (o.values() if isinstance(o, dict) else o)]\n" + "{hunt}"
    ),
    "settrace": "import sys\nsys.settrace(lambda *a: None)\nassert sys.gettrace() is not None\n",
    "interrupt_main_then_fail": "import _thread, time\n_thread.interrupt_main()\ntime.sleep(0.3)\nassert False\n",
    "signal_handler_then_fail": "import signal\nsignal.signal(signal.SIGUSR1, print)\n",
    "builtins_assert_swap": "import builtins\nbuiltins.AssertionError = None\nassert False\n",
    # resources
    "infinite_loop": "while True:\n    pass\n",
    "c_loop": "sum(iter(int, 1))\n",
    "memory_bomb": "x = bytearray(4 * 1024 ** 3)\n",
    "thread_bomb": (
        "import threading, time\nfor _ in range(100000):\n"
        "    threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n"
    ),
    "fd_exhaustion": "fs = [open('/dev/null') for _ in range(100000)]\n",
}


HOOK_ONLY = {"settrace"}
"""Stopped by the audit hook only: tracing one's own code is no escape, so the kernel layers allow it."""


@pytest.fixture(scope="module", params=[True, False], ids=["all_layers", "kernel_layers_only"])
def attack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Canary files, a victim process, and every hostile program's result (run concurrently), with the
    audit hook and without it (the kernel layers must hold on their own)."""
    outside = tmp_path_factory.mktemp("outside")
    os.chmod(outside, 0o777)  # even a program running as nobody would be allowed to write here
    canary = outside / "canary.txt"
    canary.write_text("alive")
    os.chmod(canary, 0o666)
    victim = subprocess.Popen(["sleep", "300"])
    children = _children()  # the victim included
    repo = str(Path(__file__).resolve().parent.parent)
    fields = {
        "dir": str(outside),
        "canary": str(canary),
        "marker": MARKER,
        "victim": victim.pid,
        "repo": repo,
    }
    fields["hunt"] = HUNT.format(**fields)
    fields["hunt_in_method"] = textwrap.indent(fields["hunt"], " " * 8)
    fields["hunt_in_function"] = textwrap.indent(fields["hunt"], " " * 4)
    before = _snapshot(outside)
    programs = [HOSTILE[name].format(**fields) for name in HOSTILE]
    started = time.perf_counter()
    limits = dataclasses.replace(LIMITS, audit_hook=request.param)
    results = dict(zip(HOSTILE, run_programs(programs, limits), strict=True))
    seconds = time.perf_counter() - started
    yield {
        "results": results,
        "outside": outside,
        "canary": canary,
        "before": before,
        "victim": victim,
        "children": children,
        "seconds": seconds,
        "repo": repo,
        "audit_hook": request.param,
    }
    victim.kill()
    victim.wait()


def test_there_are_at_least_60_attacks() -> None:
    assert len(HOSTILE) >= 60


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_no_hostile_program_passes(attack: dict, name: str) -> None:
    result: ProgramResult = attack["results"][name]
    if name in HOOK_ONLY and not attack["audit_hook"]:
        pytest.skip("no escape: only the audit hook refuses it")
    assert not result.passed, (name, result)
    assert _passwd_line() not in result.stdout + result.stderr


def test_nothing_outside_changed_and_nothing_escaped(attack: dict) -> None:
    assert attack["canary"].read_text() == "alive"
    assert _snapshot(attack["outside"]) == attack["before"]
    assert not list(Path(attack["repo"]).glob(f"{MARKER}*"))
    assert not Path(f"/dev/shm/{MARKER}").exists() and not Path(f"/var/tmp/{MARKER}").exists()
    assert not Path(f"/usr/{MARKER}").exists() and not Path(f"/{MARKER}").exists()


def test_no_process_outside_was_signalled_and_none_was_left(attack: dict) -> None:
    assert attack["victim"].poll() is None  # the unrelated process is alive
    deadline = time.monotonic() + 5
    while (_marked() or _children() > attack["children"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _marked() == []
    assert _children() == attack["children"]


def test_forged_passes_fail_for_the_right_reason(attack: dict) -> None:
    results = attack["results"]
    assert results["os_exit_0"].detail == "killed by signal 31"  # SIGSYS: the exit guard
    assert results["os_exit_256"].detail == "killed by signal 31"
    assert results["fake_done_on_all_fds"].reason == "error"
    assert results["os_exit_patched_then_fail"].detail == "exit status 1"
    assert "AssertionError" in results["os_exit_patched_then_fail"].stderr


def test_every_layer_was_active_in_every_run(attack: dict) -> None:
    expected = {layer for layer, active in sandbox_layers().items() if active}
    if not attack["audit_hook"]:
        expected.discard("audit_hook")
    for name, result in attack["results"].items():
        if result.reason != "timeout":
            assert expected <= set(result.layers), name


def test_all_layers_are_active_on_this_machine() -> None:
    """CI and the developers' machines (Linux, util-linux era kernels, libseccomp) have every layer."""
    if sys.platform != "linux":
        pytest.skip("the kernel layers are Linux-only")
    layers = sandbox_layers()
    assert all(layers.values()), [layer for layer, active in layers.items() if not active]


def _snapshot(folder: Path) -> dict[str, tuple]:
    """Every path under ``folder`` with its content, mode and modification time."""
    out = {}
    for path in sorted(folder.rglob("*")):
        info = path.lstat()
        out[str(path)] = (path.read_bytes() if path.is_file() else None, info.st_mode, info.st_mtime_ns)
    return out


def _passwd_line() -> str:
    """The first line of the host's /etc/passwd (what a leak would contain)."""
    return Path("/etc/passwd").read_text().splitlines()[0]


def _marked() -> list[int]:
    """Processes whose command line holds the marker."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if MARKER.encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


def _children() -> int:
    """Processes whose parent is this test process."""
    me = f"PPid:\t{os.getpid()}\n"
    count = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            count += me in status.read_text()
        except OSError:
            continue
    return count
