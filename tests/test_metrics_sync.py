"""State semantics of the metrics across processes, without processes: two metric objects that each saw a
shard, merged (``merge_state``) or synced through torchmetrics' own ``_sync_dist`` with a fake all-gather,
give the value of one object that saw everything. Plus the per-split bookkeeping (``EvalMetrics``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch

from mtpeft.data.records import Record, make_record
from mtpeft.metrics import TextMetric, get_metric
from mtpeft.metrics.tracker import EvalMetrics

pytestmark = pytest.mark.filterwarnings("ignore:The ``compute`` method of metric")  # empty shards on purpose


def _rec(task: str, output: str, answer: str, **meta) -> Record:
    return make_record(task, "prompt", output, answer, **meta)


CODE = {"args": ["x"], "tests": [[[2], 4], [[3], 6]]}
CHOICES = ["answer1", "answer2", "answer3"]
DATA: dict[str, tuple[list, list[Record]]] = {
    "exact_match": (["owl", "The cat.", "dog", ""], [_rec("qa", "", a) for a in ("owl", "cat", "cow", "x")]),
    "f1": (["red owl", "cat", "a b c", "x"], [_rec("qa", "", a) for a in ("owl", "the cat", "b c d", "y")]),
    "numeric_match": (
        ["#### 1,234", "so -5", "2.50 .", "none"],
        [_rec("math", "", a) for a in ("1234", "-5", "2.5", "3")],
    ),
    "mc_accuracy": (
        ["answer2", "the answer is answer1", "answer3", "?"],
        [_rec("mc", "", a, choices=CHOICES) for a in ("answer2", "answer2", "answer3", "answer1")],
    ),
    "rouge1": (
        ["the cat sat", "a b", "c d e", "z"],
        [_rec("free", t, "") for t in ("the cat", "b a", "c e", "y")],
    ),
    "rouge2": (
        ["the cat sat", "a b", "c d e", "z"],
        [_rec("free", t, "") for t in ("the cat", "a b", "d e", "y")],
    ),
    "rougeL": (
        ["the cat sat", "a b", "c d e", "z"],
        [_rec("free", t, "") for t in ("the cat", "b a", "c e", "y")],
    ),
    "bleu": (
        ["the quick brown fox jumps", "a b c d e f", "one two three four five", "x y z w"],
        [
            _rec("free", t, "")
            for t in ("the quick brown fox jumped", "a b c d e f", "one two three four", "x y z")
        ],
    ),
    "pass@2": (
        [
            ["return x * 2", "return x"],
            ["return x + x", "return 2 * x"],
            ["oops", "return x"],
            ["return 1", "r"],
        ],
        [_rec("code", "", "", **CODE)] * 4,
    ),
    "evaluate:fake_match:match": (
        ["yes", "no", "héllo 🙂", "maybe"],
        [_rec("free", "", a) for a in ("yes", "yes", "héllo 🙂", "maybe")],
    ),
}


class _FakeMatch:
    """Stands in for an ``evaluate`` module: the share of exact matches (order-independent)."""

    @staticmethod
    def compute(predictions: list[str], references: list[str]) -> dict[str, float]:
        return {"match": sum(p == r for p, r in zip(predictions, references, strict=True)) / len(predictions)}


@pytest.fixture(autouse=True)
def fake_evaluate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("mtpeft.metrics.external.load_evaluate_metric", lambda path: _FakeMatch())


def _metric(name: str, predictions: Sequence, records: Sequence[Record]) -> TextMetric:
    metric = get_metric(name)
    if records:
        metric.update(predictions, records)
    return metric


def _fake_gather(shards: list[TextMetric]) -> Callable:
    """An all-gather over ``shards`` (the other 'processes'), for torchmetrics' ``_sync_dist``."""
    outgoing: list[list[torch.Tensor]] = []
    for shard in shards:  # what each shard would send: recorded by syncing it with itself alone
        sent: list[torch.Tensor] = []
        shard._sync_dist(lambda t, group=None, sent=sent: sent.append(t) or [t])
        outgoing.append(sent)
    calls = iter(range(len(outgoing[0])))

    def gather(tensor: torch.Tensor, group: object = None) -> list[torch.Tensor]:
        i = next(calls)
        return [tensor] + [sent[i] for sent in outgoing]

    return gather


