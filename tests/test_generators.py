"""Procedural generators, the task registry, templates and the primitives corpus (docs/data.md section 4)."""

from __future__ import annotations

import re

import pytest

from mtpeft.data.records import make_record, validate_record
from mtpeft.data.synthetic import code, qa, reasoning
from mtpeft.data.synthetic.chain import Chain
from mtpeft.data.synthetic.lexicon import vocabulary
from mtpeft.data.synthetic.primitives import MAX_LINE_TOKENS, primitives_corpus, tokenizer_corpus
from mtpeft.data.tasks import available_tasks, build_splits, get_task
from mtpeft.data.templates import get_template
from mtpeft.metrics.code_exec import PassAtOne
from mtpeft.utils.registry import UnknownNameError

GENERATORS = {
    "qa": (qa.generate, qa.QAConfig),
    "code": (code.generate, code.CodeConfig),
    "reasoning": (reasoning.generate, reasoning.ReasoningConfig),
}
EQUATION = re.compile(r"(-?\d+) ([-+*%]) (-?\d+) = (-?\d+) \.")


# -- all generators ----------------------------------------------------------------------------
@pytest.mark.parametrize("task", sorted(GENERATORS))
def test_deterministic_per_seed_and_seeds_differ(task: str) -> None:
    generate, _ = GENERATORS[task]
    assert generate(50, 3) == generate(50, 3)
    assert generate(50, 3) != generate(50, 4)
    assert generate(20, 3) == generate(50, 3)[:20]  # one stream: a prefix does not depend on n


@pytest.mark.parametrize("task", sorted(GENERATORS))
def test_records_follow_the_common_format(task: str) -> None:
    generate, _ = GENERATORS[task]
    for i, record in enumerate(generate(100, 0)):
        validate_record(record, f"{task}[{i}]")
        assert record["task"] == task and record["input"] == ""
        assert record["instruction"] == " ".join(record["instruction"].split())  # whitespace tokenisable
        assert record["instruction"].endswith(("answer :", "return :", "output :"))


@pytest.mark.parametrize("task", sorted(GENERATORS))
def test_invalid_knob_values_are_rejected(task: str) -> None:
    _, config = GENERATORS[task]
    with pytest.raises(ValueError, match="conflict"):
        config(conflict=1.5)


# -- QA ----------------------------------------------------------------------------------------
def _context(record: dict) -> str:
    return record["instruction"].split("context : ")[1].split(" question : ")[0]


def test_qa_answer_is_a_span_of_the_context() -> None:
    for record in qa.generate(300, 1, qa.QAConfig(n_facts=5, hop2=0.5)):
        context = _context(record)
        assert f" {record['answer']} " in f" {context} "  # a whole word of the context
        assert record["output"] == record["answer"]
        if record["meta"]["numeric"]:
            assert record["answer"].isdigit() and 0 <= int(record["answer"]) <= 20


def test_qa_n_facts_and_two_hop() -> None:
    records = qa.generate(300, 2, qa.QAConfig(n_facts=4, hop2=1.0, conflict=0.0))
    hops = [r for r in records if r["meta"]["hop2"]]
    assert len(hops) > 250  # every item with an eligible fact is two-hop
    for record in hops:
        question = record["instruction"].split(" question : ")[1]
        pet = re.search(r"the owner of the (\w+)", question).group(1)
        owners = re.findall(rf"(\w+) owns a {pet} \.", _context(record))
        assert len(owners) == 1  # the reference is unambiguous
        assert _context(record).count(" . ") + 1 == 5  # 4 facts + the pet fact
    plain = qa.generate(100, 2, qa.QAConfig(n_facts=4))
    assert all(_context(r).count(" . ") + 1 == 4 for r in plain)


def test_qa_conflict_sets_the_numeric_share() -> None:
    def share(conflict: float) -> float:
        records = qa.generate(1000, 0, qa.QAConfig(conflict=conflict))
        return sum(r["meta"]["numeric"] for r in records) / len(records)

    assert share(0.0) == 0.0 and share(1.0) == 1.0
    assert 0.4 < share(0.5) < 0.6
    assert qa.QAConfig(conflict=0.9, p_numeric=0.0).numeric_share == 0.0


# -- code --------------------------------------------------------------------------------------
def test_chain_expression_and_value() -> None:
    chain = Chain("y", (("add", "3"), ("mul", "x")))
    assert chain.text() == "take y , add 3 , multiply by x"
    assert chain.expression() == "( y + 3 ) * x"
    assert chain.evaluate({"x": 2, "y": 4}) == 14
    assert Chain("5", (("max", "x"), ("mod", "4"))).expression() == "max ( 5 , x ) % 4"
    assert Chain("x", (("add", "1"), ("max", "y"))).expression() == "max ( ( x + 1 ) , y )"


