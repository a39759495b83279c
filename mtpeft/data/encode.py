"""Records -> token ids: ``prompt + target + [eos]`` with labels masked on the prompt.

The template renders ``(prompt, target)``. The prompt is tokenised with the tokenizer's special
tokens (so models that expect a BOS get it), the target without, and EOS is appended so generation
learns to stop. Tokenising the two parts separately guarantees that the training prefix is exactly
the prompt used for generation at evaluation. Labels are -100 on the prompt (answer-only loss, the
LLM-Adapters / MTL-LoRA convention) unless ``loss_on_prompt`` (HyCAM's full-sequence loss).
Sequences longer than ``max_length`` are cut on the right (``truncate``) or dropped (``skip``); the
caller reports how many. The prompt for generation is never cut on the right: one longer than
``max_length`` keeps its BOS (if any) and its last tokens, ``max_length`` in all, so the model still sees
the question and the response header that end it (`generation_prompt`).

Tokenising is bounded by a character budget (``bounded_token_ids``): a text longer than
``(max_length + CUT_MARGIN) * longest token`` characters is cut to that length first, since no token
covers more characters than the longest one in the vocabulary. The cut text still yields more than
``max_length`` tokens, and only the last word or so before the cut can tokenise differently, far past
``max_length``, so the kept tokens are the same as from the whole text while a 50 MB record costs as much
as a normal one. Texts within the budget are tokenised whole (identical results).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from mtpeft.data.records import Record
from mtpeft.data.templates import Template

IGNORE_INDEX = -100
"""Label value the loss ignores."""

OVERLENGTH_POLICIES: tuple[str, ...] = ("truncate", "skip")
"""What happens to a sequence longer than ``max_length``."""

CUT_MARGIN = 16
"""Tokens past the limit that a cut text must still give (the tokens near a cut may differ)."""

_TOKEN_CHARS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Example:
    """One tokenised record."""

    input_ids: list[int]
    """Prompt + target + EOS (possibly truncated)."""
    labels: list[int]
    """Same length as ``input_ids``; -100 where no loss is taken."""
    prompt_ids: list[int]
    """The prompt alone (for generation), at most ``max_length`` tokens: a longer one keeps its end."""
    task_id: int
    index: int
    """Position of the record in its split's record list."""


@dataclass(frozen=True)
class EncodeStats:
    """How many records of one batch were cut or dropped for length, and the longest sequence seen."""

    total: int
    truncated: int
    skipped: int
    longest: int
    """Exact for texts within the character budget; for a longer (cut) text, the tokens of the cut part."""
    prompts_cut: int = 0
    """Prompts longer than ``max_length`` whose generation prompt keeps only their end."""


def encode_records(
    records: Sequence[Record],
    task_ids: Sequence[int],
    tokenizer: PreTrainedTokenizerBase,
    template: Template,
    max_length: int,
    loss_on_prompt: bool = False,
    overlength: str = "truncate",
) -> tuple[list[Example], list[Record], EncodeStats]:
    """Tokenise ``records``; returns the examples, the records kept (same order) and length stats.

    ``index`` of each example is its position in the returned record list, so it stays aligned
    when ``overlength="skip"`` drops records.
    """
    if overlength not in OVERLENGTH_POLICIES:
        raise ValueError(f"overlength={overlength!r} is invalid; use one of {', '.join(OVERLENGTH_POLICIES)}")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; set tokenizer.eos_token so targets can end")
    if not records:  # the tokenizer rejects an empty batch
        return [], [], EncodeStats(0, 0, 0, 0)
    rendered = [template(r) for r in records]
    prompts = bounded_token_ids(tokenizer, [p for p, _ in rendered], max_length, add_special_tokens=True)
    prompts = [_single_bos(ids, tokenizer.bos_token_id) for ids in prompts]
    targets = bounded_token_ids(tokenizer, [t for _, t in rendered], max_length, add_special_tokens=False)
    examples: list[Example] = []
    kept: list[Record] = []
    truncated = skipped = longest = prompts_cut = 0
    for record, task_id, prompt, target, (text, _) in zip(
        records, task_ids, prompts, targets, rendered, strict=True
    ):
        ids = [*prompt, *target, tokenizer.eos_token_id]
        longest = max(longest, len(ids))
        if len(ids) > max_length:
            if overlength == "skip":
                skipped += 1
                continue
            truncated += 1
        labels = list(ids) if loss_on_prompt else [IGNORE_INDEX] * len(prompt) + ids[len(prompt) :]
        generation = list(prompt)
        if len(prompt) > max_length:
            prompts_cut += 1
            generation = generation_prompt(tokenizer, text, prompt, max_length)
        examples.append(Example(ids[:max_length], labels[:max_length], generation, task_id, len(kept)))
        kept.append(record)
    return examples, kept, EncodeStats(len(records), truncated, skipped, longest, prompts_cut)


def generation_prompt(
    tokenizer: PreTrainedTokenizerBase, text: str, prompt: list[int], max_length: int
) -> list[int]:
    """An overlong prompt ``text`` cut to ``max_length`` tokens from the left: its BOS (when ``prompt``, its
    first tokens as `encode_records` tokenised them, starts with one) and its last tokens. A prompt ends with what the
    model must answer (the question, the response header of its template), which a cut on the right drops.
    Only the text's last characters are tokenised (the character budget of the module docstring, from
    the end)."""
    bos = [prompt[0]] if tokenizer.bos_token_id is not None and prompt[0] == tokenizer.bos_token_id else []
    keep = max_length - len(bos)
    budget = (keep + CUT_MARGIN) * max_token_chars(tokenizer)
    tail = tokenizer(text[-budget:], add_special_tokens=False)["input_ids"]
    if len(text) > budget and len(tail) < keep + CUT_MARGIN:
        tail = tokenizer(text, add_special_tokens=False)["input_ids"]
    return bos + tail[-keep:]


def max_token_chars(tokenizer: PreTrainedTokenizerBase) -> int:
    """Characters of the longest token string in the vocabulary (cached per tokenizer object).

    An upper bound on the characters one token covers: byte-level vocabularies spell each byte as one
    character, SentencePiece spells a space as one ``▁`` and a byte-fallback token (``<0x0A>``) is longer
    than the byte it stands for.
    """
    if tokenizer not in _TOKEN_CHARS:
        _TOKEN_CHARS[tokenizer] = max((len(token) for token in tokenizer.get_vocab()), default=1)
    return _TOKEN_CHARS[tokenizer]


def bounded_token_ids(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], limit: int, add_special_tokens: bool
) -> list[list[int]]:
    """Token ids of ``texts`` whose first ``limit`` tokens equal those of tokenising each text whole.

    A text over the character budget (module docstring) is tokenised from its cut prefix; should a
    normaliser make the cut yield fewer than ``limit + CUT_MARGIN`` tokens, the whole text is used after all.
    """
    budget = (limit + CUT_MARGIN) * max_token_chars(tokenizer)
    cut = [text[:budget] for text in texts]
    ids = tokenizer(cut, add_special_tokens=add_special_tokens)["input_ids"]
    for i, text in enumerate(texts):
        if len(text) > budget and len(ids[i]) < limit + CUT_MARGIN:
            ids[i] = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    return ids


def _single_bos(ids: list[int], bos_id: int | None) -> list[int]:
    """Drop a doubled BOS: a chat template's text may start with BOS and the tokenizer adds another."""
    if bos_id is not None and len(ids) >= 2 and ids[0] == ids[1] == bos_id:
        return ids[1:]
    return ids
