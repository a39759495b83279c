"""GSM-symbolic from reasoning-gym: the item -> record mapping (always), real generation when installed."""

from __future__ import annotations

import pytest

from mtpeft.data.packaged.gsm_symbolic import to_record
from mtpeft.data.tasks import build_splits, get_task
from mtpeft.metrics import get_metric

ITEM = {  # the shape reasoning_gym.create_dataset("gsm_symbolic", ...) yields (0.1.25)
    "question": "James gets 160 emails a day. ... How many emails does James respond to in a 5 day work week?",
    "answer": "560",
    "metadata": {"answer_cot": "So James responds to 112 emails a day.\nThat means 112*5=560\n#### 560"},
}


def test_items_become_records_with_the_final_number_as_answer() -> None:
    record = to_record(ITEM)
    assert record["task"] == "gsm_symbolic" and record["answer"] == "560"
    assert record["output"].endswith("#### 560") and record["instruction"].startswith("James")
    assert to_record(ITEM, cot=False)["output"] == "#### 560"
    assert to_record({**ITEM, "metadata": {"answer_cot": "112*5=560"}})["output"] == "112*5=560\n#### 560"
    assert get_task("gsm_symbolic").metrics == ("numeric_match",)
    assert get_metric("numeric_match").score([record["output"]], [record]) == [1.0]


def test_generated_splits_are_disjoint_and_scored() -> None:
    pytest.importorskip("reasoning_gym", reason="optional: pip install -e '.[reasoning-gym]'")
    splits = build_splits("gsm_symbolic", {"train": 40, "val": 10, "test": 10}, seed=0)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [40, 10, 10]
    train = {r["instruction"] for r in splits["train"]}
    assert not train & {r["instruction"] for r in splits["val"] + splits["test"]}
    outputs = [r["output"] for r in splits["test"]]
    assert get_metric("numeric_match").score(outputs, splits["test"]) == [1.0] * 10
