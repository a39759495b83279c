"""File sources: JSON/JSONL reading, task naming, HyCAM's exact 7:2 split, dedup, errors, the datamodule."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import PreTrainedTokenizerFast

from mtpeft.data.datamodule import MultiTaskDataModule
from mtpeft.data.sources import load_sources, parse_sources
from mtpeft.data.sources.splits import ratio_split_indices
from mtpeft.data.templates import get_template
from tests.data_sources_util import alpaca_rows, tiny_tokenizer, write_json, write_jsonl

CODE = "def add(a, b):\n\treturn a + b  # tabs, quotes \" and 'single'\n"
UNICODE = "Übersetze: «naïve café» → 日本語 🙂"


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return tiny_tokenizer()


def _load(files: list, **options) -> dict:
    """Load one files source; returns task -> splits."""
    return {t.name: t for t in load_sources(parse_sources({"src": {"files": files, **options}}))}


REPO = Path(__file__).resolve().parent.parent


def _mixed_rows() -> list[dict]:
    rows = alpaca_rows(18, "plain")
    rows[0] = {"instruction": UNICODE, "input": "", "output": "Japanese 🙂"}
    rows[1] = {"instruction": "Write add", "input": "in Python", "output": CODE}
    return rows


# -- reading --------------------------------------------------------------------------------------
@pytest.mark.parametrize("writer", [write_json, write_jsonl])
def test_json_and_jsonl_keep_non_ascii_and_code_text(tmp_path: Path, writer) -> None:
    suffix = ".json" if writer is write_json else ".jsonl"
    path = writer(tmp_path / f"mixed{suffix}", _mixed_rows())
    (task,) = _load([str(path)], ratios=[1, 1, 1], dedup=False).values()
    records = [r for split in ("train", "val", "test") for r in task.splits[split]]
    by_instruction = {r["instruction"]: r for r in records}
    assert task.name == "mixed" and len(records) == 18
    assert by_instruction[UNICODE]["output"] == "Japanese 🙂"
    code = by_instruction["Write add"]
    assert code["output"] == CODE and code["input"] == "in Python" and code["answer"] == CODE
    assert task.metrics == ("rougeL", "rouge1", "rouge2", "bleu")


def test_task_from_field_else_file_stem_else_override(tmp_path: Path) -> None:
    rows = [{**r, "task": "tagged"} for r in alpaca_rows(10, "t")] + alpaca_rows(10, "u")
    path = write_jsonl(tmp_path / "stem_name.jsonl", rows)
    tasks = _load([str(path)], ratios=[8, 1, 1])
    assert set(tasks) == {"tagged", "stem_name"}
    assert all(r["task"] == "tagged" for split in tasks["tagged"].splits.values() for r in split)
    forced = _load([{"path": str(path), "task": "forced"}], ratios=[8, 1, 1])
    assert set(forced) == {"forced"}


def test_relative_paths_resolve_against_the_original_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under Hydra a job may run in its output directory; data paths stay relative to where it started."""
    from tests.conftest import compose_train

    write_json(tmp_path / "data" / "rel.json", alpaca_rows(9))
    monkeypatch.chdir(tmp_path)
    compose_train(["data=files", "data.paths=[data/rel.json]"], tmp_path / "run")  # runtime.cwd = tmp_path
    (tmp_path / "run").mkdir(exist_ok=True)
    monkeypatch.chdir(tmp_path / "run")  # what hydra.job.chdir=true would do
    assert set(_load(["data/rel.json"], ratios=[7, 2])) == {"rel"}


# -- splits ---------------------------------------------------------------------------------------
def _deepspeed_chat_reference(n: int, seed: int, data_split: str) -> list[np.ndarray]:
    """DeepSpeed-Chat's get_raw_dataset_split_index (HyCAM's copy), without the .npy cache."""
    splits = [float(s) for s in data_split.split(",")]
    splits = [split / sum(splits) for split in splits]
    splits_index = [0]
    for index, split in enumerate(splits):
        splits_index.append(splits_index[index] + int(round(split * float(n))))
    diff = splits_index[-1] - n
    for index in range(1, len(splits_index)):
        splits_index[index] -= diff
    shuffle_idx = np.arange(start=0, stop=n, step=1, dtype=np.uint32)
    np.random.RandomState(seed=seed).shuffle(shuffle_idx)
    return [shuffle_idx[splits_index[i] : splits_index[i + 1]] for i in range(len(splits))]


