"""Text metrics against hand-computed values: token F1, multiple choice, ROUGE, BLEU, pass@k's
estimator (vs brute force), evaluate:<name> offline, and DDP-style merging of prediction shards."""

from __future__ import annotations

import itertools
import math
import time

import pytest

from mtpeft.data.records import Record, make_record
from mtpeft.metrics import get_metric
from mtpeft.metrics.choice import first_choice
from mtpeft.metrics.exact_match import normalize_answer, token_f1
from mtpeft.metrics.external import MetricNotAvailableError
from mtpeft.metrics.pass_at_k import PassAtK, pass_at_k


def _squad(*answers: str) -> Record:
    return make_record("squad", "Passage: ... Question: ...", answers[0], answers[0], answers=list(answers))


def _free(output: str) -> Record:
    return make_record("alpaca", "Write ...", output, "")


def _mc(answer: str, choices: list[str] | None) -> Record:
    meta = {"choices": choices} if choices is not None else {}
    return make_record("boolq", "Question ...", f"the correct answer is {answer}", answer, **meta)


def test_squad_normalisation() -> None:
    assert normalize_answer("The  Cat, a dog!") == "cat dog"
    assert normalize_answer("An apple") == "apple" and normalize_answer("theatre") == "theatre"


@pytest.mark.parametrize(
    ("prediction", "gold", "expected"),
    [
        ("the cat sat", "cat sat", 1.0),  # articles dropped
        ("cat", "cat sat", 2 * (1 * 0.5) / 1.5),  # precision 1, recall 1/2 -> 2/3
        ("cat sat down", "sat cat", 2 * (2 / 3 * 1) / (2 / 3 + 1)),  # bag of tokens -> 0.8
        ("dog", "cat", 0.0),
        ("", "", 1.0),  # both empty after normalisation
        ("the", "", 1.0),  # only an article = empty
        ("cat", "", 0.0),
        ("cat cat", "cat", 2 * (0.5 * 1) / 1.5),  # repeated tokens count once per gold occurrence
    ],
)
def test_token_f1(prediction: str, gold: str, expected: float) -> None:
    assert token_f1(prediction, gold) == pytest.approx(expected)


def test_em_and_f1_take_the_best_gold() -> None:
    record = _squad("Denver Broncos", "Broncos", "the Broncos team")
    assert get_metric("exact_match").score(["broncos"], [record]) == [1.0]
    assert get_metric("f1").score(["Broncos team"], [record]) == [pytest.approx(1.0)]
    assert get_metric("f1").score(["Denver"], [record]) == [pytest.approx(2 * 0.5 / 1.5)]
    assert get_metric("f1").compute(["Broncos", "x"], [record, record]) == pytest.approx(0.5)


def test_multiple_choice() -> None:
    labels = ["answer1", "answer2", "answer3"]
    assert first_choice("the correct answer is answer2 , not answer1", labels) == "answer2"
    assert first_choice("Answer3", labels) == "answer3" and first_choice("answer12", labels) is None
    assert first_choice("I think true", None) == "true" and first_choice("option2 it is", None) == "option2"
    metric = get_metric("mc_accuracy")
    records = [_mc("answer2", labels), _mc("answer2", labels), _mc("true", ["true", "false"]), _mc("b", None)]
    predictions = ["the correct answer is answer2", "answer1", "false", "B"]
    assert metric.score(predictions, records) == [1.0, 0.0, 0.0, 1.0]


def test_rouge_by_hand() -> None:
    # prediction "the cat sat on the mat", reference "the cat is on the mat": 6 tokens each
    # ROUGE-1: 5 shared unigrams (the x2, cat, on, mat) -> P = R = F = 5/6
    # ROUGE-2: shared bigrams "the cat", "on the", "the mat" = 3 of 5 -> 3/5
    # ROUGE-L: LCS "the cat on the mat" = 5 -> 5/6
    record, prediction = _free("the cat is on the mat"), "the cat sat on the mat"
    assert get_metric("rouge1").score([prediction], [record]) == [pytest.approx(5 / 6, abs=1e-4)]
    assert get_metric("rouge2").score([prediction], [record]) == [pytest.approx(3 / 5, abs=1e-4)]
    assert get_metric("rougeL").score([prediction], [record]) == [pytest.approx(5 / 6, abs=1e-4)]
    assert get_metric("rougeL").score(["completely different"], [record]) == [0.0]