def test_code_targets_pass_their_own_tests() -> None:
    records = code.generate(60, 0) + code.generate(40, 1, code.CodeConfig(n_args=3, steps=4, conflict=0.0))
    records += code.generate(20, 2, code.CodeConfig(n_args=1, steps=1, conflict=1.0))
    assert PassAtOne().score([r["output"] for r in records], records) == [1.0] * len(records)


def test_code_records_shape() -> None:
    for record in code.generate(200, 3):
        meta = record["meta"]
        assert record["output"] == record["answer"] and record["output"].startswith("return ")
        if meta["shared_frame"]:
            assert record["instruction"].startswith("input : take ") and meta["args"] == []
            assert len(meta["tests"]) == 1
        else:
            assert record["instruction"].startswith(f"def f ( {' , '.join(meta['args'])} ) : # take ")
            assert len(meta["tests"]) == 4
            assert all(-9 <= v <= 9 for inputs, _ in meta["tests"] for v in inputs)


def test_code_conflict_sets_shared_frame_and_const_start_shares() -> None:
    def shares(conflict: float) -> tuple[float, float]:
        records = code.generate(1000, 0, code.CodeConfig(conflict=conflict))
        defs = [r for r in records if not r["meta"]["shared_frame"]]
        shared = 1 - len(defs) / len(records)
        const = sum(r["meta"]["const_start"] for r in defs) / max(1, len(defs))
        return shared, const

    assert shares(0.0) == (0.0, 0.0)
    assert shares(1.0)[0] == 1.0
    shared, const = shares(0.5)
    assert 0.4 < shared < 0.6 and 0.4 < const < 0.6


def test_shared_frame_items_are_identical_across_code_and_reasoning() -> None:
    cfg_code, cfg_math = code.CodeConfig(conflict=1.0), reasoning.ReasoningConfig(conflict=1.0)
    code_prompts = {r["instruction"]: r for r in code.generate(800, 10, cfg_code)}
    math_prompts = {r["instruction"]: r for r in reasoning.generate(800, 11, cfg_math)}
    common = set(code_prompts) & set(math_prompts)
    assert len(common) > 20
    for prompt in common:  # same text, different behaviour: symbolic vs folded
        assert code_prompts[prompt]["meta"]["tests"][0][1] == int(math_prompts[prompt]["answer"])


# -- reasoning ---------------------------------------------------------------------------------
def _check_cot(record: dict) -> None:
    cot, final = record["output"].rsplit("#### ", 1)
    assert final == record["answer"]
    steps = EQUATION.findall(cot)
    assert len(steps) == cot.count("=")
    previous = None
    for a, op, b, c in steps:
        a, b, c = int(a), int(b), int(c)
        assert {"+": a + b, "-": a - b, "*": a * b}[op] == c
        assert previous is None or a == previous  # a chain: each step starts from the last result
        assert c >= 0
        previous = c
    if steps:
        assert previous == int(record["answer"])


def test_reasoning_cot_is_consistent() -> None:
    cfg = reasoning.ReasoningConfig(steps=4, p_distractor=0.5)
    for record in reasoning.generate(300, 0, cfg) + reasoning.generate(100, 1):
        _check_cot(record)
        if not record["meta"]["shared_frame"]:
            start = re.search(r"problem : \w+ has (\d+) ", record["instruction"]).group(1)
            assert record["output"].startswith(f"{start} ")
            assert record["instruction"].endswith("have ? answer :")


def test_reasoning_answer_only_and_distractors() -> None:
    records = reasoning.generate(200, 0, reasoning.ReasoningConfig(answer_only=True, p_distractor=1.0))
    for record in records:
        assert record["output"] == f"#### {record['answer']}"
        if not record["meta"]["shared_frame"]:
            assert record["meta"]["distractor"] and record["instruction"].count(" has ") == 2


def test_reasoning_conflict_sets_chain_phrasing_and_shared_frame() -> None:
    def shares(conflict: float) -> tuple[float, float]:
        records = reasoning.generate(1000, 0, reasoning.ReasoningConfig(conflict=conflict))
        stories = [r for r in records if not r["meta"]["shared_frame"]]
        chain_steps = sum(r["meta"]["n_chain_steps"] for r in stories) / (2 * max(1, len(stories)))
        return 1 - len(stories) / len(records), chain_steps

    assert shares(0.0) == (0.0, 0.0)
    assert shares(1.0)[0] == 1.0
    shared, chain = shares(0.5)
    assert 0.4 < shared < 0.6 and 0.4 < chain < 0.6


