"""Generation budgets at evaluation: a task's ``max_new_tokens`` must let the model write its gold target.

Generation stops at EOS or after ``max_new_tokens`` tokens. A budget shorter than a val/test target caps
that record's score whatever the model learns: a reasoning chain cut before its ``#### N`` line scores as
a wrong answer. How many tokens a target takes depends on the tokenizer (SmolLM2's splits numbers into
single digits: mix3_hard's longest reasoning target is 74-78 tokens there over seeds 0-2, 47 under the tiny
model's), so a registered task's fixed budget is only a floor: without ``data.tasks.<name>.max_new_tokens``
it is raised to the longest val/test target + EOS (`eval_budget`), and a budget a target does not fit is
logged as a warning naming the key to set (`warn_unreachable_targets`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from mtpeft.data.records import Record
from mtpeft.data.templates import Template

log = logging.getLogger(__name__)

MAX_NEW_TOKENS_CAP = 512
"""Upper bound of a derived generation budget (set ``max_new_tokens`` to go beyond)."""

BUDGET_KEY = "max_new_tokens"
"""The key of a task entry (``data.tasks.<name>.max_new_tokens``) that sets its budget."""


def target_lengths(
    records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, template: Template
) -> list[int]:
    """Tokens each record's rendered target takes, plus one for EOS."""
    targets = [template(r)[1] for r in records]
    if not targets:
        return []
    return [len(ids) + 1 for ids in tokenizer(targets, add_special_tokens=False)["input_ids"]]


def eval_budget(
    registered: int, given: int | None, lengths: Sequence[int], cap: int = MAX_NEW_TOKENS_CAP
) -> int:
    """The budget of a registered task: ``given`` (the config's) when set, else ``registered`` raised to the
    longest of ``lengths`` (`target_lengths` of its val/test records), at most ``cap`` unless
    ``registered`` is larger."""
    if given is not None:
        return given
    return max(registered, min(max(lengths, default=0), cap))


def warn_unreachable_targets(task: str, lengths: Sequence[int], budget: int, key: str) -> int:
    """Log a warning when some val/test targets need more than ``budget`` tokens (naming ``key``, the
    setting that raises it); the number of such targets."""
    over = [n for n in lengths if n > budget]
    if over:
        log.warning(
            "task %r: %d of %d val/test targets need more than max_new_tokens=%d tokens (longest %d with EOS): "
            "generation stops before their end, so their scores are capped whatever the model learns; "
            "set %s to %d or more",
            task,
            len(over),
            len(lengths),
            budget,
            max(over),
            key,
            max(over),
        )
    return len(over)