def test_bleu_by_hand() -> None:
    metric = get_metric("bleu")
    same = ["the quick brown fox jumps over the lazy dog"]
    assert metric.compute(same, [_free(same[0])]) == pytest.approx(1.0)
    # one 9-token hypothesis vs a 9-token reference differing in the last word:
    # p1 = 8/9, p2 = 7/8, p3 = 6/7, p4 = 5/6, BP = 1 -> BLEU = (8/9 * 7/8 * 6/7 * 5/6) ** (1/4) = (5/9) ** (1/4)
    hyp = ["the quick brown fox jumps over the lazy cat"]
    assert metric.compute(hyp, [_free(same[0])]) == pytest.approx((5 / 9) ** 0.25, abs=1e-4)
    assert metric.compute(["dog"], [_free(same[0])]) == 0.0  # no 4-gram match, no smoothing


def _brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Share of all k-subsets of n samples (c correct) that contain at least one correct sample."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in subset) for subset in subsets) / len(subsets)


@pytest.mark.parametrize(
    ("n", "c", "k"), [(1, 0, 1), (1, 1, 1), (5, 2, 1), (5, 2, 3), (8, 1, 4), (10, 3, 5), (6, 6, 2), (7, 0, 7)]
)
def test_pass_at_k_estimator_matches_brute_force(n: int, c: int, k: int) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(n, c, k))
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def test_pass_at_k_needs_enough_samples() -> None:
    with pytest.raises(ValueError, match="raise evaluation.num_samples"):
        pass_at_k(2, 1, 5)


def test_pass_at_k_runs_every_sample() -> None:
    record = make_record("code", "def f ( x ) : ...", "", "", args=["x"], tests=[[[2], 4], [[3], 6]])
    samples = [["return x * 2", "return x + 2", "return x + x", "oops"]]  # 2 of 4 pass
    assert PassAtK(1).score(samples, [record]) == [pytest.approx(0.5)]
    assert PassAtK(2).score(samples, [record]) == [pytest.approx(1 - math.comb(2, 2) / math.comb(4, 2))]
    assert PassAtK(1).score(["return x * 2"], [record]) == [1.0]  # greedy: one sample


def test_evaluate_metric_offline_fails_fast_and_clearly(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    metric = get_metric("evaluate:mtpeft-no-such-metric")
    started = time.perf_counter()
    with pytest.raises(
        MetricNotAvailableError, match="evaluate.load\\('mtpeft-no-such-metric'\\) failed.*local path"
    ):
        metric.compute(["a"], [_free("a")])
    assert time.perf_counter() - started < 15


def test_evaluate_metric_picks_a_key_and_scales_percentages() -> None:
    metric = get_metric("evaluate:fake:score")
    metric._module = type(
        "M", (), {"compute": staticmethod(lambda predictions, references: {"score": 42.0, "n": 3})}
    )()
    assert metric.compute(["a"], [_free("a")]) == pytest.approx(0.42)
    with pytest.raises(KeyError, match="no numeric key 'nope'"):
        metric.key = "nope"
        metric.compute(["a"], [_free("a")])


def test_shards_merged_equal_one_pass() -> None:
    """DDP: the module gathers prediction shards before computing; corpus BLEU must see all of them."""
    refs = [_free("the quick brown fox jumps over the lazy dog"), _free("a b c d e f g")]
    preds = ["the quick brown fox jumps over the lazy cat", "a b c d e f g"]
    whole = get_metric("bleu").compute(preds, refs)
    halves = [get_metric("bleu").compute([p], [r]) for p, r in zip(preds, refs, strict=True)]
    assert whole != pytest.approx(sum(halves) / 2)  # averaging per-shard corpus scores would be wrong
