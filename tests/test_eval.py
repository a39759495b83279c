"""``python -m mtpeft.eval``: scoring a saved adapter reproduces its run's own test metrics (run directory,
or a bare adapter directory with model= and data=), other data presets map tasks by name, a
task-conditioned method refuses untrained tasks, and a bare adapter without model= fails before loading."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from mtpeft import eval as mtpeft_eval
from mtpeft.bench.config import compose_run
from mtpeft.eval import TaskIdMap, evaluate
from mtpeft.export import load_adapted, read_run_config
from mtpeft.methods import build_method
from mtpeft.metrics.tracker import SCORES_FILE, read_example_scores
from mtpeft.models.loader import load_base_model
from mtpeft.results.load import load_runs
from mtpeft.run import method_options, run
from tests.conftest import TINY_RUN, compose_train

REPO = Path(__file__).resolve().parent.parent
#: The shrunken model and mix3 data of TINY_RUN, for a bare adapter directory (model= and data= given).
TINY_MODEL_DATA = [o for o in TINY_RUN if o.startswith(("model.", "data."))]
SHARED_KEYS = {
    "status",
    "method",
    "model",
    "tasks",
    "seed",
    "config",
    "config_hash",
    "metrics",
    "trainable_params",
    "total_params",
    "wall_time_s",
    "eval_s_per_1000_prompts",
    "peak_memory_mb",
    "eval_batch_size",
    "template",
    "provenance",
    "job_hash",
    "inputs",
}


def compose_eval(overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose conf/eval.yaml as ``python -m mtpeft.eval`` would, writing under ``output_dir``."""
    return compose_run(overrides, output_dir, config_name="eval")


def _evaluate(overrides: list[str], out: Path) -> dict:
    return evaluate(compose_eval(overrides, out), out)


