"""Correct programs of every shape pass the code sandbox: 200 generated ones, run at once (output with
and without a trailing newline, single prints far over the pipe buffer, output over the capture cap,
asyncio, threads, files in the program's /tmp, stderr, deep recursion, much of the standard library).
Also: output is capped and counted, and a machine without a layer says so instead of degrading quietly."""

from __future__ import annotations

import logging
import resource

import pytest

from mtpeft.metrics import sandbox
from mtpeft.metrics.sandbox import SandboxLimits, run_programs, sandbox_layers

LIMITS = SandboxLimits(timeout=20.0, memory_mb=1024, workers=4, output_kb=16)

SHAPES = [
    "print({n})",
    "print('x' * {n}, end='')",
    "import sys\nsys.stdout.write('no newline {n}')",
    "print('y' * ({n} * 1000 + 9000))",
    "print('z' * 300000 + str({n}))",
    "import sys\nprint('to stderr {n}', file=sys.stderr)",
    "import asyncio\nasync def f(x):\n    await asyncio.sleep(0)\n    return x * 2\nassert asyncio.run(f({n})) == {n} * 2",
    "import asyncio\nasync def main():\n    return await asyncio.gather(*(asyncio.sleep(0, i) for i in range({n})))\n"
    "assert asyncio.run(main()) == list(range({n}))",
    "import threading\nout = []\nts = [threading.Thread(target=out.append, args=(i,)) for i in range({n} % 8 + 1)]\n"
    "[t.start() for t in ts]\n[t.join() for t in ts]\nassert sorted(out) == list(range({n} % 8 + 1))",
    "from concurrent.futures import ThreadPoolExecutor\nwith ThreadPoolExecutor(4) as ex:\n"
    "    assert list(ex.map(abs, range(-{n}, 0))) == list(range({n}, 0, -1))",
    "open('data.txt', 'w').write('v' * {n})\nassert open('data.txt').read() == 'v' * {n}",
    "import tempfile, os\nwith tempfile.TemporaryDirectory() as d:\n    p = os.path.join(d, 'f')\n"
    "    open(p, 'wb').write(bytes(range(256)) * {n})\n    assert os.path.getsize(p) == 256 * {n}",
    "import sys\nsys.setrecursionlimit(20000)\ndef depth(k):\n    return 0 if k == 0 else 1 + depth(k - 1)\n"
    "assert depth(5000 + {n}) == 5000 + {n}",
    "import json, re, collections, dataclasses, typing, itertools, functools, heapq, bisect, math\n"
    "assert json.loads(json.dumps({{'n': {n}}})) == {{'n': {n}}}\nassert re.findall(r'\\d', 'a1b{n}')",
    "import fractions, decimal, statistics, random, string, datetime, hashlib, textwrap, enum, copy\n"
    "assert fractions.Fraction({n}, 1) == {n}\nassert hashlib.sha256(b'{n}').hexdigest()\n"
    "assert statistics.mean([{n}, {n}]) == {n}",
    "from collections import namedtuple\nP = namedtuple('P', 'a b')\nassert P({n}, 2).a == {n}",
    "import unicodedata\nprint('héllo wörld ✓ {n}')\nassert unicodedata.name('✓')",
    "import time\ntime.sleep(0.01)\nassert time.monotonic() > 0",
    "import os\nassert os.getcwd() == '/tmp' and os.environ['HOME'] == '/tmp'\nprint(os.cpu_count())",
    "import sys\nprint('partial', end='')\nsys.stdout.flush()\nprint(' line {n}', end='')",
]
"""Templates; each is instantiated with ten values of ``n``."""


def _programs() -> list[str]:
    return [shape.format(n=n) + "\n" for shape in SHAPES for n in range(1, 11)]


def test_there_are_200_correct_programs() -> None:
    assert len(_programs()) == 200


def test_every_correct_program_passes() -> None:
    programs = _programs()
    results = run_programs(programs, LIMITS)
    failed = [
        (p, r.reason, r.detail, r.stderr[-300:])
        for p, r in zip(programs, results, strict=True)
        if not r.passed
    ]
    assert failed == []


def test_output_is_captured_capped_and_counted() -> None:
    no_newline, big, both = run_programs(
        [
            "print('abc', end='')\n",
            "import sys\nsys.stdout.write('q' * 5 * 2**20)\n",
            "import sys\nprint('out')\nprint('err', file=sys.stderr)\n",
        ],
        LIMITS,
    )
    assert (no_newline.passed, no_newline.stdout, no_newline.output_bytes) == (True, "abc", 3)
    assert big.passed and big.output_bytes == 5 * 2**20 and big.stdout == "q" * 16 * 1024
    assert (both.stdout, both.stderr) == ("out\n", "err\n")


def test_a_flood_of_output_does_not_grow_the_evaluating_process() -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    (result,) = run_programs(
        ["import sys\nfor _ in range(200):\n    sys.stdout.write('w' * 2**20)\n"], LIMITS
    )
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert result.output_bytes == 200 * 2**20 or result.reason == "timeout"
    assert len(result.stdout) == 16 * 1024
    assert grown_kb < 100 * 1024  # 200 MiB of output, well under 100 MiB more resident memory (loose)


def test_a_missing_layer_is_reported_once_and_visible(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Without libseccomp the sandbox still runs programs, but warns and reports the layers as missing."""
    monkeypatch.setattr(sandbox.sandbox_seccomp, "available", lambda: "seccomp unavailable: test")
    sandbox._setup.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="mtpeft.metrics.sandbox"):
            layers = sandbox_layers()
            sandbox_layers()
            (result,) = run_programs(
                ["print(1)\n"], SandboxLimits(timeout=20.0, python=sandbox.sys.executable)
            )
        assert not layers["seccomp"] and not layers["exit_guard"] and layers["mount_ns"]
        assert result.passed and "seccomp" not in result.layers
        warnings = [r.getMessage() for r in caplog.records if "NOT active" in r.getMessage()]
        assert len(warnings) == 1 and "seccomp, exit_guard" in warnings[0] and "test" in warnings[0]
    finally:
        sandbox._setup.cache_clear()


def test_without_namespaces_the_sandbox_falls_back_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A machine whose namespaces fail (here: an unusable mount point) runs programs with the remaining
    layers, warns which ones are missing and why, and still refuses process creation (seccomp)."""
    monkeypatch.setattr(sandbox, "_mountpoint", lambda binds: "/nonexistent-mountpoint")
    sandbox._setup.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="mtpeft.metrics.sandbox"):
            layers = sandbox_layers()
            ok, fork = run_programs(["print(1)\n", "import os\nos.fork()\n"], SandboxLimits(timeout=20.0))
        assert not layers["pid_ns"] and not layers["readonly_root"] and layers["seccomp"]
        assert ok.passed and not fork.passed
        assert any("namespaces failed" in r.getMessage() for r in caplog.records)
    finally:
        sandbox._setup.cache_clear()
