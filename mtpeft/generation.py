"""Batched generation where every row stops at its own budget and at end of text.

An evaluation batch can hold prompts of several tasks, each with its own generation budget
(``max_new_tokens`` of the task). `generate_rows` runs one KV-cached ``generate`` call for the whole
batch and stops each row at its own budget (`RowBudgets`, a per-row stopping criterion) or at EOS, then
cuts every row to exactly that: a row's completion is the one it would get alone with its own budget
(greedy; batched numerics aside), whichever tasks share its batch. The call ends as soon as every row is
done, so a batch whose rows all finish early stops early.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList


class RowBudgets(StoppingCriteria):
    """Stopping criterion: row ``i`` is finished once it has generated ``budgets[i]`` new tokens.

    ``generate`` calls it once per decoding step, after appending that step's token. The width of the
    first call, minus one, is taken as the prompt width: methods that prepend virtual tokens inside their
    own ``generate`` (PEML) then count new tokens correctly too. One instance serves one ``generate`` call.
    """

    def __init__(self, budgets: torch.Tensor) -> None:
        self.budgets = budgets
        self._prompt_width: int | None = None

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        if self._prompt_width is None:
            self._prompt_width = input_ids.shape[1] - 1
        generated = input_ids.shape[1] - self._prompt_width
        return torch.as_tensor(generated, device=self.budgets.device) >= self.budgets


def cut_row(tokens: Sequence[int], budget: int, eos_token_id: int | None) -> list[int]:
    """The first ``budget`` of ``tokens``, ending before the first ``eos_token_id`` (what gets decoded)."""
    row = list(tokens[:budget])
    if eos_token_id is not None and eos_token_id in row:
        row = row[: row.index(eos_token_id)]
    return row


def generate_rows(
    model: Any,
    prompt_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    task_ids: torch.Tensor,
    budgets: Sequence[int],
    *,
    eos_token_id: int | None,
    pad_token_id: int | None,
    **decoding: Any,
) -> list[list[int]]:
    """New token ids per row of the left-padded ``prompt_ids``: at most ``budgets[i]`` for row ``i``, cut
    before EOS. ``model`` is an `AdaptedModel` (``task_ids`` per row); ``decoding`` goes to ``generate``
    (``do_sample``, ``temperature``, ``top_p``)."""
    if len(budgets) != prompt_ids.shape[0] or min(budgets, default=1) < 1:
        raise ValueError(f"need one budget >= 1 per row ({prompt_ids.shape[0]} rows), got {list(budgets)}")
    limits = torch.tensor(list(budgets), device=prompt_ids.device)
    generated = model.generate(
        input_ids=prompt_ids,
        attention_mask=attention_mask,
        task_ids=task_ids,
        max_new_tokens=max(budgets),
        stopping_criteria=StoppingCriteriaList([RowBudgets(limits)]),
        use_cache=True,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        **decoding,
    )
    new = generated[:, prompt_ids.shape[1] :].tolist()
    return [cut_row(row, budget, eos_token_id) for row, budget in zip(new, budgets, strict=True)]
