"""Text metrics against hand-computed values: token F1, multiple choice, ROUGE, BLEU, pass@k's
estimator (vs brute force), evaluate:<name> (offline failure, result keys, a local metric script).
State merging and syncing: tests/test_metrics_sync.py."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from torchmetrics.text import ROUGEScore

from mtpeft.data.records import Record, make_record
from mtpeft.metrics import get_metric
from mtpeft.metrics.choice import first_choice
from mtpeft.metrics.exact_match import normalize_answer, token_f1
from mtpeft.metrics.external import MetricNotAvailableError, load_evaluate_metric, parse_spec
from mtpeft.metrics.pass_at_k import PassAtK, pass_at_k

pytestmark = pytest.mark.filterwarnings("ignore:The ``compute`` method of metric")  # empty shards on purpose


def value(name: str, predictions: Sequence, records: Sequence[Record]) -> float:
    """Metric ``name`` over one batch, as the module computes it (update, then compute)."""
    metric = get_metric(name)
    metric.update(predictions, records)
    return float(metric.compute())


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
    assert value("f1", ["Broncos", "x"], [record, record]) == pytest.approx(0.5)
    assert value("exact_match", ["Denver", "the broncos!"], [record, record]) == 0.5


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
    assert get_metric("rouge1").score([""], [record]) == [0.0]


def test_rouge_equals_torchmetrics_rouge_score() -> None:
    """Our per-example sum/count gives the number torchmetrics' ROUGEScore reports (best over references)."""
    preds = ["the cat sat on the mat", "a dog barked loudly at night", "nothing in common"]
    refs = [["the cat is on the mat"], ["the dog barked at night", "a dog barked"], ["zebra"]]
    records = [_squad(*r) for r in refs]
    for key in ("rouge1", "rouge2", "rougeL"):
        reference = ROUGEScore(rouge_keys=key, accumulate="best")
        reference.update(preds, refs)
        assert value(key, preds, records) == pytest.approx(float(reference.compute()[f"{key}_fmeasure"]))


def test_bleu_by_hand() -> None:
    same = ["the quick brown fox jumps over the lazy dog"]
    assert value("bleu", same, [_free(same[0])]) == pytest.approx(1.0)
    # one 9-token hypothesis vs a 9-token reference differing in the last word:
    # p1 = 8/9, p2 = 7/8, p3 = 6/7, p4 = 5/6, BP = 1 -> BLEU = (8/9 * 7/8 * 6/7 * 5/6) ** (1/4) = (5/9) ** (1/4)
    hyp = ["the quick brown fox jumps over the lazy cat"]
    assert value("bleu", hyp, [_free(same[0])]) == pytest.approx((5 / 9) ** 0.25, abs=1e-6)
    assert value("bleu", ["dog"], [_free(same[0])]) == 0.0  # no 4-gram match, no smoothing
    # 5-token hypothesis, 7-token reference: all n-grams match, brevity penalty exp(1 - 7/5)
    assert value("bleu", ["a b c d e"], [_free("a b c d e f g")]) == pytest.approx(math.exp(1 - 7 / 5))
    # corpus-level: n-gram counts are pooled before the geometric mean (not a mean of sentence BLEUs):
    # matches/total = (8+7)/(9+7), (7+6)/(8+6), (6+5)/(7+5), (5+4)/(6+4)
    pooled = value("bleu", [hyp[0], "a b c d e f g"], [_free(same[0]), _free("a b c d e f g")])
    assert pooled == pytest.approx((15 / 16 * 13 / 14 * 11 / 12 * 9 / 10) ** 0.25, abs=1e-6)
    assert value("bleu", [], []) == 0.0


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
    with pytest.raises(ValueError, match="set evaluation.num_samples >= 5"):
        pass_at_k(2, 1, 5)
    started = time.perf_counter()  # checked before any program runs
    with pytest.raises(ValueError, match=r"pass@3 needs at least 3 samples per problem, got 2"):
        PassAtK(3).score([["return 1", "return 2"]] * 50, [_free("x")] * 50)
    assert time.perf_counter() - started < 1


def test_pass_at_k_large_n_is_stable() -> None:
    """The product form stays exact where the binomial ratio would overflow floats."""
    assert pass_at_k(2000, 3, 100) == pytest.approx(1 - math.comb(1997, 100) / math.comb(2000, 100))
    assert 0.0 <= pass_at_k(2000, 0, 1000) <= 1.0 and pass_at_k(2000, 1999, 2) == 1.0