def _save_hydra_config(cfg: DictConfig, run_dir: Path) -> None:
    """What Hydra writes into every run directory (the unresolved config)."""
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A trained ``method=lora`` run (seed 3, eval batch size 9) and its results."""
    run_dir = tmp_path_factory.mktemp("lora-run")
    cfg = compose_train([*TINY_RUN, "method=lora", "seed=3"], run_dir)
    _save_hydra_config(cfg, run_dir)
    return run_dir, run(cfg, run_dir)


def fake_run(method: str, tasks: list[str], root: Path) -> Path:
    """A run directory of ``method`` trained on ``tasks`` (untrained: a random adapter perturbed so that
    each task's update differs), as `python -m mtpeft.train` leaves it."""
    run_dir = root / f"run-{method}"
    cfg = compose_train([*TINY_RUN, f"method={method}", "method.init_weights=false"], run_dir)
    with open_dict(cfg):
        for task in [t for t in cfg.data.tasks if t not in tasks]:
            del cfg.data.tasks[task]
    base, _ = load_base_model(cfg.model)
    name, options = method_options(cfg)
    torch.manual_seed(0)
    model = build_method(name, options, base, num_tasks=len(tasks))
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
    _save_hydra_config(cfg, run_dir)
    (run_dir / "results.json").write_text(json.dumps({"status": "success", "tasks": tasks}))
    model.save_adapter(run_dir / "adapter")
    return run_dir


def test_eval_of_a_run_reproduces_its_test_metrics(lora_run: tuple[Path, dict], tmp_path: Path) -> None:
    run_dir, trained = lora_run
    results = _evaluate([f"adapter={run_dir}"], tmp_path)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["kind"] == "eval" and on_disk["status"] == "success" and on_disk.keys() >= SHARED_KEYS
    assert on_disk["metrics"] == {"test": trained["metrics"]["test"]}  # exactly the run's own test scores
    assert results["tasks"] == trained["tasks"] and results["method"] == "lora"
    assert results["seed"] == 3 and results["eval_batch_size"] == 9  # the run's, not conf/train.yaml's
    assert results["config"]["model"] == trained["config"]["model"]
    assert results["adapter"]["run_dir"] == str(run_dir.resolve())
    assert results["adapter"]["run_job_hash"] == trained["job_hash"]
    assert results["task_ids"] == {"code": 0, "qa": 1, "reasoning": 2}
    assert results["eval_s_per_1000_prompts"] > 0
    assert results["trainable_params"] == trained["trainable_params"]
    assert (tmp_path / "scores.jsonl.gz").is_file()
    assert load_runs([tmp_path]) == []  # mtpeft.results leaves evaluation records out
    assert len(load_runs([run_dir, tmp_path])) == 1


def test_sampled_eval_draws_the_runs_samples(tmp_path: Path) -> None:
    """With ``evaluation.num_samples`` > 1 each eval batch's sampling is seeded by the run's seed, its split
    and its first record, so evaluating the saved adapter draws the run's samples (the global RNG state
    differs: the run sampled after training)."""
    run_dir = tmp_path / "run"
    sampling = ["model.pretrain.steps=0", "evaluation.num_samples=2", "evaluation.max_new_tokens=6"]
    cfg = compose_train(
        [*TINY_RUN, *sampling, "logger=none", "method=lora", "method.init_weights=false"], run_dir
    )
    _save_hydra_config(cfg, run_dir)
    run(cfg, run_dir)
    _evaluate([f"adapter={run_dir}"], tmp_path / "eval")
    by_row = [
        {
            (r["task"], r["index"]): r["prediction"]
            for r in read_example_scores(d / SCORES_FILE)
            if r["split"] == "test"
        }
        for d in (run_dir, tmp_path / "eval")
    ]
    assert by_row[0] == by_row[1] and len(by_row[0]) == 18


def test_bare_adapter_with_model_and_data_reproduces_too(lora_run: tuple[Path, dict], tmp_path: Path) -> None:
    run_dir, trained = lora_run
    overrides = [f"adapter={run_dir / 'adapter'}", "model=tiny_llama", "data=mix3", *TINY_MODEL_DATA]
    results = _evaluate([*overrides, "seed=3", "evaluation.batch_size=9"], tmp_path)
    assert results["metrics"] == {"test": trained["metrics"]["test"]}
    assert results["adapter"]["run_dir"] is None and results["adapter"]["trained_tasks"] is None


def test_lora_scores_another_data_preset(lora_run: tuple[Path, dict], tmp_path: Path) -> None:
    run_dir, trained = lora_run
    sizes = [f"data.tasks.qa.{split}={n}" for split, n in (("train", 48), ("val", 6), ("test", 6))]
    results = _evaluate([f"adapter={run_dir}", "data=qa", *sizes], tmp_path)
    assert results["tasks"] == ["qa"] and results["task_ids"] == {"qa": 1}
    metrics = results["metrics"]["test"]
    assert set(metrics) >= {"test/qa/score", "test/avg/score"} and "test/code/score" not in metrics
    # same seed, same generator: the same qa records as in the run's mix3 test split
    assert metrics["test/qa/loss"] == pytest.approx(trained["metrics"]["test"]["test/qa/loss"], rel=1e-5)


def test_task_conditioned_method_maps_tasks_by_name(tmp_path: Path) -> None:
    """mtl_lora trained on [code, qa]: on data=qa, qa (id 0 in that data) gets its trained id 1."""
    run_dir = fake_run("mtl_lora", ["code", "qa"], tmp_path)
    model, _ = load_adapted(run_dir / "adapter", read_run_config(run_dir).model)
    tokens = torch.arange(3, 11).unsqueeze(0)
    with torch.no_grad():
        by_id = [model(input_ids=tokens, task_ids=torch.tensor([t])).logits for t in (0, 1)]
        mapped = TaskIdMap(model, [1])(input_ids=tokens, task_ids=torch.tensor([0])).logits
    assert (by_id[0] - by_id[1]).abs().max() > 1e-3  # a wrong task id would show in the scores
    assert torch.equal(mapped, by_id[1])
    own = _evaluate([f"adapter={run_dir}"], tmp_path / "own")["metrics"]["test"]
    sizes = [f"data.tasks.qa.{split}={n}" for split, n in (("train", 48), ("val", 6), ("test", 6))]
    alone = _evaluate([f"adapter={run_dir}", "data=qa", *sizes], tmp_path / "qa")
    assert alone["task_ids"] == {"qa": 1}
    assert alone["metrics"]["test"]["test/qa/loss"] == pytest.approx(own["test/qa/loss"], rel=1e-5)


def test_task_conditioned_method_refuses_an_untrained_task(tmp_path: Path) -> None:
    run_dir = fake_run("mtl_lora", ["code", "qa"], tmp_path)
    sizes = [f"data.tasks.reasoning.{split}={n}" for split, n in (("train", 48), ("val", 6), ("test", 6))]
    out = tmp_path / "eval"
    with pytest.raises(ValueError, match=r"task-conditioned.*\['reasoning'\].*\['code', 'qa'\]"):
        _evaluate([f"adapter={run_dir}", "data=reasoning", *sizes], out)
    failed = json.loads((out / "results.json").read_text())
    assert failed["status"] == "failed" and failed["kind"] == "eval" and "reasoning" in failed["error"]


def test_bare_adapter_without_model_fails_before_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = fake_run("lora", ["code", "qa"], tmp_path)

    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the config error")

    monkeypatch.setattr(mtpeft_eval, "load_adapted", no_loading)
    out = tmp_path / "eval"
    with pytest.raises(ValueError, match=r"bare adapter directory.*model=<preset>.*adapter=.*run-lora"):
        _evaluate([f"adapter={run_dir / 'adapter'}", "data=qa"], out)
    assert not (out / "results.json").exists()
    with pytest.raises(FileNotFoundError, match="neither a run directory.*nor an adapter directory"):
        _evaluate([f"adapter={tmp_path}"], out)
    with pytest.raises(ValueError, match=r"model\.vocab_sise"):
        _evaluate([f"adapter={run_dir}", "+model.vocab_sise=3"], out)


def test_cli_writes_an_eval_run_dir(tmp_path: Path) -> None:
    run_dir = fake_run("mtl_lora", ["code", "qa"], tmp_path)
    env = {**os.environ, "MTPEFT_ROOT": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "mtpeft.eval", f"adapter={run_dir}", "split=val"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = (tmp_path / "logs" / "eval" / "runs").glob("*/results.json")
    results = json.loads(path.read_text())
    assert results["kind"] == "eval" and results["split"] == "val" and results["method"] == "mtl_lora"
    assert set(results["metrics"]) == {"val"} and "val/avg/score" in results["metrics"]["val"]
    assert (path.parent / ".hydra" / "config.yaml").is_file()


def test_an_eval_in_another_precision_than_the_run_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The trainer comes from conf/eval.yaml, not from the run: a precision other than the run's is said."""
    source = mtpeft_eval.adapter_source(fake_run("lora", ["code", "qa", "reasoning"], tmp_path))
    assert source.run_config is not None and source.run_config.trainer.precision == "32-true"
    with caplog.at_level(logging.WARNING, logger="mtpeft.eval"):
        mtpeft_eval.warn_on_other_precision(OmegaConf.create({"trainer": {"precision": "32-true"}}), source)
        assert not caplog.records
        mtpeft_eval.warn_on_other_precision(
            OmegaConf.create({"trainer": {"precision": "bf16-mixed"}}), source
        )
    assert "trainer.precision=bf16-mixed, but the run used 32-true" in caplog.text
