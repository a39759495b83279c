"""Metrics against hand-computed values: exact match, numeric answer after ####, pass@1 by execution
(more metrics in tests/test_metrics_text.py)."""

from __future__ import annotations

import os

import pytest

from mtpeft.data.records import Record, make_record
from mtpeft.metrics import available_metrics, get_metric
from mtpeft.metrics.code_exec import PassAtOne, build_program
from mtpeft.metrics.numeric import extract_answer, parse_number


def _qa(answer: str) -> Record:
    return make_record("qa", "context : ... answer :", answer, answer)


def _math(answer: str) -> Record:
    return make_record("reasoning", "problem : ... answer :", f"#### {answer}", answer)


def _code(tests: list, args: tuple[str, ...] = ("x", "y")) -> Record:
    return make_record("code", "def f ( x , y ) : # ... ; return :", "", "", args=list(args), tests=tests)


ADD3_TIMES_X = _code([[[2, 1], 8], [[0, 5], 0], [[-1, -3], 0], [[3, 4], 21]])  # ( y + 3 ) * x
FAST = PassAtOne(timeout=1.0)  # a short limit keeps the hang tests fast
HANGS = PassAtOne(timeout=3.0)
"""For batches with hanging programs: two of them burn CPU next to the correct ones, and on a busy 2-core
machine (CI: two pytest workers) a correct program was once still unfinished after 1 s."""


def test_registry() -> None:
    names = available_metrics()
    assert {"exact_match", "f1", "numeric_match", "mc_accuracy", "rouge1", "rouge2", "rougeL", "bleu"} <= set(
        names
    )
    assert "pass@<k>" in names and "evaluate:<name>" in names
    for name in ("exact_match", "f1", "bleu", "pass@1", "pass@10", "rougeL"):
        assert get_metric(name).name == name
    with pytest.raises(ValueError, match="unknown metric 'blue'; valid metrics: bleu, evaluate:<name>"):
        get_metric("blue")
    with pytest.raises(ValueError, match="unknown metric 'pass@0'"):
        get_metric("pass@0")


def test_length_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="2 predictions for 1 records"):
        get_metric("exact_match").score(["a", "b"], [_qa("a")])


def test_exact_match() -> None:
    predictions = ["owl", "  owl \n", "owl .", "Owl", "", "19", "an owl", "owls"]
    records = [_qa("owl")] * 5 + [_qa("19")] + [_qa("owl")] * 2
    # SQuAD normalisation: case, punctuation and articles do not count; other words do
    assert get_metric("exact_match").score(predictions, records) == [1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize(
    ("prediction", "golds", "expected"),
    [
        ("", [""], 1.0),  # both empty
        ("the .", [""], 1.0),  # articles and punctuation only normalise to empty
        ("a", ["an!"], 1.0),
        ("", ["owl"], 0.0),
        ("owl", ["the"], 0.0),  # gold empty after normalisation, prediction not
        ("The Denver Broncos", ["Broncos", "Denver Broncos"], 1.0),  # best over several golds
        ("Broncos team", ["Broncos", "Denver Broncos"], 0.0),
        ("catdog", ["cat dog"], 0.0),  # spaces separate tokens; they are not removed
        ("cat   dog", ["cat dog"], 1.0),
    ],
)
def test_exact_match_edge_cases(prediction: str, golds: list[str], expected: float) -> None:
    record = make_record("squad", "q", golds[0], golds[0], answers=golds)
    assert get_metric("exact_match").score([prediction], [record]) == [expected]


def test_numeric_parsing_helpers() -> None:
    assert extract_answer("3 + 4 = 7 . #### 7") == "7"
    assert extract_answer("#### 1 #### 2 ") == "2"
    assert extract_answer("7") == "7" and extract_answer("no number") is None
    assert extract_answer("so 3 + 4 = 7 , then -1,250.5 left") == "-1,250.5"  # the last number
    assert extract_answer("#### 42 dollars .") == "42" and extract_answer("#### 9.") == "9"
    assert parse_number("1,234") == 1234 and parse_number("-5") == -5 and parse_number("20.0") == 20
    assert parse_number("seven") is None and parse_number("") is None and parse_number("nan") is None


@pytest.mark.parametrize(
    ("prediction", "gold", "expected"),
    [
        ("18 + 5 = 23 . 23 - 3 = 20 . #### 20", "20", 1.0),
        ("18 + 5 = 23 . #### 23", "20", 0.0),
        ("20", "20", 1.0),  # no ####: the last number
        ("it is 3 , not 20", "20", 1.0),
        ("it is 20 , not 3", "20", 0.0),
        ("total -1,234 .", "-1234", 1.0),
        ("the answer is 2.50", "2.5", 1.0),
        ("#### 1,234", "1234", 1.0),
        ("#### -5", "-5", 1.0),
        ("#### 5", "-5", 0.0),
        ("#### 3 . #### 4", "4", 1.0),  # the last marker counts
        ("#### 4 #### 3", "4", 0.0),
        ("####20.0", "20", 1.0),
        ("#### twenty", "20", 0.0),
        ("#### ", "20", 0.0),
        ("  #### 7  ", "7", 1.0),
        ("no idea", "7", 0.0),  # no number at all
        ("", "0", 0.0),
        ("so the total is 1,234.", "1234", 1.0),  # trailing period after the last number
        ("#### 1,234.", "1,234", 1.0),  # gold with a separator
        ("3 - 8 = -5", "-5", 1.0),
        ("costs $2.50 each", "2.5", 1.0),
        ("#### 2.5", "2.49", 0.0),
        ("first 12 then 13 #### 12", "12", 1.0),  # #### wins over the last number
    ],
)
def test_numeric_match(prediction: str, gold: str, expected: float) -> None:
    assert get_metric("numeric_match").score([prediction], [_math(gold)]) == [expected]


def test_build_program() -> None:
    program = build_program("return ( y + 3 ) * x", ADD3_TIMES_X)
    assert program.splitlines()[:3] == ["def f(x, y):", "    return ( y + 3 ) * x", "assert f(*[2, 1]) == 8"]
    assert build_program("x = 1", ADD3_TIMES_X) is None
    with pytest.raises(ValueError, match=r"meta\['args'\] and meta\['tests'\]"):
        build_program("return 1", _qa("1"))


def test_pass_at_one_scores_right_wrong_and_invalid() -> None:
    predictions = [
        "return ( y + 3 ) * x",
        "  return x * ( 3 + y )  ",  # equivalent body, surrounding whitespace stripped
        "return ( y + 3 ) + x",  # wrong
        "( y + 3 ) * x",  # must start with return
        "return ( y + 3",  # syntax error
        "return z",  # NameError
        "return print('x 0 1') or ( y + 3 ) * x",  # output cannot fake a report
    ]
    scores = FAST.score(predictions, [ADD3_TIMES_X] * len(predictions))
    assert scores == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]