@pytest.mark.parametrize("name", list(DATA))
@pytest.mark.parametrize("split", [1, 2, 4, 0])  # shard sizes: 0 and 4 leave one shard empty
def test_merged_shards_equal_one_pass(name: str, split: int) -> None:
    predictions, records = DATA[name]
    whole = float(_metric(name, predictions, records).compute())
    assert 0.0 <= whole <= 1.0

    merged = _metric(name, predictions[:split], records[:split])
    merged.merge_state(_metric(name, predictions[split:], records[split:]))
    assert float(merged.compute()) == pytest.approx(whole)

    synced = _metric(name, predictions[:split], records[:split])
    synced._sync_dist(_fake_gather([_metric(name, predictions[split:], records[split:])]))
    assert float(synced.compute()) == pytest.approx(whole)


def test_corpus_bleu_is_not_a_mean_of_shard_scores() -> None:
    predictions, records = DATA["bleu"]
    halves = [float(_metric("bleu", predictions[i : i + 2], records[i : i + 2]).compute()) for i in (0, 2)]
    assert float(_metric("bleu", predictions, records).compute()) != pytest.approx(sum(halves) / 2)


def test_per_example_states_are_float64_sums() -> None:
    metric = _metric("exact_match", *DATA["exact_match"])
    assert metric.total.dtype == torch.float64 and float(metric.total) == 2.0 and float(metric.count) == 4.0
    assert float(get_metric("f1").compute()) == 0.0  # nothing seen


def _eval(num_samples: int = 1) -> EvalMetrics:
    names = {
        "code": ("pass@2", "exact_match"),
        "qa": ("f1", "exact_match", "rougeL", "bleu"),
        "empty": ("f1",),
    }
    return EvalMetrics("val", names, num_samples=num_samples)


def test_eval_metrics_keys_scores_and_loss() -> None:
    metrics = _eval(num_samples=2)
    code = _rec("code", "", "return x * 2", **CODE)
    metrics.update("code", [["return x * 2", "oops"], ["return x", "return x + x"]], [code, code])
    metrics.update("qa", [["the owl"], ["cat"]], [_rec("qa", "", "owl"), _rec("qa", "", "dog")])
    metrics.update_loss("qa", torch.tensor(2.0), torch.tensor(3))
    metrics.update_loss("qa", torch.tensor(1.0), torch.tensor(1))
    out = metrics.compute()
    assert out["val/code/pass@2"] == pytest.approx(1.0)  # each problem has one passing sample of two
    assert out["val/code/exact_match"] == 0.5  # other metrics score the first sample only
    assert out["val/code/score"] == out["val/code/pass@2"] and "val/code/loss" not in out
    assert out["val/qa/score"] == out["val/qa/f1"] == 0.5 and out["val/qa/loss"] == pytest.approx(7 / 4)
    assert {"val/qa/exact_match", "val/qa/rougeL", "val/qa/bleu"} <= out.keys()
    assert not any(key.startswith("val/empty/") for key in out)  # no example: not reported, not averaged
    assert out["val/avg/score"] == pytest.approx((1.0 + 0.5) / 2)
    assert EvalMetrics("test", {}).compute() == {"test/avg/score": 0.0}


def test_eval_metrics_fail_fast_on_bad_names_and_too_few_samples() -> None:
    with pytest.raises(
        ValueError, match=r"task 'code': metric 'pass@2' needs 2 .* evaluation.num_samples=1; set"
    ):
        _eval(num_samples=1)
    with pytest.raises(ValueError, match="unknown metric 'blue'; valid metrics: bleu"):
        EvalMetrics("val", {"qa": ("blue",)})
    with pytest.raises(ValueError, match="task 'qa' has no metrics"):
        EvalMetrics("val", {"qa": ()})
    with pytest.raises(ValueError, match=r"log under the same name \['evaluate:m', 'evaluate:m'\]"):
        EvalMetrics("val", {"qa": ("evaluate:/a/m", "evaluate:/b/m/")})
