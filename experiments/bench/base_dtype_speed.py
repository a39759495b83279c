"""Training-step time of a float32 vs a bfloat16 frozen base, side by side in one process.

Usage (from the repository root)::

    python experiments/bench/base_dtype_speed.py model=smollm2_135m method=lora --batch 4 --length 64

Why: without native bf16 (AVX512-BF16 or AMX on a CPU, bf16 support on a GPU) torch emulates bf16 matmuls,
and a bf16 base can train far slower than a float32 one. This measures it on the machine at hand, with
mtpeft's own path: the base loaded by `load_base_model` with ``model.dtype`` set to each dtype, the method
built on it with float32 adapters (``model.adapter_dtype``), gradient checkpointing as the run config says,
and the chunked LM loss (`mtpeft.losses.model_token_losses`) of a random, fully labelled batch, forward and
backward. Rounds alternate between the two models; the table gives each round's wall and CPU seconds and
the median ratio. ``bf16 native`` says what `mtpeft.models.loader.bf16_is_native` reports
(``model.dtype=bfloat16_if_native`` picks bf16 only where it is true).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

DTYPES = ("float32", "bfloat16")


def build(overrides: list[str], dtype: str) -> tuple[Any, Any]:
    """(adapted model in training mode, its base) with the base stored in ``dtype``."""
    from adapted import build_adapted

    return build_adapted([*overrides, f"model.dtype={dtype}"])


def step(model: Any, base: Any, ids: Any, task_ids: Any) -> tuple[float, float]:
    """Wall and CPU seconds of one forward + backward of the chunked LM loss."""
    from adapted import lm_loss

    wall, cpu = time.perf_counter(), time.process_time()
    lm_loss(model, ids, task_ids).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=smollm2_135m method=lora")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch
    from adapted import random_inputs

    from mtpeft.models.loader import bf16_is_native

    torch.set_num_threads(args.threads)
    models = {dtype: build(args.overrides, dtype) for dtype in DTYPES}
    ids, task_ids = random_inputs(models["float32"][1].config.vocab_size, args.batch, args.length)
    times: dict[str, list[tuple[float, float]]] = {dtype: [] for dtype in DTYPES}
    for _ in range(args.rounds):
        for dtype, (model, base) in models.items():
            times[dtype].append(step(model, base, ids, task_ids))
    print(
        f"overrides: {' '.join(args.overrides)}; batch {args.batch} x {args.length}; {args.threads} thread(s); "
        f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"bf16 native: {bf16_is_native()}"
    )
    print("| base dtype | wall s per round | CPU s per round | median wall s | x float32 |")
    print("|---|---|---|---:|---:|")
    reference = statistics.median(wall for wall, _ in times["float32"])
    for dtype, rounds in times.items():
        median = statistics.median(wall for wall, _ in rounds)
        walls = ", ".join(f"{wall:.2f}" for wall, _ in rounds)
        cpus = ", ".join(f"{cpu:.2f}" for _, cpu in rounds)
        print(f"| {dtype} | {walls} | {cpus} | {median:.2f} | {median / reference:.1f} |")


if __name__ == "__main__":
    main()
