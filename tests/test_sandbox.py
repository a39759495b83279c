"""The code sandbox contains hostile programs: each one below fails (and nothing outside it changes),
while ordinary programs pass. Limits are short so the whole file runs in a few seconds."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from mtpeft.metrics.sandbox import SandboxLimits, run_programs

FAST = SandboxLimits(timeout=2.0, memory_mb=512, workers=4)


def _run(program: str) -> tuple[bool, str]:
    (result,) = run_programs([program], FAST)
    return result.passed, result.reason


def test_ordinary_programs_pass_and_errors_fail() -> None:
    assert _run(
        "import math, re, collections, typing, itertools, functools\nassert math.gcd(4, 6) == 2\n"
    ) == (True, "ok")
    assert _run("assert 1 == 2\n") == (False, "error")
    assert _run("def f(:\n") == (False, "error")
    assert _run("open('scratch.txt', 'w').write('ok')\nassert open('scratch.txt').read() == 'ok'\n")[
        0
    ]  # own dir


@pytest.mark.parametrize(
    "program",
    [
        "import sys\nsys.exit(0)\nassert False\n",
        "import os\nos._exit(0)\n",
        "raise SystemExit\n",
    ],
    ids=["sys.exit", "os._exit", "SystemExit"],
)
def test_leaving_early_is_not_a_pass(program: str) -> None:
    assert not _run(program)[0]


def test_infinite_loops_time_out_and_leave_nothing_running() -> None:
    started = time.perf_counter()
    assert _run("while True:\n    pass\n") == (False, "timeout")
    assert _run("sum(iter(int, 1))\n") == (False, "timeout")  # a loop in C that ignores signals
    assert time.perf_counter() - started < 2 * FAST.timeout + 4


def test_fork_bomb_and_subprocesses_are_refused() -> None:
    before = _children()
    assert not _run("import os\nwhile True:\n    os.fork()\n")[0]
    assert not _run("import subprocess\nsubprocess.run(['sleep', '30'])\n")[0]
    assert not _run("import os\nos.system('sleep 30')\n")[0]
    assert not _run("import multiprocessing\nmultiprocessing.Process(target=print).start()\n")[0]
    assert _children() <= before  # nothing left behind


def test_huge_allocation_hits_the_memory_limit() -> None:
    assert not _run("x = bytearray(4 * 1024 ** 3)\n")[0]


def test_files_outside_the_working_directory_are_untouchable(tmp_path: Path) -> None:
    canary = tmp_path / "canary.txt"
    canary.write_text("alive")
    for program in [
        f"import os\nos.remove({str(canary)!r})\n",
        f"open({str(canary)!r}, 'w').write('dead')\n",
        f"import shutil\nshutil.rmtree({str(tmp_path)!r})\n",
        f"import os\nos.rename({str(canary)!r}, 'stolen')\n",
        f"print(open({str(canary)!r}).read())\n",  # reading outside is refused too
        "print(open('/etc/passwd').read())\n",
    ]:
        assert not _run(program)[0], program
    assert canary.read_text() == "alive"


def test_sockets_signals_and_ctypes_are_refused() -> None:
    assert not _run("import socket\nsocket.create_connection(('127.0.0.1', 9))\n")[0]
    assert not _run("import socket\nsocket.socket()\n")[0]
    assert not _run("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n")[0]
    assert not _run("import os, signal\nos.killpg(0, signal.SIGKILL)\n")[0]
    assert not _run("import ctypes\n")[0]
    assert os.getpid() > 0  # the test process is still here


def test_parent_secrets_are_not_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_secret_for_the_test")
    assert _run("import os\nassert 'HF_TOKEN' not in os.environ and len(os.environ) <= 4\n")[0]


def test_programs_run_concurrently() -> None:
    started = time.perf_counter()
    results = run_programs(["import time\ntime.sleep(1.0)\n"] * 4, SandboxLimits(timeout=5.0, workers=4))
    assert all(r.passed for r in results)
    assert time.perf_counter() - started < 4 * 1.0  # well below one after the other (loose bound)


def _children() -> int:
    """Processes whose parent is this test process."""
    me = str(os.getpid())
    count = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            if f"PPid:\t{me}\n" in status.read_text():
                count += 1
        except OSError:
            continue
    return count


def test_mbpp_style_records_run_setup_code_and_asserts() -> None:
    from mtpeft.data.records import make_record
    from mtpeft.metrics.code_exec import passes

    record = make_record(
        "mbpp",
        "Write a function to add the first n squares.",
        "",
        "",
        test_list=["assert squares(3) == 14", "assert squares(0) == 0"],
        test_setup_code="import math",
    )
    right = "def squares(n):\n    return sum(i * i for i in range(1, n + 1))"
    wrong = "def squares(n):\n    return n * n"
    assert passes([right, wrong, "  " + right + "\n\n"], [record] * 3) == [True, False, True]


def test_cli_lists_every_layer(capsys: pytest.CaptureFixture[str]) -> None:
    from mtpeft.metrics.sandbox import LAYERS, sandbox_layers
    from mtpeft.metrics.sandbox.__main__ import main

    code = main([])
    out = capsys.readouterr().out
    assert code == (0 if all(sandbox_layers().values()) else 1)
    assert all(layer in out for layer in LAYERS) and out.count("\n") >= len(LAYERS)


def test_correct_programs_of_awkward_shapes_pass() -> None:
    """These failed under the audit-hook-only sandbox: no trailing newline, one print over 8 KB, asyncio."""
    programs = [
        "print('no newline', end='')\n",
        "print('x' * 9000)\n",
        "import asyncio\nasync def f():\n    return 1\nassert asyncio.run(f()) == 1\n",
    ]
    assert [r.passed for r in run_programs(programs, FAST)] == [True, True, True]
