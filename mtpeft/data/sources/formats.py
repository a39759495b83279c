"""Source formats: one small function per dataset schema that turns a row into a record.

A ``Format`` names the columns it reads (``required`` / ``optional``), the metrics that score its tasks,
the dataset splits it reads by default and its own options. ``convert(row, task, options)`` returns
the record fields ``instruction``/``input``/``output``/``answer``/``meta``; ``to_record`` renames
columns by the source's ``fields`` mapping first and prefixes any error with where the row came from
(file and line, or dataset split and row). Built-in formats (docs/data.md 2):

* ``alpaca``: ``instruction``, optional ``input``, ``output``, optional ``answer`` (default: the output)
  and ``task`` -- HyCAM's Alpaca-CoT files, CodeAlpaca, Dolly, any instruction file;
* ``gsm8k``: ``question``/``answer`` ending in ``#### N``; ``<<48/2=24>>`` calculator annotations are
  removed from the target unless ``keep_calculator``; gold = N without thousands separators;
* ``mbpp``: ``text``/``code``/``test_list``/``test_setup_code``; the prompt is the text plus the first
  test as an example, the tests go to ``meta`` for pass@1;
* ``squad``: ``context``/``question``/``answers.text``; all gold answers go to ``meta["answers"]``;
* ``commonsense_mc``: commonsense_170k-style Alpaca records whose ``answer`` is a label such as
  ``answer1``/``true``/``option2``; ``meta["choices"]`` is the label set of the sub-task.

Add a format with ``register_format(Format(...))`` (see README, "Add a data source format").
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from mtpeft.data.records import Record, validate_record
from mtpeft.utils.registry import Registry

ROUGE_BLEU: tuple[str, ...] = ("rougeL", "rouge1", "rouge2", "bleu")
"""Free-form generation metrics (HyCAM reports BLEU and ROUGE)."""

DEFAULT_SPLITS: Mapping[str, str] = MappingProxyType({"train": "train", "val": "validation", "test": "test"})
"""Dataset split read for each of our splits unless a format or the source says otherwise."""

Converter = Callable[[Mapping[str, Any], str, Mapping[str, Any]], dict[str, Any]]
"""``(row, task, options) -> {instruction, input, output, answer, meta}``; raises ValueError."""


@dataclass(frozen=True)
class Format:
    """How one dataset schema becomes records."""

    name: str
    """Registry name (``format:`` of a source)."""
    convert: Converter
    """Row -> record fields; ValueError messages name the offending field."""
    required: tuple[str, ...]
    """Columns every row must have (not null)."""
    optional: tuple[str, ...] = ()
    """Columns read when present."""
    metrics: tuple[str, ...] = ROUGE_BLEU
    """Default metrics of the tasks it yields (the first is the score); a source's ``metrics`` overrides."""
    splits: Mapping[str, str] = field(default_factory=lambda: DEFAULT_SPLITS)
    """Default dataset split (``datasets`` split syntax, slices allowed) for each of our splits."""
    options: Mapping[str, Any] = field(default_factory=dict)
    """Format-specific options and their defaults (set as keys of the source)."""
    description: str = ""

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column the format reads (``fields`` may rename these)."""
        return (*self.required, *self.optional)


_FORMATS: Registry[Format] = Registry("data format")


def register_format(fmt: Format) -> Format:
    """Add a format; registering a name twice is an error."""
    return _FORMATS.register(fmt.name, fmt)


def available_formats() -> list[str]:
    """Registered format names, sorted."""
    return _FORMATS.names()


def get_format(name: str) -> Format:
    """Look up a format; an unknown name raises `UnknownNameError` listing the valid ones."""
    return _FORMATS.get(name)


# -- row -> record ------------------------------------------------------------------------------
def to_record(
    fmt: Format,
    raw: Mapping[str, Any],
    where: str,
    task: str,
    fields: Mapping[str, str],
    options: Mapping[str, Any],
) -> Record:
    """Convert one row; every error names ``where`` (file + line, or split + row) and the field."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: a record must be a JSON object, got {type(raw).__name__}")
    row: dict[str, Any] = {}
    for column in fmt.columns:
        source = fields.get(column, column)
        value = raw.get(source)
        if value is None and column in fmt.required:
            mapped = f" (read as {column!r} through fields)" if source != column else ""
            state = "is null" if source in raw else "is missing"
            raise ValueError(
                f"{where}: required field {source!r}{mapped} {state}; the {fmt.name!r} format needs "
                f"{', '.join(fmt.required)} (rename columns with the source's fields: {{format column: yours}})"
            )
        if value is not None:
            row[column] = value
    try:
        fields_out = fmt.convert(row, task, options)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err
    return validate_record({"task": task, **fields_out}, where)


