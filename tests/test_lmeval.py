"""lm-evaluation-harness integration: mtpeft tasks exported as lm-eval tasks, and the ``mtpeft`` model type
scoring a run's adapted model. On the exported qa test split, lm-eval's generations and exact match equal
mtpeft's own test predictions and EM record for record (LoRA and HyCAM). lm-eval tests skip without the
``lmeval`` extra."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mtpeft.export import build_datamodule, lmeval_task_name, lmeval_task_spec, read_run_config
from mtpeft.export import main as export_main
from mtpeft.metrics.base import golds
from mtpeft.metrics.exact_match import normalize_answer
from mtpeft.metrics.tracker import SCORES_FILE, read_example_scores
from mtpeft.models.loader import load_base_model
from mtpeft.run import run
from tests.conftest import TINY_RUN, compose_train

REPO = Path(__file__).resolve().parent.parent
TASK = lmeval_task_name("qa", "test")
#: A random (not pre-trained) base gives varied generations, so equal predictions mean something; one
#: generation budget for every task, as lm-eval uses one per task (mtpeft otherwise uses a batch's largest).
RUN_OVERRIDES = ["model.pretrain.steps=0", "evaluation.max_new_tokens=8", "logger=none"]
METHODS = {"lora": ["method.init_weights=false"], "hycam": []}


def _train(method: str, out: Path) -> Path:
    cfg = compose_train([*TINY_RUN, *RUN_OVERRIDES, f"method={method}", *METHODS[method]], out)
    run(cfg, out)
    return out


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train("lora", tmp_path_factory.mktemp("lmeval") / "run-lora")


def test_only_exact_match_tasks_are_exported(lora_run: Path, tmp_path: Path, capsys) -> None:
    """An exported task scores exact match, so tasks scored otherwise (mix3's code: pass@1, reasoning:
    numeric match) are refused when named and left out, saying so, when not."""
    assert (
        export_main([str(lora_run), "--lmeval-task", "--task", "reasoning", "--out", str(tmp_path / "r")])
        == 1
    )
    assert "task 'reasoning' is scored by numeric_match" in capsys.readouterr().err
    merged = tmp_path / "m"
    assert (
        export_main([str(lora_run), "--merge", "--lmeval-task", "--task", "reasoning", "--out", str(merged)])
        == 1
    )
    assert "is scored by numeric_match" in capsys.readouterr().err and not merged.exists()  # nothing written
    assert export_main([str(lora_run), "--lmeval-task", "--out", str(tmp_path / "all")]) == 0
    assert "skips code, reasoning (not scored by exact_match)" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "all" / "lmeval").glob("*.yaml")) == [f"{TASK}.yaml"]


def test_exported_task_holds_the_runs_prompts_and_answers(lora_run: Path, tmp_path: Path) -> None:
    assert export_main([str(lora_run), "--lmeval-task", "--task", "qa", "--out", str(tmp_path)]) == 0
    spec = _read_task_yaml(tmp_path / "lmeval" / f"{TASK}.yaml")
    assert spec["task"] == TASK and spec["output_type"] == "generate_until"
    assert spec["generation_kwargs"]["max_gen_toks"] == 8
    rows = [
        json.loads(line)
        for line in Path(spec["dataset_kwargs"]["data_files"]["test"]).read_text().splitlines()
    ]
    cfg = read_run_config(lora_run)
    datamodule = build_datamodule(cfg, load_base_model(cfg.model)[1])
    datamodule.setup("test")
    records = datamodule.records("test")
    assert [r["index"] for r in rows] == [i for i, r in enumerate(records) if r["task"] == "qa"]
    for row in rows:
        record = records[row["index"]]
        assert row["prompt"] == datamodule.template(record)[0]
        assert row["answers"] == golds(record)


def _read_task_yaml(path: Path) -> dict:
    """An exported task YAML with its ``!function`` tags as their text."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: f"!function {node.value}")
    return yaml.load(path.read_text(), Loader=Loader)  # noqa: S506 - SafeLoader plus one tag


