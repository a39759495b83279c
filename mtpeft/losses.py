"""Per-sample causal-LM loss, so the training loop can reduce it per task.

Two ways to the same numbers:

* `token_losses` takes full logits ``[B, S, V]``: simple, but at real vocabulary sizes the fp32 logits
  dominate memory (SmolLM2, V=49,152: 0.8 GB per copy at batch 32 x 128, and cross-entropy keeps several).
* `model_token_losses` never builds them. During the adapted model's forward the output head
  (``lm_head``) is swapped for a recorder that keeps its input hidden states and returns a zero-memory
  placeholder (``expand``-ed row indices). Whatever the method's wrapper does to the logits on their way
  out (PEML drops its virtual prompt positions, for example) it does to the placeholder too, so the returned
  "logits" say which hidden-state row each output position came from: the method needs no special case.
  The head is then applied only to positions whose next-token label counts (``labels != -100``), in chunks
  of at most ``chunk_bytes`` of fp32 logits, each chunk under activation checkpointing so that its logits
  are recomputed in backward instead of kept.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)

#: Largest fp32 logits block [rows, V] one chunk materialises (64 MiB: 341 rows at V=49,152).
CHUNK_BYTES = 64 * 2**20


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


# ------------------------------------------------------------------------------- without full logits


class _HeadRecorder:
    """Stands in for ``head.forward`` during one model call: keeps the hidden states, returns row indices."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.hidden: torch.Tensor | None = None

    def __call__(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.hidden is not None:
            raise RuntimeError("the output head ran twice in one forward; cannot map its rows to positions")
        self.hidden = hidden
        rows = torch.arange(hidden.shape[:-1].numel(), device=hidden.device).view(*hidden.shape[:-1], 1)
        return rows.expand(*hidden.shape[:-1], self.vocab_size)  # a view: no [.., V] memory


@contextmanager
def recording_head(head: nn.Module, vocab_size: int) -> Iterator[_HeadRecorder]:
    """Swap ``head.forward`` for a `_HeadRecorder` while the block runs (restored afterwards)."""
    recorder = _HeadRecorder(vocab_size)
    head.forward = recorder  # instance attribute shadows the class method for nn.Module.__call__
    try:
        yield recorder
    finally:
        del head.forward


def _vocab_size(head: nn.Module) -> int:
    """Output width of the head (for the placeholder's last dimension)."""
    width = getattr(head, "out_features", None)
    if width is None and isinstance(getattr(head, "weight", None), torch.Tensor):
        width = head.weight.shape[0]
    return int(width or 1)


def _source_rows(logits: Any, hidden: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor | None:
    """Hidden-state row of every output position ``[B, S]``, or ``None`` when the placeholder was altered
    (the model post-processes its logits, e.g. soft-capping) and the rows cannot be trusted."""
    if hidden is None or not isinstance(logits, torch.Tensor) or logits.shape[:2] != labels.shape:
        return None
    rows = logits[..., 0]
    if rows.is_floating_point():
        if not torch.equal(rows, rows.round()):
            return None
        rows = rows.long()
    if rows.dtype != torch.long or rows.min() < 0 or rows.max() >= hidden.shape[:-1].numel():
        return None
    return rows


def _chunk_ce(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of one chunk of rows (logits in the head's dtype, then fp32 as in `token_losses`)."""
    return F.cross_entropy(head(hidden).float(), targets, reduction="none")


def head_token_losses(
    head: nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    *,
    head_scope: Callable[[], AbstractContextManager] = nullcontext,
    chunk_bytes: int = CHUNK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_losses` from the head's input rows: ``hidden [B, S, H]`` aligned with ``labels [B, S]``.

    Only the counted positions go through the head, ``chunk_bytes`` of fp32 logits at a time; with
    gradients each chunk is checkpointed (``head_scope`` is re-entered when it is recomputed in backward).
    """
    mask = labels[:, 1:].ne(-100)
    rows = hidden[:, :-1][mask]  # [N, H]
    targets = labels[:, 1:][mask]
    step = max(1, chunk_bytes // (4 * _vocab_size(head)))
    checkpointed = torch.is_grad_enabled() and rows.requires_grad
    parts = []
    with head_scope():
        for start in range(0, rows.shape[0], step):
            h, t = rows[start : start + step], targets[start : start + step]
            if checkpointed:
                parts.append(
                    checkpoint(
                        _chunk_ce,
                        head,
                        h,
                        t,
                        use_reentrant=False,
                        context_fn=lambda: (nullcontext(), head_scope()),
                    )
                )
            else:
                parts.append(_chunk_ce(head, h, t))
    values = torch.cat(parts) if parts else rows.new_zeros(0, dtype=torch.float32)
    loss = torch.zeros(mask.shape, dtype=torch.float32, device=labels.device).index_put((mask,), values)
    return loss, mask


def model_token_losses(
    forward: Callable[[], Any],
    head: nn.Module | None,
    labels: torch.Tensor,
    *,
    head_scope: Callable[[], AbstractContextManager] = nullcontext,
    chunk_bytes: int = CHUNK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_losses` of the model called by ``forward()`` without materialising its full logits.

    ``head`` is the model's output projection (``get_output_embeddings()``); ``forward`` runs the (adapted)
    model once and returns its output (with ``.logits``). Models without a head, or whose wrapper changes
    the logits' values, fall back to `token_losses` on a plain forward (logged once).
    """
    if head is not None:
        with recording_head(head, _vocab_size(head)) as recorder:
            out = forward()
        rows = _source_rows(getattr(out, "logits", None), recorder.hidden, labels)
        if rows is not None:
            hidden = recorder.hidden.reshape(-1, recorder.hidden.shape[-1])[rows]  # [B, S, H]
            return head_token_losses(
                hidden=hidden, head=head, labels=labels, head_scope=head_scope, chunk_bytes=chunk_bytes
            )
        _warn_fallback("the model changes its logits after the output head")
    else:
        _warn_fallback("the model has no output head (get_output_embeddings() is None)")
    return token_losses(forward().logits, labels)


_warned: set[str] = set()


def _warn_fallback(reason: str) -> None:
    """Log once per reason that the loss falls back to full logits (more memory, same numbers)."""
    if reason not in _warned:
        _warned.add(reason)
        log.warning("LM loss computed from full logits (more memory): %s", reason)
