"""The record schema shared by every task source (docs/data.md 4.2).

A record is an Alpaca-style dict (``instruction`` / ``input`` / ``output``) plus the task it belongs
to, the gold ``answer`` the metric compares against, and free-form ``meta`` (e.g. code tests). Plain
dicts keep records JSON-serialisable and compatible with Alpaca files; ``validate_record`` checks one
that came from outside (a file, a hub dataset) and names what is wrong and where.
"""

from __future__ import annotations

from typing import Any, TypedDict


class Record(TypedDict):
    """One example of one task."""

    task: str
    """Registered task name, e.g. ``qa``, ``code``, ``reasoning``."""
    instruction: str
    """The prompt frame, e.g. ``context : ... question : ... answer :``."""
    input: str
    """Optional extra context (Alpaca ``input``); empty for the procedural tasks."""
    output: str
    """The training target (for reasoning: the chain of thought ending in ``#### N``)."""
    answer: str
    """The gold answer the metric compares against (QA span, reference ``return ...``, the number)."""
    meta: dict[str, Any]
    """Task-specific extras, e.g. code ``args`` and ``tests``; JSON-serialisable."""


STRING_FIELDS: tuple[str, ...] = ("task", "instruction", "input", "output", "answer")
"""Fields that must be strings."""


def make_record(task: str, instruction: str, output: str, answer: str, **meta: Any) -> Record:
    """Build a record with an empty ``input``; keyword arguments go into ``meta``."""
    return Record(task=task, instruction=instruction, input="", output=output, answer=answer, meta=meta)


def validate_record(d: Any, where: str) -> Record:
    """Check that ``d`` is a valid record and return it; ``where`` names its origin in errors.

    Raises ValueError naming the first missing or mistyped field, e.g.
    ``data/train.jsonl line 12: record has no field 'output' (required: ...)``.
    """
    if not isinstance(d, dict):
        raise ValueError(f"{where}: a record must be a dict, got {type(d).__name__}")
    required = (*STRING_FIELDS, "meta")
    for field in required:
        if field not in d:
            raise ValueError(
                f"{where}: record has no field {field!r} (required: {', '.join(required)}); "
                "add it (use '' for an empty input and {} for empty meta)"
            )
    for field in STRING_FIELDS:
        if not isinstance(d[field], str):
            raise ValueError(f"{where}: field {field!r} must be a string, got {type(d[field]).__name__}")
    if not isinstance(d["meta"], dict):
        raise ValueError(f"{where}: field 'meta' must be a dict, got {type(d['meta']).__name__}")
    if not d["task"]:
        raise ValueError(f"{where}: field 'task' is empty; set it to the task's registered name")
    return d  # type: ignore[return-value]