PAIRS = [  # prediction, gold, SQuAD exact match
    (" 7", "7", 1.0),
    ("Lima.", "lima", 1.0),
    ("the cat", "cat", 1.0),
    ("The  New York ", "new york", 1.0),
    (" 7 8", "7", 0.0),
    ("13", "31", 0.0),
    ("an apple!", "Apple", 1.0),
    ("a", "", 1.0),
    ("x,y", "xy", 1.0),
    ("white", "black", 0.0),
    ("new york", "newyork", 0.0),  # lm-eval's regexes_to_ignore=[\s+] would call these equal
    ("a-b", "ab", 1.0),
    ("the-end", "end", 0.0),  # punctuation goes before articles: "theend"
]


def test_lmeval_metric_is_mtpeft_exact_match(tmp_path: Path) -> None:
    """The exported task's metric, as lm-eval loads it (``!function`` beside the YAML), is SQuAD EM."""
    pytest.importorskip("lm_eval")
    from lm_eval.filters.extraction import WhitespaceFilter
    from lm_eval.tasks._yaml_loader import load_yaml

    from mtpeft.export import LMEVAL_METRIC_MODULE, LMEVAL_METRIC_SOURCE, lmeval_task_yaml

    (tmp_path / f"{LMEVAL_METRIC_MODULE}.py").write_text(LMEVAL_METRIC_SOURCE)
    (tmp_path / "t.yaml").write_text(lmeval_task_yaml(lmeval_task_spec("t", Path("t.jsonl"), 8)))
    metric = load_yaml(tmp_path / "t.yaml")["metric_list"][0]["metric"]  # as TaskManager loads it
    for prediction, gold, expected in PAIRS:
        (filtered,) = WhitespaceFilter().apply([[prediction]], [{}])
        assert metric(references=[gold], predictions=filtered)["exact_match"] == expected, (prediction, gold)
        assert float(normalize_answer(prediction) == normalize_answer(gold)) == expected, (prediction, gold)
    assert metric(references=["x", "lima"], predictions=["Lima", "Lima"])["exact_match"] == 1.0  # any gold


def _plant_matching_answers(task_file: Path, ours: dict[int, dict]) -> set[int]:
    """Give every other exported record a gold answer equal to mtpeft's prediction up to SQuAD
    normalisation (``The <prediction>.``), so lm-eval must score matches as well as misses (a random
    model's predictions miss every real answer). Returns the indices of the planted records."""
    rows = [json.loads(line) for line in task_file.read_text().splitlines()]
    planted = {row["index"] for row in rows[::2]}
    for row in rows:
        if row["index"] in planted:
            row["answers"] = [f"The {ours[row['index']]['prediction']}."]
    task_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return planted


def _evaluate(run_dir: Path, include: Path, **extra: str):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import mtpeft.lmeval  # noqa: F401  (registers the "mtpeft" model type)

    args = ",".join(f"{k}={v}" for k, v in {"run": run_dir, **extra}.items())
    manager = TaskManager(include_path=str(include), include_defaults=False)
    return lm_eval.simple_evaluate(
        model="mtpeft", model_args=args, tasks=[TASK], task_manager=manager, log_samples=True, batch_size=1
    )


@pytest.mark.parametrize("method", sorted(METHODS))
def test_lmeval_em_equals_mtpeft_test_em_record_for_record(
    method: str, lora_run: Path, tmp_path: Path
) -> None:
    pytest.importorskip("lm_eval")
    run_dir = lora_run if method == "lora" else _train(method, tmp_path / f"run-{method}")
    assert export_main([str(run_dir), "--lmeval-task", "--task", "qa", "--out", str(tmp_path / "x")]) == 0
    ours = {
        r["index"]: r
        for r in read_example_scores(run_dir / SCORES_FILE)
        if r["split"] == "test" and r["task"] == "qa"
    }
    hits = _plant_matching_answers(tmp_path / "x" / "lmeval" / f"{TASK}.jsonl", ours)
    results = _evaluate(run_dir, tmp_path / "x" / "lmeval", task="qa")
    theirs = {s["doc"]["index"]: s for s in results["samples"][TASK]}
    assert len(ours) == 6 and theirs.keys() == ours.keys()
    for index, row in ours.items():
        assert theirs[index]["filtered_resps"] == [row["prediction"].strip()], index
        expected = 1.0 if index in hits else row["scores"]["exact_match"]
        assert theirs[index]["exact_match"] == expected, index
    expected_em = sum(1.0 if i in hits else row["scores"]["exact_match"] for i, row in ours.items()) / len(
        ours
    )
    assert results["results"][TASK]["exact_match,strip"] == pytest.approx(expected_em)
    if method == "lora":  # a random base with a random adapter: the generations vary with the input
        assert len({row["prediction"] for row in ours.values()}) > 1