@pytest.mark.parametrize("n", [1, 2, 9, 10, 101, 5816])
def test_ratio_split_is_hycams_exact_7_2_split_with_seed_2333(n: int) -> None:
    expected = _deepspeed_chat_reference(n, 2333, "7,2")
    got = ratio_split_indices(n, [7, 2], 2333)
    assert [list(e) for e in expected] == got
    if n == 5816:  # Auto-CoT.json
        assert (len(got[0]), len(got[1])) == (4524, 1292)


def test_files_source_uses_that_split_per_file(tmp_path: Path) -> None:
    rows = alpaca_rows(23)
    path = write_json(tmp_path / "auto.json", rows)
    (task,) = _load([str(path)], ratios=[7, 2], split_seed=2333).values()
    train_idx, eval_idx = _deepspeed_chat_reference(23, 2333, "7,2")
    assert task.splits["train"] == [_as_record(rows[i], "auto") for i in train_idx]
    assert task.splits["val"] == task.splits["test"] == [_as_record(rows[i], "auto") for i in eval_idx]


def _as_record(row: dict, task: str) -> dict:
    return {**row, "task": task, "answer": row["output"], "meta": {}}


def test_split_is_deterministic_and_depends_on_the_split_seed(tmp_path: Path) -> None:
    path = str(write_jsonl(tmp_path / "d.jsonl", alpaca_rows(40)))
    first = _load([path], ratios=[8, 1, 1], split_seed=1)["d"].splits
    assert _load([path], ratios=[8, 1, 1], split_seed=1)["d"].splits == first
    assert _load([path], ratios=[8, 1, 1], split_seed=2)["d"].splits != first
    assert [len(first[s]) for s in ("train", "val", "test")] == [32, 4, 4]


def test_eval_prompts_seen_in_train_are_dropped_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rows = alpaca_rows(30) + [dict(r, output="another target") for r in alpaca_rows(30)]
    path = str(write_json(tmp_path / "dup.json", rows))
    with caplog.at_level(logging.WARNING, logger="mtpeft.data.sources.load"):
        splits = _load([path], ratios=[7, 2])["dup"].splits
    train_prompts = {r["instruction"] for r in splits["train"]}
    assert splits["val"] and not any(r["instruction"] in train_prompts for r in splits["val"])
    kept_eval = len(splits["val"])
    _, eval_idx = _deepspeed_chat_reference(60, 2333, "7,2")
    assert kept_eval < len(eval_idx)
    assert f"dropped {len(eval_idx) - kept_eval} val and {len(eval_idx) - kept_eval} test" in caplog.text
    kept = _load([path], ratios=[7, 2], dedup=False)["dup"].splits
    assert len(kept["val"]) == len(eval_idx)


def test_limit_takes_a_seeded_subset(tmp_path: Path) -> None:
    path = str(write_json(tmp_path / "big.json", alpaca_rows(50)))
    full = _load([path], ratios=[8, 1, 1])["big"].splits
    small = _load([path], ratios=[8, 1, 1], limit={"train": 7})["big"].splits
    assert len(small["train"]) == 7 and all(r in full["train"] for r in small["train"])
    assert small["val"] == full["val"]


# -- errors ---------------------------------------------------------------------------------------
def test_malformed_jsonl_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": }\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl line 3: malformed JSON"):
        _load([str(path)])


def test_malformed_json_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    text = json.dumps(alpaca_rows(3), indent=2)
    path.write_text(text.replace('"output": "item answer 1"', '"output": "item answer 1",,'))
    line = text.splitlines().index('    "output": "item answer 1"') + 1
    with pytest.raises(ValueError, match=rf"bad\.json line {line}: malformed JSON"):
        _load([str(path)])


def test_missing_field_names_field_and_record(tmp_path: Path) -> None:
    rows = alpaca_rows(5)
    del rows[3]["output"]
    with pytest.raises(ValueError, match=r"m\.jsonl line 4: required field 'output' is missing"):
        _load([str(write_jsonl(tmp_path / "m.jsonl", rows))])
    with pytest.raises(ValueError, match=r"m\.json record #3: required field 'output' is missing"):
        _load([str(write_json(tmp_path / "m.json", rows))])
    rows[3]["output"] = ["not", "text"]
    with pytest.raises(ValueError, match=r"m\.json record #3: field 'output' must be a string"):
        _load([str(write_json(tmp_path / "m.json", rows))])


