"""Peak memory of one training step with the LM loss from full logits vs without them (`mtpeft.losses`).

Usage (from the repository root; one fresh process per variant, so each peak RSS is its own)::

    python experiments/bench/lm_loss_memory.py model=smollm2_135m method=lora --batch 32 --length 128

Every position of a random batch is labelled (the worst case for the chunked loss: with answer-only labels
it runs the output head on fewer rows still). A step is the forward and backward of `MultiTaskModule`'s
loss: ``full`` is the former path (``token_losses`` on ``[B, S, V]`` logits), ``chunked`` the current one
(``model_token_losses``). The script prints one markdown row per variant: peak RSS of the step (weights
included), RSS after loading, the step's wall time and the loss (equal in both rows up to float rounding).
``gradient_checkpointing=true`` recomputes each decoder layer in backward (as in training runs).
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
VARIANTS = ("full", "chunked")


def measure(overrides: list[str], variant: str, batch: int, length: int, seed: int = 0) -> dict[str, Any]:
    """One step of ``variant`` on the model/method of the Hydra ``overrides``; peak memory and time."""
    from adapted import build_adapted, lm_loss, random_inputs

    from mtpeft.utils.memory import peak_memory_mb, reset_peak_memory

    model, base = build_adapted(overrides)
    ids, task_ids = random_inputs(base.config.vocab_size, batch, length, seed)
    loaded = peak_memory_mb()["cpu_peak_rss_mb"]
    reset_peak_memory()
    start = time.perf_counter()

    total = lm_loss(model, base, ids, task_ids, chunked=variant == "chunked")
    total.backward()
    return {
        "variant": variant,
        "peak_rss_mb": peak_memory_mb()["cpu_peak_rss_mb"],
        "loaded_rss_mb": loaded,
        "step_s": round(time.perf_counter() - start, 1),
        "loss": round(float(total), 6),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=smollm2_135m method=lora")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variant", choices=VARIANTS, help="measure one variant in this process (internal)")
    args = parser.parse_args()
    if args.variant:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(measure(args.overrides, args.variant, args.batch, args.length)))
        return
    print(
        f"overrides: {' '.join(args.overrides)}; batch {args.batch} x {args.length}; {args.threads} thread(s)"
    )
    print("| loss | peak RSS of the step (MB) | RSS after loading (MB) | step (s) | loss value |")
    print("|---|---:|---:|---:|---:|")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, *args.overrides, "--variant", variant]
        cmd += ["--batch", str(args.batch), "--length", str(args.length), "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        print(
            f"| {variant} | {row['peak_rss_mb']} | {row['loaded_rss_mb']} | {row['step_s']} | {row['loss']} |"
        )


if __name__ == "__main__":
    main()
