"""Step time and peak memory of a training step with glibc's dynamic mmap threshold vs a fixed one.

Usage (from the repository root; two processes at once, one per setting, one thread each, so a 2-core machine
runs them side by side)::

    python experiments/bench/malloc_threshold.py model=smollm2_135m model.dtype=float32 method=lora \\
        --batch 32 --length 128 --steps 3

Each process builds the adapted model of the Hydra overrides (`adapted.build_adapted`), sets
``cpu_malloc_mmap_threshold_kb`` (``null``: glibc's dynamic threshold; else `set_malloc_mmap_threshold`),
and runs ``--steps`` forward + backward steps of the chunked LM loss on a random, fully labelled batch.
It prints one markdown row per setting: the wall time of every step, the peak RSS of the steps and the
resident memory before them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SETTINGS = ("null", "128")


def measure(overrides: list[str], threshold: str, batch: int, length: int, steps: int) -> dict[str, Any]:
    """``steps`` training steps under one ``cpu_malloc_mmap_threshold_kb`` setting."""
    from adapted import build_adapted, lm_loss, random_inputs

    from mtpeft.utils.memory import (
        current_rss_mb,
        peak_memory_mb,
        release_free_memory,
        reset_peak_memory,
        set_malloc_mmap_threshold,
    )

    set_malloc_mmap_threshold(None if threshold == "null" else int(threshold))
    model, base = build_adapted(overrides)
    ids, task_ids = random_inputs(base.config.vocab_size, batch, length)
    release_free_memory()
    before = current_rss_mb()
    reset_peak_memory()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        lm_loss(model, ids, task_ids).backward()
        model.zero_grad(set_to_none=True)
        times.append(round(time.perf_counter() - start, 1))
    return {"threshold": threshold, "step_s": times, "before_mb": before, **peak_memory_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=smollm2_135m method=lora")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--threshold", choices=SETTINGS, help="measure one setting in this process (internal)"
    )
    args = parser.parse_args()
    if args.threshold:
        import torch

        torch.set_num_threads(1)
        print(json.dumps(measure(args.overrides, args.threshold, args.batch, args.length, args.steps)))
        return
    print(
        f"overrides: {' '.join(args.overrides)}; batch {args.batch} x {args.length}; one thread per process"
    )
    print("| cpu_malloc_mmap_threshold_kb | step s | peak RSS MB | RSS before MB |")
    print("|---|---|---:|---:|")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = [
        *args.overrides,
        "--batch",
        str(args.batch),
        "--length",
        str(args.length),
        "--steps",
        str(args.steps),
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, *common, "--threshold", setting],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        for setting in SETTINGS
    ]
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"a measuring process failed (exit {proc.returncode})")
        row = json.loads(out.strip().splitlines()[-1])
        steps = ", ".join(str(s) for s in row["step_s"])
        print(f"| {row['threshold']} | {steps} | {row['cpu_peak_rss_mb']} | {row['before_mb']} |")


if __name__ == "__main__":
    main()
