"""Dataset sources: every format on a local stand-in in its hub schema, through datasets.load_dataset.

No network: stand-ins are written to tmp_path in the layout ``hf download --repo-type dataset`` gives
(parquet per config and split, README with the configs) or as the Alpaca JSON files of Alpaca-CoT.
The conf/data presets are composed with Hydra and built on the same stand-ins.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hydra.utils import instantiate
from transformers import PreTrainedTokenizerFast

from mtpeft.data.sources import DataNotAvailableError, load_sources, parse_sources
from mtpeft.data.sources.splits import ratio_split_indices
from tests.conftest import compose_train
from tests.data_sources_util import alpaca_rows, tiny_tokenizer, write_hub_repo, write_json


def _gsm8k_row(n: int) -> dict[str, str]:
    return {
        "question": f"Natalia sold {n} clips in April and half as many in May. How many in total?",
        "answer": f"In May she sold {n}/2 = <<{n}/2={n // 2}>>{n // 2} clips.\n"
        f"In total {n}+{n // 2} = <<{n}+{n // 2}={n + n // 2}>>{n + n // 2}.\n#### {n + n // 2:,}",
    }


GSM8K_TRAIN = [_gsm8k_row(n) for n in range(1000, 1024, 2)]
GSM8K_TEST = [_gsm8k_row(n) for n in range(1100, 1106, 2)]
MBPP_ROW = {
    "task_id": 2,
    "text": "Write a function to find the shared elements from the given two lists.",
    "code": "def similar_elements(a, b):\r\n  return tuple(set(a) & set(b)) ",
    "test_list": [
        "assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))",
        "assert set(similar_elements((1, 2, 3, 4),(5, 4, 3, 7))) == set((3, 4))",
    ],
    "test_setup_code": "import math",
    "challenge_test_list": [],
}
SQUAD_ROW = {
    "id": "56be4db0acb8001400a502ec",
    "title": "Super_Bowl_50",
    "context": "Super Bowl 50 was won by the Denver Broncos, who defeated the Carolina Panthers.",
    "question": "Which team won Super Bowl 50?",
    "answers": {"text": ["Denver Broncos", "the Denver Broncos"], "answer_start": [29, 25]},
}


@pytest.fixture(autouse=True)
def datasets_cache_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``load_dataset`` writes its Arrow cache under tmp_path, never the user's cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return tiny_tokenizer()


def _tasks(**source) -> dict:
    return {t.name: t for t in load_sources(parse_sources({source.pop("key", "src"): source}))}


def _gsm8k_repo(root: Path) -> Path:
    return write_hub_repo(root, {"main": {"train": GSM8K_TRAIN, "test": GSM8K_TEST}})


def _mbpp_repo(root: Path) -> Path:
    rows = [dict(MBPP_ROW, task_id=i, text=f"{MBPP_ROW['text']} ({i})") for i in range(8)]
    return write_hub_repo(root, {"full": {"train": rows[:4], "validation": rows[4:6], "test": rows[6:]}})


def _squad_repo(root: Path) -> Path:
    rows = [dict(SQUAD_ROW, id=str(i), question=f"{SQUAD_ROW['question']} #{i}") for i in range(11)]
    return write_hub_repo(root, {"plain_text": {"train": rows[:8], "validation": rows[8:]}})


# -- formats --------------------------------------------------------------------------------------
def test_gsm8k_drops_calculator_annotations_and_thousands_separators(tmp_path: Path) -> None:
    repo = str(_gsm8k_repo(tmp_path / "gsm8k"))
    splits = {"train": "train[:-2]", "val": "train[-2:]", "test": "test"}
    task = _tasks(key="gsm8k", format="gsm8k", dataset=repo, name="main", splits=splits)["gsm8k"]
    assert [len(task.splits[s]) for s in ("train", "val", "test")] == [10, 2, 3]
    record = task.splits["test"][0]
    assert record["instruction"] == GSM8K_TEST[0]["question"] and record["input"] == ""
    assert "<<" not in record["output"] and record["output"].startswith("In May she sold 1100/2 = 550 clips.")
    assert record["output"].endswith("#### 1,650") and record["answer"] == "1650"
    assert task.metrics == ("numeric_match",)
    kept = _tasks(
        key="gsm8k", format="gsm8k", dataset=repo, name="main", splits=splits, keep_calculator=True
    )["gsm8k"]
    assert kept.splits["test"][0]["output"] == GSM8K_TEST[0]["answer"]


def test_mbpp_prompt_has_text_and_first_test_and_meta_has_tests(tmp_path: Path) -> None:
    repo = str(_mbpp_repo(tmp_path / "mbpp"))
    task = _tasks(key="mbpp", format="mbpp", dataset=repo, name="full")["mbpp"]
    assert [len(task.splits[s]) for s in ("train", "val", "test")] == [4, 2, 2]
    record = task.splits["train"][0]
    assert record["instruction"] == f"{MBPP_ROW['text']} (0)\n{MBPP_ROW['test_list'][0]}"
    assert (
        record["output"]
        == record["answer"]
        == "def similar_elements(a, b):\n  return tuple(set(a) & set(b)) "
    )
    assert record["meta"] == {
        "test_list": MBPP_ROW["test_list"],
        "test_setup_code": "import math",
        "task_id": 0,
    }
    assert task.metrics == ("pass@1",)


def test_squad_keeps_every_gold_answer(tmp_path: Path) -> None:
    repo = str(_squad_repo(tmp_path / "squad"))
    splits = {"train": "train[:-2]", "val": "train[-2:]", "test": "validation"}
    task = _tasks(key="squad", format="squad", dataset=repo, splits=splits)["squad"]
    record = task.splits["test"][0]
    assert record["instruction"] == f"Passage: {SQUAD_ROW['context']}\n\nQuestion: {SQUAD_ROW['question']} #8"
    assert record["output"] == record["answer"] == "Denver Broncos"
    assert record["meta"] == {"answers": ["Denver Broncos", "the Denver Broncos"], "id": "8"}
    assert task.metrics == ("exact_match", "f1")


def test_squad_v2_unanswerable_is_an_error_naming_the_row(tmp_path: Path) -> None:
    rows = [SQUAD_ROW, dict(SQUAD_ROW, answers={"text": [], "answer_start": []})]
    repo = str(write_hub_repo(tmp_path / "squad_v2", {"plain_text": {"train": rows}}))
    with pytest.raises(ValueError, match=r"split 'train'\) row 1: field 'answers' has no gold text"):
        _tasks(format="squad", dataset=repo, splits={"train": "train"})


def test_alpaca_json_with_field_mapping(tmp_path: Path) -> None:
    rows = [
        {"instruction": f"q{i}", "context": f"c{i}", "response": f"r{i}", "category": "qa"} for i in range(9)
    ]
    path = write_json(tmp_path / "dolly.json", rows)
    fields = {"input": "context", "output": "response"}
    task = _tasks(key="dolly", dataset="json", data_files=str(path), ratios=[7, 2], fields=fields)["dolly"]
    train_idx, _ = ratio_split_indices(9, [7, 2], 2333)
    assert [r["instruction"] for r in task.splits["train"]] == [f"q{i}" for i in train_idx]
    assert task.splits["train"][0]["input"] == f"c{train_idx[0]}"


COMMONSENSE = [
    {
        "instruction": "Please answer the following question with true or false, question: is it?\n\n"
        "Answer format: true/false",
        "input": "",
        "output": "the correct answer is true",
        "answer": "true",
    },
    {
        "instruction": "Please choose the correct answer to the question: which?\n\nAnswer1: a Answer2: b "
        "Answer3: c\n\nAnswer format: answer1/answer2/answer3",
        "input": "",
        "output": "the correct answer is answer2",
        "answer": "answer2",
    },
]


def test_commonsense_choices_from_subtask_answer_format_or_config(tmp_path: Path) -> None:
    boolq = write_json(tmp_path / "boolq" / "test.json", [COMMONSENSE[0]] * 3)
    mixed = write_json(tmp_path / "commonsense_170k.json", COMMONSENSE * 3)
    fmt = {"format": "commonsense_mc", "ratios": [1, 1, 1], "dedup": False}
    by_task = _tasks(files=[{"path": str(boolq), "task": "boolq"}], **fmt)["boolq"]
    assert by_task.splits["train"][0]["meta"] == {"choices": ["true", "false"]}
    assert by_task.metrics == ("mc_accuracy",)
    per_record = _tasks(dataset="json", data_files=str(mixed), key="cs", **fmt)["cs"]
    labels = {r["answer"]: r["meta"]["choices"] for s in per_record.splits.values() for r in s}
    assert labels == {"true": ["true", "false"], "answer2": ["answer1", "answer2", "answer3"]}
    explicit = _tasks(files=[str(mixed)], choices=["true", "false", "answer2"], **fmt)
    assert explicit["commonsense_170k"].splits["val"][0]["meta"]["choices"] == ["true", "false", "answer2"]
    wrong = write_json(tmp_path / "wrong.json", [dict(COMMONSENSE[0], answer="maybe")])
    with pytest.raises(ValueError, match=r"wrong\.json record #0: field 'answer' is 'maybe', not one of"):
        _tasks(files=[str(wrong)], **fmt)


# -- locations and errors -------------------------------------------------------------------------
def test_builder_files_come_from_local_dir_else_fail_fast_with_the_fetch_command(tmp_path: Path) -> None:
    source = {
        "key": "auto_cot",
        "dataset": "json",
        "local_dir": str(tmp_path / "Alpaca-CoT"),
        "data_files": "Auto-CoT/Auto-CoT.json",
        "hub_repo": "QingyiSi/Alpaca-CoT",
        "ratios": [7, 2],
    }
    started = time.perf_counter()
    with pytest.raises(DataNotAvailableError) as err:
        _tasks(**source)
    assert time.perf_counter() - started < 5
    message = str(err.value)
    assert "data.sources.auto_cot: data file 'Auto-CoT/Auto-CoT.json' not found" in message
    assert (
        f"hf download --repo-type dataset QingyiSi/Alpaca-CoT Auto-CoT/Auto-CoT.json --local-dir {tmp_path}/Alpaca-CoT"
        in message
    )
    write_json(tmp_path / "Alpaca-CoT" / "Auto-CoT" / "Auto-CoT.json", alpaca_rows(18))
    assert len(_tasks(**source)["auto_cot"].splits["train"]) == 14


def test_offline_uncached_hub_id_fails_fast_naming_the_download(tmp_path: Path) -> None:
    started = time.perf_counter()
    with pytest.raises(DataNotAvailableError) as err:
        _tasks(
            key="gsm8k", format="gsm8k", dataset="openai/gsm8k", name="main", local_dir=str(tmp_path / "g")
        )
    assert time.perf_counter() - started < 5
    message = str(err.value)
    assert "data.sources.gsm8k: dataset 'openai/gsm8k' 'main' is not available locally" in message
    assert f"hf download --repo-type dataset openai/gsm8k --local-dir {tmp_path}/g" in message


def test_missing_column_and_split_are_named(tmp_path: Path) -> None:
    repo = str(_gsm8k_repo(tmp_path / "gsm8k"))
    with pytest.raises(ValueError, match=r"has no column 'problem'.*its columns: question, answer"):
        _tasks(
            format="gsm8k", dataset=repo, name="main", fields={"question": "problem"}, splits={"test": "test"}
        )
    with pytest.raises(ValueError, match=r"has no split 'validation'"):
        _tasks(format="gsm8k", dataset=repo, name="main", splits={"train": "train", "val": "validation"})


def test_gsm8k_without_final_answer_names_the_row(tmp_path: Path) -> None:
    rows = [*GSM8K_TRAIN[:2], {"question": "q", "answer": "no marker"}]
    repo = str(write_hub_repo(tmp_path / "g", {"main": {"train": rows}}))
    with pytest.raises(ValueError, match=r"row 2: field 'answer' has no final '#### N' line"):
        _tasks(format="gsm8k", dataset=repo, name="main", splits={"train": "train"})


# -- presets --------------------------------------------------------------------------------------
def _build(overrides: list[str], tmp_path: Path, tokenizer: PreTrainedTokenizerFast):
    cfg = compose_train(overrides, tmp_path / "run")
    dm = instantiate(cfg.data, tokenizer=tokenizer)
    dm.setup("fit")
    next(iter(dm.train_dataloader()))
    next(iter(dm.val_dataloader()))
    return cfg, dm


def test_files_preset(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    a = write_json(tmp_path / "a.json", alpaca_rows(20, "a"))
    cfg, dm = _build(["data=files", f"data.paths=[{a}]", "data.ratios=[7,2]"], tmp_path, tokenizer)
    assert cfg.data.template == "alpaca" and dm.task_names == ["a"]
    assert dm.metrics_for("a") == ("rougeL", "rouge1", "rouge2", "bleu")
    assert len(dm.records("train")) == len(ratio_split_indices(20, [7, 2], 2333)[0])


def test_hycam5_preset_reads_the_alpaca_cot_layout(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    files = {
        "Auto-CoT/Auto-CoT.json": "auto_cot",
        "CodeAlpaca/code_alpaca.json": "code_alpaca",
        "dolly/dolly.json": "dolly",
        "self-iCliniq/iCliniq.json": "icliniq",
        "webGPT/webGPT.json": "webgpt",
    }
    for path, task in files.items():
        write_json(tmp_path / "data" / "Alpaca-CoT" / path, alpaca_rows(27, task))
    cfg, dm = _build(["data=hycam5", f"paths.data_dir={tmp_path}/data"], tmp_path, tokenizer)
    assert dm.task_names == sorted(files.values()) and dm.loss_on_prompt and cfg.data.template == "alpaca"
    train_idx, eval_idx = ratio_split_indices(27, [7, 2], 2333)
    assert len(dm.records("train")) == 5 * len(train_idx) and len(dm.records("test")) == 5 * len(eval_idx)
    webgpt = [r for r in dm.records("test") if r["task"] == "webgpt"]
    assert [r["instruction"] for r in webgpt] == [f"webgpt question {i}" for i in eval_idx]


def test_hycam5_preset_names_the_missing_file(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    cfg = compose_train(["data=hycam5", f"paths.data_dir={tmp_path}/data"], tmp_path / "run")
    with pytest.raises(DataNotAvailableError, match=r"data file 'Auto-CoT/Auto-CoT\.json' not found"):
        instantiate(cfg.data, tokenizer=tokenizer).setup()


def test_mix3_real_preset_on_local_copies(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    data = tmp_path / "data"
    _gsm8k_repo(data / "openai" / "gsm8k")
    _mbpp_repo(data / "google-research-datasets" / "mbpp")
    _squad_repo(data / "rajpurkar" / "squad")
    overrides = [
        "data=mix3_real",
        f"paths.data_dir={data}",
        "data.sources.gsm8k.splits={train: 'train[:-2]', val: 'train[-2:]', test: test}",
        "data.sources.squad.splits={train: 'train[:-2]', val: 'train[-2:]', test: validation}",
    ]
    _, dm = _build(overrides, tmp_path, tokenizer)
    assert dm.task_names == ["gsm8k", "mbpp", "squad"]
    assert [dm.metrics_for(t)[0] for t in dm.task_names] == ["numeric_match", "pass@1", "exact_match"]
    assert all(dm.max_new_tokens_for(t) >= 2 for t in dm.task_names)


def test_mix3_real_offline_without_copies_fails_fast(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    cfg = compose_train(["data=mix3_real", f"paths.data_dir={tmp_path}/data"], tmp_path / "run")
    started = time.perf_counter()
    with pytest.raises(DataNotAvailableError, match=r"hf download --repo-type dataset openai/gsm8k"):
        instantiate(cfg.data, tokenizer=tokenizer).setup()
    assert time.perf_counter() - started < 5
