"""Scoped task-id injection (the pattern of peft's ``PolyModel._manage_pre_hooks``).

Task-conditioned layers take ``task_ids`` as a keyword of their ``forward``. The wrapped Hugging Face
model knows nothing of task ids, so for the duration of one ``forward`` or ``generate`` call we register
a forward pre-hook on every task-conditioned layer that adds ``task_ids`` to its keyword arguments, and
remove the hooks afterwards. No global state: two models (or two threads with two models) never see
each other's ids. During beam search or ``num_return_sequences > 1`` the batch is expanded with
``repeat_interleave``; the hook repeats ``task_ids`` the same way.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def expand_task_ids(task_ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Repeat ``task_ids`` to ``batch_size`` rows as generate() expands its inputs (repeat_interleave)."""
    if task_ids.shape[0] == batch_size:
        return task_ids
    if batch_size % task_ids.shape[0] != 0:
        raise ValueError(
            f"batch of {batch_size} rows cannot be matched to {task_ids.shape[0]} task ids; "
            "pass one task id per input sequence"
        )
    return task_ids.repeat_interleave(batch_size // task_ids.shape[0])


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


class task_id_scope:  # noqa: N801 - used like a function-style context manager
    """Inject ``task_ids`` as a keyword into each module's forward while the context is open.

    A class rather than a generator so that the same object can be entered again: activation
    checkpointing enters the recompute context once per backward pass through a layer.
    """

    def __init__(self, modules: Iterable[nn.Module], task_ids: torch.Tensor | None) -> None:
        self.modules = list(modules)
        self.task_ids = task_ids
        self._handles: list = []

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        ids = self.task_ids
        x = _first_tensor(args, kwargs)
        if ids is not None and x is not None and x.dim() > 0:
            ids = expand_task_ids(ids, x.shape[0])
        kwargs["task_ids"] = ids
        return args, kwargs

    def __enter__(self) -> None:
        self._handles = [m.register_forward_pre_hook(self._hook, with_kwargs=True) for m in self.modules]

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