def test_pass_at_one_survives_loops_hangs_and_crashes() -> None:
    good = "return ( y + 3 ) * x"
    predictions = [
        good,
        "return next(v for v in iter(int, 1) if v)",  # Python-level infinite loop: per-candidate alarm
        good,
        "return sum(iter(int, 1))",  # C-level infinite loop: the batch hangs, parent kills it
        good,
        "return __import__('os')._exit(0)",  # kills the batch process
        good,
        "return len([0] * 10**10)",  # memory limit
        good,
    ]
    scores = HANGS.score(predictions, [ADD3_TIMES_X] * len(predictions))
    assert scores == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]


def test_pass_at_one_never_runs_in_the_parent() -> None:
    record = _code([[[], True]], args=())
    same_process = f"return __import__('os').getpid() == {os.getpid()}"
    other_process = f"return __import__('os').getpid() != {os.getpid()}"
    assert FAST.score([same_process, other_process], [record, record]) == [0.0, 1.0]


def test_a_sandbox_that_cannot_start_is_an_error() -> None:
    broken = PassAtOne(python="/bin/false")
    with pytest.raises(RuntimeError, match="did not start"):
        broken.score(["return 1"], [_code([[[], 1]], args=())])


def test_a_task_named_avg_is_refused_before_it_overwrites_the_average() -> None:
    """Any path that names a task ``avg`` (e.g. a file stem) stops before training, not after the first
    evaluation has logged the average over that task's score."""
    from mtpeft.data.sources.config import RESERVED_TASK_NAMES
    from mtpeft.metrics.tracker import AVG_TASK, EvalMetrics, check_metric_names

    assert AVG_TASK in RESERVED_TASK_NAMES
    with pytest.raises(ValueError, match=r"task is named 'avg', which is reserved: <split>/avg/score"):
        check_metric_names({"avg": ["exact_match"], "qa": ["exact_match"]}, 1)
    with pytest.raises(ValueError, match="reserved"):
        EvalMetrics("val", {"avg": ["exact_match"], "qa": ["exact_match"]})
    metrics = EvalMetrics("val", {"qa": ["exact_match"], "average": ["exact_match"]})
    metrics.update("qa", [["a"]], [_qa("a")], [0])
    metrics.update("average", [["a"]], [make_record("average", "q", "b", "b")], [0])
    out = metrics.compute()
    assert out["val/qa/score"] == 1.0 and out["val/average/score"] == 0.0 and out["val/avg/score"] == 0.5