def test_task_conditioned_method_needs_the_task(tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    from mtpeft.lmeval import MtpeftLM
    from tests.test_export import make_run

    run_dir, _ = make_run("mtl_lora", tmp_path)
    with pytest.raises(ValueError, match="task-conditioned: pass the task"):
        MtpeftLM(run=str(run_dir))
    with pytest.raises(ValueError, match="task 'nope'"):
        MtpeftLM(run=str(run_dir), task="nope")


@pytest.mark.slow
def test_command_line(lora_run: Path, tmp_path: Path) -> None:
    """``python -m mtpeft.lmeval`` is lm-eval's CLI with the mtpeft model type (indexes lm-eval's own tasks)."""
    pytest.importorskip("lm_eval")
    assert export_main([str(lora_run), "--lmeval-task", "--task", "qa", "--out", str(tmp_path)]) == 0
    command = [sys.executable, "-m", "mtpeft.lmeval", "--model", "mtpeft", "--model_args"]
    command += [f"run={lora_run},task=qa", "--tasks", TASK, "--include_path", str(tmp_path / "lmeval")]
    command += ["--output_path", str(tmp_path / "results"), "--device", "cpu"]
    proc = subprocess.run(command, cwd=REPO, env=os.environ, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert TASK in proc.stdout and "exact_match" in proc.stdout
    assert list((tmp_path / "results").rglob("results_*.json"))


REQUESTS = [("context : the owl is red . question : what is red ? answer :", " owl"), ("12 + 7 =", " 19")]


def _loglikelihoods(lm, requests=REQUESTS) -> list[float]:
    from lm_eval.api.instance import Instance

    instances = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(requests)]
    return [logprob for logprob, _ in lm.loglikelihood(instances)]


def test_loglikelihood_of_a_task_conditioned_method_is_its_merged_model(tmp_path: Path) -> None:
    """MTL-LoRA scored by ``mtpeft`` for task t equals plain HFLM on the merged model of t (and not of s)."""
    pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM

    from mtpeft.lmeval import MtpeftLM
    from tests.test_export import make_run

    run_dir, _ = make_run("mtl_lora", tmp_path)
    assert export_main([str(run_dir), "--merge", "--out", str(tmp_path / "m")]) == 0
    ours = _loglikelihoods(MtpeftLM(run=str(run_dir), task="qa", device="cpu"))
    merged = {
        t: _loglikelihoods(HFLM(pretrained=str(tmp_path / "m" / f"merged-{t}"), device="cpu"))
        for t in ("qa", "code")
    }
    assert ours == pytest.approx(merged["qa"], abs=1e-4)
    assert ours != pytest.approx(merged["code"], abs=1e-4)


def test_loglikelihood_goes_through_the_methods_own_forward(tmp_path: Path) -> None:
    """PEML (per-task prompts prepended inside its forward): lm-eval's scores equal a direct computation."""
    pytest.importorskip("lm_eval")
    import torch

    from mtpeft.lmeval import MtpeftLM
    from tests.test_export import TASKS, make_run

    run_dir, model = make_run("peml", tmp_path)
    lm = MtpeftLM(run=str(run_dir), task="reasoning", device="cpu")
    for (context, continuation), got in zip(REQUESTS, _loglikelihoods(lm), strict=True):
        context_ids, continuation_ids = lm._encode_pair(context, continuation)
        ids = torch.tensor([context_ids + continuation_ids])
        task_ids = torch.tensor([TASKS.index("reasoning")])
        with torch.no_grad():
            logprobs = model(input_ids=ids[:, :-1], task_ids=task_ids).logits.log_softmax(-1)[0]
        start = len(context_ids) - 1
        expected = sum(float(logprobs[start + i, token]) for i, token in enumerate(continuation_ids))
        assert got == pytest.approx(expected, abs=1e-4)
