"""Per-sample causal-LM loss, so the training loop can reduce it per task."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy per position and the mask of positions that count.

    ``labels`` uses -100 for ignored positions (prompt under answer-only loss, padding). Returns
    ``(loss [B, S-1], mask [B, S-1])`` with the loss already zeroed where the mask is false.
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    mask = shift_labels.ne(-100)
    loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.clamp_min(0).reshape(-1),
        reduction="none",
    ).view_as(shift_labels)
    return loss * mask, mask


def per_task_mean(
    loss: torch.Tensor, mask: torch.Tensor, task_ids: torch.Tensor, num_tasks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-weighted mean loss per task: ``(sums [T] / counts [T], counts [T])`` (nan where count 0)."""
    sums = torch.zeros(num_tasks, dtype=loss.dtype, device=loss.device)
    counts = torch.zeros(num_tasks, dtype=loss.dtype, device=loss.device)
    sums.index_add_(0, task_ids, loss.sum(dim=1))
    counts.index_add_(0, task_ids, mask.sum(dim=1).to(loss.dtype))
    return sums / counts, counts
