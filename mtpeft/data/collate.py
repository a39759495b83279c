"""Batch collation: pad tokenised examples into tensors.

Training batches are right-padded (``input_ids``, ``attention_mask``, ``labels``, ``task_ids``).
Evaluation batches add the prompts alone, LEFT-padded, so batched greedy generation continues every
prompt from the same last position, plus each example's ``index`` into the split's records.
Collators are small frozen dataclasses (picklable for DataLoader workers). ``padding_fraction`` says
how much of a padded batch stream is padding, without collating it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mtpeft.data.encode import IGNORE_INDEX, Example


def pad(rows: Sequence[Sequence[int]], value: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad integer rows to a ``[B, S]`` tensor; returns ``(tensor, mask)`` with mask 1 on real tokens."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if not row:
            continue
        span = slice(width - len(row), width) if left else slice(0, len(row))
        out[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return out, mask


def padding_fraction(lengths: Sequence[int], batch_size: int) -> float:
    """Share of padding among the tokens of ``lengths`` cut into consecutive batches padded to their longest.

    What ``TrainCollator`` produces for a DataLoader of ``batch_size`` over examples of these lengths.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    real = padded = 0
    for start in range(0, len(lengths), batch_size):
        chunk = lengths[start : start + batch_size]
        real += sum(chunk)
        padded += max(chunk) * len(chunk)
    return 1.0 - real / padded if padded else 0.0


@dataclass(frozen=True)
class TrainCollator:
    """Right-padded language-modelling batch with task ids."""

    pad_token_id: int

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = pad([e.input_ids for e in examples], self.pad_token_id)
        labels, _ = pad([e.labels for e in examples], IGNORE_INDEX)
        task_ids = torch.tensor([e.task_id for e in examples], dtype=torch.long)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "task_ids": task_ids,
        }


@dataclass(frozen=True)
class EvalCollator(TrainCollator):
    """The training batch plus left-padded ``prompt_ids``/``prompt_attention_mask`` and ``index``."""

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        batch = super().__call__(examples)
        batch["prompt_ids"], batch["prompt_attention_mask"] = pad(
            [e.prompt_ids for e in examples], self.pad_token_id, left=True
        )
        batch["index"] = torch.tensor([e.index for e in examples], dtype=torch.long)
        return batch
