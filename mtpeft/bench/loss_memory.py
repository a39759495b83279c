"""LM-loss memory: peak memory of one training step with the loss from full logits vs without them.

A causal LM's loss is usually computed from ``[batch, length, vocab]`` float32 logits: at SmolLM2's 49,152-token
vocabulary that is 0.8 GB at 32 x 128 tokens, kept for backward with its softmax. mtpeft's training loss
(`mtpeft.module.chunked_losses`, `mtpeft.losses.model_token_losses`) runs the output head only on labelled
positions, a chunk at a time, recomputed in backward. This section measures both on the run's reference
method and a random batch with every position labelled (the chunked loss's worst case): forward, loss, aux
losses and backward of one step (no optimiser step: it is the same for both).

On CPU the figure is the process's peak resident memory during the step (``VmHWM`` reset before it, see
`mtpeft.utils.memory`) and the step's increment over the resident memory before it, with the C heap's free
pages returned to the OS before each step (`release_free_memory`: glibc otherwise keeps a step's freed
activations resident, which would count in the next step's baseline). On CUDA: the allocator's peak over
the memory allocated before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mtpeft.bench.config import RunParts
from mtpeft.bench.methods import Batch
from mtpeft.module import chunked_losses, forward_losses
from mtpeft.utils.memory import current_rss_mb, peak_memory_mb, release_free_memory, reset_peak_memory

LOSSES: dict[str, Callable[..., Any]] = {"chunked": chunked_losses, "full logits": forward_losses}
"""The measured losses, in measurement order."""


def _before_mb(cuda: bool) -> float:
    if cuda:
        return torch.cuda.memory_allocated() / 2**20
    return current_rss_mb() or float("nan")


def _peak_mb(cuda: bool) -> float:
    peak = peak_memory_mb()
    return float(peak["cuda_peak_allocated_mb"] if cuda else peak["cpu_peak_rss_mb"])


def loss_memory(parts: RunParts, batch: Batch) -> list[dict[str, Any]]:
    """One row per loss of `LOSSES`: memory before the step, peak during it, increment, and the loss."""
    device = batch["input_ids"].device
    cuda = device.type == "cuda"
    model = parts.fresh_method().to(device)
    inputs = (batch["input_ids"], batch["attention_mask"], batch["task_ids"], batch["labels"])
    rows = []
    for name, losses in LOSSES.items():
        release_free_memory()
        before = _before_mb(cuda)
        reset_peak_memory()
        loss = losses(model, *inputs, parts.num_tasks)[0]
        total = loss + sum(model.aux_losses().values())
        total.backward()
        peak = _peak_mb(cuda)
        model.zero_grad(set_to_none=True)
        rows.append(
            {
                "loss": name,
                "before_mb": before,
                "peak_mb": peak,
                "step_mb": peak - before,
                "value": float(loss.detach()),
            }
        )
        del loss, total
    return rows


def loss_memory_markdown(rows: list[dict[str, Any]], method: str, shape: str, cuda: bool) -> list[str]:
    """The section's lines: what was measured, then one table row per loss."""
    what = "CUDA allocator peak" if cuda else "peak RSS of the process"
    full, chunked = (next(r for r in rows if r["loss"] == k) for k in ("full logits", "chunked"))
    ratio = chunked["step_mb"] / full["step_mb"] if full["step_mb"] > 0 else float("nan")
    return [
        f"LM-loss memory (method={method}, random batch {shape}, every position labelled; forward + loss + "
        f"backward of one step; {what}): the chunked loss's step takes "
        f"**{ratio:.2f}x** the memory of the full-logits one.",
        "",
        "| loss | before the step MB | peak MB | step MB | loss value |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {r['loss']} | {r['before_mb']:.0f} | {r['peak_mb']:.0f} | {r['step_mb']:.0f} | {r['value']:.6f} |"
            for r in rows
        ),
    ]