def test_mapped_field_and_bad_task_name_are_named(tmp_path: Path) -> None:
    rows = [{"instruction": "q", "context": "", "response": "a"}] * 3
    path = str(write_jsonl(tmp_path / "dolly.jsonl", rows))
    with pytest.raises(ValueError, match=r"line 1: required field 'output' is missing"):
        _load([path])
    tasks = _load([path], ratios=[1, 1, 1], fields={"output": "response", "input": "context"}, dedup=False)
    assert tasks["dolly"].splits["train"][0]["output"] == "a"
    bad = str(write_jsonl(tmp_path / "t.jsonl", [{"instruction": "q", "output": "a", "task": "a/b"}]))
    with pytest.raises(ValueError, match=r"t\.jsonl line 1: field 'task'.*without '/'"):
        _load([bad])


def test_empty_file_and_empty_task_are_errors(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl: no records"):
        _load([str(tmp_path / "empty.jsonl")])
    with pytest.raises(ValueError, match=r"task 'tiny' has no val records"):
        _load([str(write_json(tmp_path / "tiny.json", alpaca_rows(3)))], ratios=[8, 1, 1])
    same = [{"instruction": "same", "input": "", "output": f"target {i}"} for i in range(9)]
    with pytest.raises(ValueError, match=r"no val records after dropping 2 duplicates"):
        _load([str(write_json(tmp_path / "same.json", same))], ratios=[7, 2])


def test_missing_file_and_config_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data file 'nope\.json' not found"):
        _load(["nope.json"])
    with pytest.raises(
        ValueError, match=r"unknown key data\.sources\.x\.ratio: .*\(did you mean 'ratios'\?\); valid keys: "
    ):
        parse_sources({"x": {"files": ["a.json"], "ratio": [7, 2]}})
    with pytest.raises(ValueError, match=r"unknown key data\.sources\.x\.keep_calculator:.*format 'alpaca'"):
        parse_sources({"x": {"files": ["a.json"], "keep_calculator": True}})
    with pytest.raises(ValueError, match=r"valid keys: .*keep_calculator.*format 'gsm8k'"):
        parse_sources({"x": {"files": ["a.json"], "format": "gsm8k", "keep_calculater": True}})
    with pytest.raises(ValueError, match=r"data\.sources\.x\.limit\.val=True is not valid: .*integer"):
        parse_sources({"x": {"files": ["a.json"], "limit": {"val": True}}})
    with pytest.raises(ValueError, match=r"data\.sources\.x\.files\[1\]\.task: a task name must be"):
        parse_sources({"x": {"files": ["a.json", {"path": "b.json", "task": "a/b"}]}})
    with pytest.raises(ValueError, match=r"exactly one location"):
        parse_sources({"x": {"format": "alpaca"}})
    with pytest.raises(ValueError, match=r"ratios must be 2 numbers"):
        parse_sources([{"files": ["a.json"], "ratios": [1]}])
    with pytest.raises(ValueError, match=r"unknown data format 'alpacca'"):
        parse_sources({"x": {"files": ["a.json"], "format": "alpacca"}})


def test_directory_is_reported_as_a_directory(tmp_path: Path) -> None:
    write_json(tmp_path / "folder" / "inside.json", alpaca_rows(3))
    with pytest.raises(IsADirectoryError, match=r"'.*folder' is a directory .*\(it holds inside\.json\)"):
        _load([str(tmp_path / "folder")])


def test_single_json_object_says_a_list_was_expected(tmp_path: Path) -> None:
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"instruction": "q", "output": "a"}, indent=2))
    with pytest.raises(ValueError, match=r"one\.json: expected a list of records .*one JSON object"):
        _load([str(path)])
    path.write_text(json.dumps({"instruction": "q", "output": "a"}))  # one line: still not JSON Lines
    with pytest.raises(ValueError, match=r"expected a list of records"):
        _load([str(path)])
    path.write_text(json.dumps({"version": 2, "data": alpaca_rows(4)}))
    with pytest.raises(ValueError, match=r"its key 'data' holds a list of 4 items: save that list alone"):
        _load([str(path)])
    write_jsonl(tmp_path / "lines.json", alpaca_rows(10))  # JSON Lines named .json still reads
    assert sum(len(s) for s in _load([str(tmp_path / "lines.json")])["lines"].splits.values()) == 10


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_non_utf8_bytes_name_file_line_and_byte_offset(tmp_path: Path, suffix: str) -> None:
    good = "".join(json.dumps(r) + "\n" for r in alpaca_rows(3)).encode()
    path = tmp_path / f"latin{suffix}"
    path.write_bytes(good + b'{"instruction": "caf' + b"\xe9" + b'", "output": "x"}\n')
    offset = len(good) + len('{"instruction": "caf')
    with pytest.raises(
        ValueError, match=rf"latin\{suffix} line 4: byte 0xe9 at byte offset {offset} .*UTF-8"
    ):
        _load([str(path)])


