"""Prompt templates: how a record becomes ``(prompt_text, target_text)``.

The model is trained on ``prompt + target + EOS`` (the datamodule appends EOS) and evaluated by
generating from ``prompt``. The template is part of what a score means (lm-eval #1645), so runs
record its name. ``plain`` is the tiny-model default; ``alpaca`` is the Stanford-Alpaca template that
HyCAM and LLM-Adapters use (docs/data.md 3.2), with the target following ``### Response:`` directly.
"""

from __future__ import annotations

from collections.abc import Callable
from types import MappingProxyType

from transformers import PreTrainedTokenizerBase

from mtpeft.data.records import Record

Template = Callable[[Record], tuple[str, str]]
"""A template maps a record to ``(prompt_text, target_text)``."""

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


def plain(record: Record) -> tuple[str, str]:
    """``instruction [+ " " + input]`` -> ``" " + output``: the frame the tiny model is trained on."""
    prompt = record["instruction"]
    if record["input"]:
        prompt = f"{prompt} {record['input']}"
    return prompt, " " + record["output"]


def alpaca(record: Record) -> tuple[str, str]:
    """Stanford-Alpaca prompt (with or without the ``### Input:`` block); target = output, no space."""
    if record["input"]:
        prompt = ALPACA_WITH_INPUT.format(instruction=record["instruction"], input=record["input"])
    else:
        prompt = ALPACA_NO_INPUT.format(instruction=record["instruction"])
    return prompt, record["output"]


TEMPLATES: MappingProxyType[str, Template] = MappingProxyType({"plain": plain, "alpaca": alpaca})
"""Read-only registry of templates by name."""


def available_templates() -> list[str]:
    """Names accepted by ``get_template``."""
    return sorted(TEMPLATES)


def get_template(name: str) -> Template:
    """Look up a template by name; an unknown name raises ValueError listing the valid ones."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; valid templates: {', '.join(available_templates())}")
    return TEMPLATES[name]


def with_chat_template(template: Template, tokenizer: PreTrainedTokenizerBase) -> Template:
    """``template``'s prompt as one user turn of the tokenizer's chat template (for instruct models).

    The rendered prompt ends with the assistant header (``add_generation_prompt``), so the target follows
    it directly; a model without a chat template is an error (base models: keep ``chat_template=false``).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"model.chat_template=true but the tokenizer of {tokenizer.name_or_path!r} has no chat template; "
            "set model.chat_template=false (base models use data.template alone)"
        )

    def render(record: Record) -> tuple[str, str]:
        prompt, target = template(record)
        chat = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True), target

    return render