# -- task registry -----------------------------------------------------------------------------
def test_registry_lists_builtin_tasks() -> None:
    assert {"qa", "code", "reasoning"} <= set(available_tasks())
    assert get_task("code").metric == "pass@1"
    assert get_task("qa").metric == "exact_match"
    assert get_task("reasoning").metric == "numeric_match"
    with pytest.raises(UnknownNameError, match="valid tasks: .*code"):
        get_task("nope")


@pytest.mark.parametrize("task", sorted(GENERATORS))
def test_build_splits_are_disjoint_sized_and_deterministic(task: str) -> None:
    sizes = {"train": 400, "val": 60, "test": 80}
    splits = build_splits(task, sizes, seed=0)
    assert {k: len(v) for k, v in splits.items()} == sizes
    train = {r["instruction"] for r in splits["train"]}
    val = {r["instruction"] for r in splits["val"]}
    assert not train & val
    assert not (train | val) & {r["instruction"] for r in splits["test"]}
    assert splits == build_splits(task, sizes, seed=0)
    assert splits["val"] != build_splits(task, sizes, seed=1)["val"]


def test_build_splits_refills_a_small_item_space() -> None:
    # ~150 distinct one-step shared-frame items: val must still be filled with unseen ones.
    knobs = {"conflict": 1.0, "shared_steps": 1}
    splits = build_splits("code", {"train": 100, "val": 20}, seed=0, **knobs)
    assert len(splits["val"]) == 20 and not {r["instruction"] for r in splits["train"]} & {
        r["instruction"] for r in splits["val"]
    }
    with pytest.raises(ValueError, match="item space is too small"):
        build_splits("code", {"train": 1000, "val": 200}, seed=0, **knobs)


def test_build_splits_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="no knob 'n_fact'.*n_facts"):
        build_splits("qa", {"train": 1}, seed=0, n_fact=3)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        build_splits("qa", {"dev": 1}, seed=0)
    with pytest.raises(UnknownNameError, match="valid tasks"):
        build_splits("squad", {"train": 1}, seed=0)
    assert build_splits("qa", {"train": 2}, seed=0)["test"] == []


# -- records and templates ---------------------------------------------------------------------
def test_validate_record_names_field_and_origin() -> None:
    record = make_record("qa", "context : a . answer :", "x", "x")
    assert validate_record(dict(record), "here") == record
    broken = dict(record)
    del broken["output"]
    with pytest.raises(ValueError, match="train.jsonl line 3: record has no field 'output'"):
        validate_record(broken, "train.jsonl line 3")
    with pytest.raises(ValueError, match="'answer' must be a string"):
        validate_record({**record, "answer": 5}, "x")


def test_templates() -> None:
    record = make_record("qa", "what is 2 + 2 ?", "4", "4")
    assert get_template("plain")(record) == ("what is 2 + 2 ?", " 4")
    assert get_template("plain")({**record, "input": "ctx"}) == ("what is 2 + 2 ? ctx", " 4")
    prompt, target = get_template("alpaca")(record)
    assert prompt.endswith("### Instruction:\nwhat is 2 + 2 ?\n\n### Response:") and target == "4"
    assert "### Input:" not in prompt
    prompt, _ = get_template("alpaca")({**record, "input": "ctx"})
    assert "paired with an input" in prompt and "### Input:\nctx\n\n### Response:" in prompt
    with pytest.raises(ValueError, match="valid templates: alpaca, plain"):
        get_template("chatml")


# -- primitives --------------------------------------------------------------------------------
def test_primitives_corpus() -> None:
    lines = primitives_corpus(2000, 0)
    assert lines == primitives_corpus(2000, 0) and lines != primitives_corpus(2000, 1)
    assert len(lines) == 2000 and all(0 < len(line.split()) <= MAX_LINE_TOKENS for line in lines)
    assert not any("question :" in line or "answer :" in line for line in lines)
    repeated = sum(len(set(line.split(" . "))) < len(line.split(" . ")) for line in lines)
    assert repeated > 300  # facts repeated inside the window teach copying
    assert any(line.startswith("def f ( ") for line in lines)
    assert any(EQUATION.search(line) for line in lines)
    assert any(" gets " in line and " more ." in line for line in lines)


def test_tokenizer_corpus_covers_the_lexicon_and_every_task() -> None:
    texts = tokenizer_corpus(0)
    words = set(" ".join(texts).split())
    assert set(vocabulary()) <= words
    assert {"context", "problem", "input", "output", "def", "return", "####"} <= words