def test_utf8_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(alpaca_rows(10)).encode())
    assert sum(len(s) for s in _load([str(path)])["bom"].splits.values()) == 10
    path.write_bytes(b"\xef\xbb\xbf" + b'[{"instruction": "\xff"}]')
    with pytest.raises(
        ValueError, match=r"bom\.json line 1: byte 0xff at byte offset 21 \(byte 22 of the line\)"
    ):
        _load([str(path)])


# -- datamodule -----------------------------------------------------------------------------------
def test_datamodule_from_files_yields_batches_with_the_tiny_tokenizer(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    a = write_json(tmp_path / "a.json", _mixed_rows())
    b = write_jsonl(tmp_path / "b.jsonl", alpaca_rows(20, "bee"))
    dm = MultiTaskDataModule.from_files(
        [str(a), str(b)],
        tokenizer,
        ratios=[7, 2],
        batch_size=4,
        eval_batch_size=3,
        template="alpaca",
        max_length=256,
    )
    dm.setup("fit")
    assert dm.task_names == ["a", "b"]
    assert dm.metrics_for("a") == ("rougeL", "rouge1", "rouge2", "bleu")
    longest = max(
        len(tokenizer(r["output"], add_special_tokens=False)["input_ids"]) for r in dm.records("train")
    )
    assert max(dm.max_new_tokens_for(t) for t in dm.task_names) == longest + 1
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4 and batch["task_ids"].dtype == torch.long
    alpaca = get_template("alpaca")
    seen = []
    for batch in dm.val_dataloader():
        for row, index in enumerate(batch["index"].tolist()):
            prompt = tokenizer.decode(batch["prompt_ids"][row], skip_special_tokens=True)
            assert prompt == alpaca(dm.records("val")[index])[0]
            seen.append(index)
    assert seen == list(range(len(dm.records("val"))))


def test_generator_tasks_and_sources_mix(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    path = str(write_jsonl(tmp_path / "files.jsonl", alpaca_rows(20)))
    sources = {"mine": {"files": [path], "metrics": ["exact_match"], "max_new_tokens": 7}}
    dm = MultiTaskDataModule({"qa": {"train": 6, "val": 2, "test": 2}}, tokenizer, sources=sources)
    dm.setup()
    assert dm.task_names == ["files", "qa"]
    assert dm.metrics_for("files") == ("exact_match",) and dm.max_new_tokens_for("files") == 7
    assert dm.metrics_for("qa") == ("exact_match",) and dm.max_new_tokens_for("qa") == 8
    assert dm.sampler.task_names == ["files", "qa"]
    assert [r["task"] for r in dm.records("test")] == ["files"] * 2 + ["qa"] * 2
    with pytest.raises(
        ValueError, match=r"task 'qa' from data.sources.clash has the name of a generator task"
    ):
        MultiTaskDataModule(
            {"qa": {"train": 2}}, tokenizer, sources={"clash": {"files": [{"path": path, "task": "qa"}]}}
        ).setup()


def test_generator_task_with_train_0_is_evaluation_only(tokenizer: PreTrainedTokenizerFast) -> None:
    """``data.tasks.<t>.train=0``: never drawn for training, still in val and test (and in the task ids)."""
    dm = MultiTaskDataModule(
        {"qa": {"train": 0, "val": 2, "test": 2}, "reasoning": {"train": 6, "val": 2, "test": 2}}, tokenizer
    )
    dm.setup()
    assert dm.task_names == ["qa", "reasoning"] and dm.sampler.task_names == ["reasoning"]
    drawn = {dm.examples("train")[i].task_id for i in dm.sampler}
    assert drawn == {dm.task_id("reasoning")}
    for split in ("val", "test"):
        assert [r["task"] for r in dm.records(split)] == ["qa"] * 2 + ["reasoning"] * 2


def test_source_tasks_stay_out_of_the_global_registry(tmp_path: Path, tokenizer) -> None:
    from mtpeft.data.tasks import available_tasks

    before = available_tasks()
    path = str(write_jsonl(tmp_path / "private.jsonl", alpaca_rows(20)))
    MultiTaskDataModule.from_files([path], tokenizer).setup()
    assert available_tasks() == before


def test_overlength_counts_are_logged_per_task(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast, caplog: pytest.LogCaptureFixture
) -> None:
    long = [{"instruction": f"q {i}", "input": "", "output": "word " * 80} for i in range(10)]
    short = str(write_jsonl(tmp_path / "short.jsonl", alpaca_rows(10)))
    longp = str(write_jsonl(tmp_path / "long.jsonl", long))
    with caplog.at_level(logging.WARNING, logger="mtpeft.data.datamodule"):
        MultiTaskDataModule.from_files([short, longp], tokenizer, max_length=40).setup()
    assert (
        "train/long: 8 of 8 records exceed max_length=40" in caplog.text and "train/short" not in caplog.text
    )
    with pytest.raises(ValueError, match=r"every record of task 'long' is longer than max_length=40"):
        MultiTaskDataModule.from_files([short, longp], tokenizer, max_length=40, overlength="skip").setup()


def test_cli_trains_on_files_and_reports_rouge_and_bleu(tmp_path: Path) -> None:
    """``python -m mtpeft.train method=lora data=files data.paths=[...]``: every file task gets ROUGE/BLEU."""
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import TINY_RUN

    a = write_json(tmp_path / "alpha.json", _mixed_rows())
    b = write_jsonl(tmp_path / "beta.jsonl", alpaca_rows(20, "beta"))
    overrides = [o for o in TINY_RUN if not o.startswith("data.tasks.")]
    cmd = [
        sys.executable,
        "-m",
        "mtpeft.train",
        "method=lora",
        "data=files",
        f"data.paths=[{a},{b}]",
        *overrides,
    ]
    env = {**os.environ, "MTPEFT_ROOT": str(tmp_path)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = (tmp_path / "logs").rglob("results.json")
    results = json.loads(path.read_text())
    assert results["status"] == "success" and results["template"] == "alpaca"
    for task in ("alpha", "beta"):
        for metric in ("rougeL", "rouge1", "rouge2", "bleu"):
            assert 0.0 <= results["metrics"]["test"][f"test/{task}/{metric}"] <= 1.0
        assert (
            results["metrics"]["test"][f"test/{task}/score"]
            == results["metrics"]["test"][f"test/{task}/rougeL"]
        )


def test_hycam5_trains_on_local_files(tmp_path: Path) -> None:
    """``data=hycam5`` with the five Alpaca-CoT files in ``paths.data_dir``: five tasks, HyCAM's loss."""
    from mtpeft.run import run
    from tests.conftest import TINY_RUN, compose_train

    files = ["Auto-CoT/Auto-CoT.json", "CodeAlpaca/code_alpaca.json", "dolly/dolly.json"]
    files += ["self-iCliniq/iCliniq.json", "webGPT/webGPT.json"]
    for i, name in enumerate(files):
        write_json(tmp_path / "data" / "Alpaca-CoT" / name, alpaca_rows(27, f"source{i}"))
    overrides = [o for o in TINY_RUN if not o.startswith(("data.tasks.", "data.batch_size"))]
    overrides += ["data=hycam5", f"paths.data_dir={tmp_path / 'data'}", "data.max_length=96", "method=hycam"]
    results = run(compose_train(overrides, tmp_path / "run"), tmp_path / "run")
    assert results["status"] == "success" and results["template"] == "alpaca"
    assert sorted(results["tasks"]) == ["auto_cot", "code_alpaca", "dolly", "icliniq", "webgpt"]
    assert {f"test/{t}/bleu" for t in results["tasks"]} <= results["metrics"]["test"].keys()


def test_task_name_avg_is_reserved(tmp_path: Path) -> None:
    """``<split>/avg/score`` is the macro average: a task named avg would have its score overwritten."""
    path = str(write_jsonl(tmp_path / "a.jsonl", alpaca_rows(9)))
    with pytest.raises(ValueError, match=r"data\.sources\.x\.task: task name 'avg' is reserved"):
        parse_sources({"x": {"files": [path], "task": "avg"}})
    with pytest.raises(ValueError, match=r"data\.sources\.x\.files\[0\]\.task: task name 'avg' is reserved"):
        parse_sources({"x": {"files": [{"path": path, "task": " avg "}]}})
    rows = [{**row, "task": "avg"} for row in alpaca_rows(9)]
    bad = str(write_jsonl(tmp_path / "t.jsonl", rows))
    with pytest.raises(ValueError, match=r"t\.jsonl line 1: field 'task': task name 'avg' is reserved"):
        _load([bad])