def text(row: Mapping[str, Any], column: str, default: str | None = None) -> str:
    """``row[column]`` as a string (``default`` when absent); any other type is an error naming the field."""
    value = row.get(column, default)
    if value is None:
        raise ValueError(f"field {column!r} is missing")
    if not isinstance(value, str):
        raise ValueError(f"field {column!r} must be a string, got {type(value).__name__}: {value!r}")
    return value


def gold(row: Mapping[str, Any], default: str) -> str:
    """The optional ``answer`` column as a string (numbers are written out), else ``default``."""
    value = row.get("answer")
    if value is None:
        return default
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise ValueError(
            f"field 'answer' must be a string or a number, got {type(value).__name__}: {value!r}"
        )
    return value


# -- alpaca ---------------------------------------------------------------------------------------
def alpaca(row: Mapping[str, Any], task: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Alpaca JSON: the answer defaults to the output (free-form tasks are scored against it)."""
    output = text(row, "output")
    return {
        "instruction": text(row, "instruction"),
        "input": text(row, "input", ""),
        "output": output,
        "answer": gold(row, output),
        "meta": {},
    }


# -- gsm8k ----------------------------------------------------------------------------------------
CALCULATOR = re.compile(r"<<[^<>]*>>")
"""GSM8K calculator annotations such as ``<<48/2=24>>``."""


def gsm8k(row: Mapping[str, Any], task: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Question -> chain of thought ending in ``#### N``; gold N has its thousands separators removed."""
    solution = text(row, "answer")
    if "####" not in solution:
        raise ValueError(f"field 'answer' has no final '#### N' line: {solution[-80:]!r}")
    number = solution.rsplit("####", 1)[1].strip().replace(",", "")
    if not number:
        raise ValueError("field 'answer' has nothing after '####'")
    output = solution if options["keep_calculator"] else CALCULATOR.sub("", solution)
    return {"instruction": text(row, "question"), "input": "", "output": output, "answer": number, "meta": {}}


# -- mbpp -----------------------------------------------------------------------------------------
def mbpp(row: Mapping[str, Any], task: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Problem text plus its first test as an example -> reference code; tests go to ``meta``."""
    tests = row["test_list"]
    if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
        raise ValueError(f"field 'test_list' must be a non-empty list of assert strings, got {tests!r}")
    code = text(row, "code").replace("\r\n", "\n")  # MBPP's reference code has Windows line ends
    meta: dict[str, Any] = {"test_list": list(tests), "test_setup_code": text(row, "test_setup_code", "")}
    if "task_id" in row:
        meta["task_id"] = row["task_id"]
    return {
        "instruction": f"{text(row, 'text')}\n{tests[0]}",
        "input": "",
        "output": code,
        "answer": code,
        "meta": meta,
    }


# -- squad ----------------------------------------------------------------------------------------
def squad(row: Mapping[str, Any], task: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Passage + question -> the first gold span; every gold span goes to ``meta["answers"]``."""
    answers = row["answers"]
    spans = answers.get("text") if isinstance(answers, Mapping) else None
    if not isinstance(spans, list) or not all(isinstance(s, str) for s in spans):
        raise ValueError(f"field 'answers' must be {{'text': [str, ...], ...}}, got {answers!r}")
    if not spans:
        raise ValueError(
            "field 'answers' has no gold text (a SQuAD v2 unanswerable question); use rajpurkar/squad (v1.1)"
        )
    instruction = f"Passage: {text(row, 'context')}\n\nQuestion: {text(row, 'question')}"
    meta: dict[str, Any] = {"answers": list(spans)}
    if "id" in row:
        meta["id"] = row["id"]
    return {"instruction": instruction, "input": "", "output": spans[0], "answer": spans[0], "meta": meta}


# -- commonsense multiple choice ------------------------------------------------------------------
def _labels(stem: str, n: int) -> tuple[str, ...]:
    return tuple(f"{stem}{i}" for i in range(1, n + 1))


SUBTASK_CHOICES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "boolq": ("true", "false"),
        "piqa": _labels("solution", 2),
        "social_i_qa": _labels("answer", 5),
        "siqa": _labels("answer", 5),
        "hellaswag": _labels("ending", 4),
        "winogrande": _labels("option", 2),
        "arc-challenge": _labels("answer", 5),
        "arc-easy": _labels("answer", 5),
        "arc_challenge": _labels("answer", 5),
        "arc_easy": _labels("answer", 5),
        "openbookqa": _labels("answer", 5),
        "obqa": _labels("answer", 5),
    }
)
"""Label set of each commonsense_170k sub-task: the labels DoRA's ``commonsense_evaluate.py`` extracts."""

