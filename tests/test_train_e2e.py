"""End to end: the real entry point on shrunken real configs (one in-process run per method, one CLI
run, one multirun), results.json contents, determinism, and clear failures for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mtpeft.methods import available_methods
from mtpeft.models.identity import base_identity
from mtpeft.run import run
from tests.conftest import TINY_RUN, compose_train

REPO = Path(__file__).resolve().parent.parent
RESULT_KEYS = {
    "status",
    "method",
    "config",
    "config_hash",
    "metrics",
    "trainable_params",
    "total_params",
    "wall_time_s",
    "train_tokens_per_s",
    "peak_memory_mb",
    "seed",
    "eval_batch_size",
    "template",
    "provenance",
    "job_hash",
    "inputs",
    "resumed_from",
}


def _run(overrides: list[str], out: Path) -> dict:
    cfg = compose_train([*TINY_RUN, *overrides], out)
    return run(cfg, out)


@pytest.mark.parametrize("method", available_methods())
def test_each_method_trains_and_writes_results(method: str, tmp_path: Path) -> None:
    results = _run([f"method={method}"], tmp_path)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["status"] == "success" and on_disk.keys() >= RESULT_KEYS
    assert on_disk["method"] == method and on_disk["resumed_from"] is None
    assert set(on_disk["inputs"]) == {"data", "code", "base"} and "host" not in on_disk  # host: running only
    assert on_disk["inputs"]["base"] == base_identity(on_disk["config"]["model"])
    for split in ("val", "test"):
        metrics = on_disk["metrics"][split]
        assert 0.0 <= metrics[f"{split}/avg/score"] <= 1.0
        assert {f"{split}/{t}/score" for t in ("qa", "code", "reasoning")} <= metrics.keys()
    assert results["trainable_params"] == on_disk["trainable_params"]
    if method != "none":
        assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
        assert on_disk["trainable_params"] > 0


def test_same_seed_same_metrics(tmp_path: Path) -> None:
    first = _run(["method=lora", "seed=3"], tmp_path / "a")["metrics"]
    second = _run(["method=lora", "seed=3"], tmp_path / "b")["metrics"]
    assert first == second


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MTPEFT_ROOT": str(cwd)}
    return subprocess.run(
        [sys.executable, "-m", "mtpeft.train", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_sweep_job_hashes_its_inputs_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sweep job computes its inputs to look for a finished run of itself; the run it then starts records
    those inputs instead of hashing the data and the base (538 MB for SmolLM2) again."""
    import mtpeft.inputs
    import mtpeft.run
    from mtpeft.train import _job

    calls = []

    def counted(config: dict) -> dict:
        calls.append(config)
        return mtpeft.inputs.data_and_code(config) | {"base": base_identity(config["model"])}

    monkeypatch.setattr(mtpeft.inputs, "run_inputs", counted)
    monkeypatch.setattr(mtpeft.run, "run_inputs", counted)
    out = tmp_path / "job"
    cfg = compose_train([*TINY_RUN, "method=lora", "skip_finished=true", "test=false"], out)
    _job(cfg, out, multirun=False)
    record = json.loads((out / "results.json").read_text())
    assert record["status"] == "success" and len(calls) == 1
    assert record["inputs"] == counted(calls[0])


def test_cli_multirun_over_two_methods(tmp_path: Path) -> None:
    proc = _cli(["-m", "method=lora,none", *TINY_RUN, "logger=none"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = sorted((tmp_path / "logs").rglob("results.json"))
    assert len(results) == 2
    assert {json.loads(p.read_text())["method"] for p in results} == {"lora", "none"}


def test_cli_bad_input_fails_with_clear_message(tmp_path: Path) -> None:
    proc = _cli(["method=lora", "+method.rnak=4", *TINY_RUN, "logger=none"], tmp_path)
    assert proc.returncode != 0
    assert "rnak" in proc.stderr and "valid keys" in proc.stderr
    failed = next((tmp_path / "logs").rglob("results.json"))
    assert json.loads(failed.read_text())["status"] == "failed"


def test_wandb_logger_runs_offline(tmp_path: Path) -> None:
    results = _run(["method=lora", "logger=wandb"], tmp_path)
    assert results["status"] == "success"
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "wandb should write one offline run (sync later with `wandb sync`)"


@pytest.mark.parametrize("debug", ["fdr", "limit"])
def test_debug_presets_run(debug: str, tmp_path: Path) -> None:
    results = _run(["method=lora", f"debug={debug}"], tmp_path)
    assert results["status"] == "success"
    assert "test/avg/score" in results["metrics"]["test"]


def test_per_task_table_goes_to_table_loggers() -> None:
    from mtpeft.run import log_task_table

    class TableLogger:
        def __init__(self) -> None:
            self.tables: list[tuple] = []

        def log_table(self, key, columns, data) -> None:
            self.tables.append((key, columns, data))

    logger = TableLogger()
    metrics = {"test/qa/exact_match": 0.5, "test/qa/score": 0.5, "test/qa/loss": 1.0, "test/avg/score": 0.5}
    log_task_table([logger, object()], "test", metrics)
    assert logger.tables == [("test/results", ["task", "metric", "score"], [["qa", "exact_match", 0.5]])]


def test_sampled_evaluation_scores_pass_at_k_over_every_sample(tmp_path: Path) -> None:
    """``evaluation.num_samples=3``: three sampled completions per prompt; pass@1 is the unbiased estimate."""
    results = _run(["method=lora", "evaluation.num_samples=3", "evaluation.temperature=1.0"], tmp_path)
    assert results["status"] == "success"
    value = results["metrics"]["test"]["test/code/pass@1"]
    assert 0.0 <= value <= 1.0 and value * 18 == pytest.approx(round(value * 18))  # 6 problems x 3 samples


def test_upstream_noise_is_silenced_and_nothing_else(caplog: pytest.LogCaptureFixture) -> None:
    """Lightning's litlogger tip and torch's LeafSpec FutureWarning (printed by every job) are filtered;
    other records and warnings of the same sources pass."""
    import logging
    import warnings

    from mtpeft.utils.upstream_noise import LIGHTNING_RANK_ZERO, quiet_upstream_noise

    quiet_upstream_noise()
    quiet_upstream_noise()
    logger = logging.getLogger(LIGHTNING_RANK_ZERO)
    assert sum(type(f).__name__ == "_DropLitLoggerTip" for f in logger.filters) == 1
    with caplog.at_level(logging.INFO, logger=LIGHTNING_RANK_ZERO):
        logger.info("💡 Tip: For seamless cloud logging and experiment tracking, try installing litlogger")
        logger.info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_upstream_noise()  # after simplefilter: its filter comes first again
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
        warnings.warn("something else is deprecated", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]