def test_pass_at_k_runs_every_sample() -> None:
    record = make_record("code", "def f ( x ) : ...", "", "", args=["x"], tests=[[[2], 4], [[3], 6]])
    samples = [["return x * 2", "return x + 2", "return x + x", "oops"]]  # 2 of 4 pass
    assert PassAtK(1).score(samples, [record]) == [pytest.approx(0.5)]
    assert PassAtK(2).score(samples, [record]) == [pytest.approx(1 - math.comb(2, 2) / math.comb(4, 2))]
    assert PassAtK(1).score(["return x * 2"], [record]) == [1.0]  # greedy: one sample
    metric = get_metric("pass@2")
    metric.update(samples, [record])
    metric.update([["oops", "return x * 2"], ["oops", "oops"]], [record, record])
    assert float(metric.compute()) == pytest.approx((5 / 6 + 1 + 0) / 3)  # per problem, then averaged


def test_evaluate_metric_offline_fails_fast_and_clearly(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    metric = get_metric("evaluate:mtpeft-no-such-metric")
    started = time.perf_counter()
    with pytest.raises(
        MetricNotAvailableError,
        match=r"'evaluate:mtpeft-no-such-metric': evaluate.load\('mtpeft-no-such-metric'\) failed.*local path",
    ):
        metric.update(["a"], [_free("a")])  # at the first batch, not after the whole split
    assert time.perf_counter() - started < 15


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("evaluate:rouge", ("rouge", None, False)),
        ("evaluate:rouge:rougeL", ("rouge", "rougeL", False)),
        ("evaluate:sacrebleu", ("sacrebleu", None, True)),  # known percentage metric
        ("evaluate:./metrics/acc:accuracy%", ("./metrics/acc", "accuracy", True)),
        ("evaluate:/abs/path/metric_dir", ("/abs/path/metric_dir", None, False)),
        ("evaluate:/abs/sacrebleu/", ("/abs/sacrebleu/", None, True)),
    ],
)
def test_evaluate_spec(spec: str, expected: tuple) -> None:
    assert parse_spec(spec) == expected
    with pytest.raises(ValueError, match="name the evaluate metric"):
        parse_spec("evaluate:")


def test_evaluate_metric_picks_a_key_and_scales_percentages() -> None:
    result = {"score": 42.0, "fraction": 0.25, "flag": True, "counts": [1, 2]}
    assert get_metric("evaluate:x").pick({"fraction": 0.25, "score": 42.0}) == 0.25  # the first numeric value
    assert get_metric("evaluate:x:fraction").pick(result) == 0.25
    assert get_metric("evaluate:x:score%").pick(result) == pytest.approx(0.42)
    assert get_metric("evaluate:sacrebleu").pick(result) == pytest.approx(0.42)
    with pytest.raises(ValueError, match=r"'score' = 42.0 is not a fraction.*evaluate:x:score%"):
        get_metric("evaluate:x").pick(result)
    with pytest.raises(ValueError, match="no numeric key 'nope'; keys: \\['fraction', 'score'\\]"):
        get_metric("evaluate:x:nope").pick(result)
    with pytest.raises(ValueError, match="has no numeric value"):
        get_metric("evaluate:x").pick({"text": "a"})


LOCAL_METRIC = """
import datasets
import evaluate


class WordMatch(evaluate.Metric):
    def _info(self):
        features = {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
        return evaluate.MetricInfo(
            description="share of exact matches", citation="", inputs_description="",
            features=datasets.Features(features),
        )

    def _compute(self, predictions, references):
        matches = sum(p == r for p, r in zip(predictions, references))
        return {"n": len(predictions), "percent": 100.0 * matches / len(predictions)}
"""


def test_evaluate_metric_from_a_local_script(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``evaluate:<dir>:<key>%`` loads a local metric offline; batches accumulate into one corpus call."""
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    (tmp_path / "word_match").mkdir()
    (tmp_path / "word_match" / "word_match.py").write_text(LOCAL_METRIC)
    metric = get_metric(f"evaluate:{tmp_path / 'word_match'}:percent%")
    assert metric.name == "evaluate:word_match:percent"  # logged without the directory
    metric.update([" yes ", "no"], [_free("yes"), _free("yes")])
    metric.update(["héllo 🙂"], [_free("héllo 🙂")])  # non-ASCII text survives the tensor encoding
    assert metric.pairs() == [("yes", ["yes"]), ("no", ["yes"]), ("héllo 🙂", ["héllo 🙂"])]
    assert float(metric.compute()) == pytest.approx(2 / 3)
    assert float(get_metric(f"evaluate:{tmp_path / 'word_match'}:percent%").compute()) == 0.0  # nothing seen
    load_evaluate_metric.cache_clear()