ANSWER_FORMAT = re.compile(r"Answer format:\s*(\S.*?)\s*$")
"""The last line of a commonsense_170k instruction, e.g. ``Answer format: answer1/answer2/answer3``."""


def mc_choices(instruction: str, task: str, explicit: Any) -> tuple[str, ...]:
    """The label set: the source's ``choices``, else the sub-task's (by task name), else the instruction's
    ``Answer format:`` line."""
    if explicit:
        return tuple(str(c) for c in explicit)
    if task.lower() in SUBTASK_CHOICES:
        return SUBTASK_CHOICES[task.lower()]
    match = ANSWER_FORMAT.search(instruction.strip().splitlines()[-1] if instruction.strip() else "")
    if match:
        return tuple(c.strip().replace(" ", "") for c in match.group(1).split("/") if c.strip())
    raise ValueError(
        f"cannot tell the answer labels of task {task!r}: the instruction has no 'Answer format: a/b/...' "
        f"line and the task is not one of {', '.join(sorted(SUBTASK_CHOICES))}; set the source's "
        "choices: [label1, label2, ...]"
    )


def commonsense_mc(row: Mapping[str, Any], task: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Alpaca record with a label ``answer``; ``meta["choices"]`` lets the metric find the first label."""
    instruction = text(row, "instruction")
    answer = text(row, "answer").strip()
    choices = mc_choices(instruction, task, options["choices"])
    if answer not in choices:
        raise ValueError(f"field 'answer' is {answer!r}, not one of the labels {list(choices)}")
    return {
        "instruction": instruction,
        "input": text(row, "input", ""),
        "output": text(row, "output"),
        "answer": answer,
        "meta": {"choices": list(choices)},
    }


register_format(
    Format(
        "alpaca",
        alpaca,
        ("instruction", "output"),
        ("input", "answer", "task"),
        description="Alpaca JSON (instruction/input/output), free-form generation",
    )
)
register_format(
    Format(
        "gsm8k",
        gsm8k,
        ("question", "answer"),
        metrics=("numeric_match",),
        splits=MappingProxyType({"train": "train[:-200]", "val": "train[-200:]", "test": "test"}),
        options={"keep_calculator": False},
        description="openai/gsm8k (main): chain of thought ending in #### N",
    )
)
register_format(
    Format(
        "mbpp",
        mbpp,
        ("text", "code", "test_list"),
        ("test_setup_code", "task_id"),
        metrics=("pass@1",),
        description="google-research-datasets/mbpp (full): Python function from a description, executed",
    )
)
register_format(
    Format(
        "squad",
        squad,
        ("context", "question", "answers"),
        ("id",),
        metrics=("exact_match", "f1"),
        splits=MappingProxyType({"train": "train[:-500]", "val": "train[-500:]", "test": "validation"}),
        description="rajpurkar/squad (v1.1): extractive QA, every gold span kept",
    )
)
register_format(
    Format(
        "commonsense_mc",
        commonsense_mc,
        ("instruction", "output", "answer"),
        ("input", "task"),
        metrics=("mc_accuracy",),
        options={"choices": None},
        description="commonsense_170k-style multiple choice (answer = label such as answer1/true/option2)",
    )
)
