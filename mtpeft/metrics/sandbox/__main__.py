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
    """CLI: print the active layers (exit 1 if any is missing); ``--bench N`` times N small programs."""
    parser = argparse.ArgumentParser(prog="python -m mtpeft.metrics.sandbox", description=main.__doc__)
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs the programs")
    parser.add_argument("--bench", type=int, default=0, help="run N trivial programs and time them")
    parser.add_argument("--workers", type=int, default=0, help="programs at once for --bench (0: CPUs)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    layers = sandbox_layers(args.python)
    for layer, active in layers.items():
        print(f"{'active ' if active else 'MISSING'}  {layer:17} {LAYERS[layer]}")
    if args.bench:
        limits = SandboxLimits(python=args.python, workers=args.workers)
        started = time.perf_counter()
        results = run_programs(["assert sum(range(10)) == 45\n"] * args.bench, limits)
        seconds = time.perf_counter() - started
        workers = min(args.workers or os.cpu_count() or 1, args.bench)
        print(f"{args.bench} programs, {workers} at once: {seconds:.2f} s, {describe(results)}")
        print(f"per program: {1000 * seconds * workers / args.bench:.1f} ms of one worker")
    return 0 if all(layers.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
