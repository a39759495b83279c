"""Module level: a tiny run whose tasks carry several metrics logs every one of them for val and test
(logs and results.json), with sampled evaluation feeding pass@k and the first sample feeding the rest."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from mtpeft.data.datamodule import MultiTaskDataModule
from mtpeft.run import run
from tests.conftest import TINY_RUN, compose_train

METRICS = {
    "qa": ("exact_match", "f1", "rouge1", "rouge2", "rougeL", "bleu"),
    "code": ("pass@2", "pass@1", "exact_match"),
    "reasoning": ("numeric_match", "f1"),
}


def test_every_metric_of_every_task_is_logged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(MultiTaskDataModule, "metrics_for", lambda self, task: METRICS[task])
    overrides = ["method=lora", "evaluation.num_samples=2", "evaluation.temperature=1.0"]
    results = run(compose_train([*TINY_RUN, *overrides], tmp_path), tmp_path)
    assert results["status"] == "success"
    (log,) = tmp_path.rglob("metrics.csv")
    with log.open() as f:
        logged = set(next(csv.reader(f)))
    for split in ("val", "test"):
        metrics = results["metrics"][split]
        for task, names in METRICS.items():
            keys = {f"{split}/{task}/{name}" for name in (*names, "score", "loss")}
            assert keys <= metrics.keys() and keys <= logged, keys - metrics.keys()
            assert all(0.0 <= metrics[f"{split}/{task}/{name}"] <= 1.0 for name in (*names, "score"))
            assert metrics[f"{split}/{task}/score"] == metrics[f"{split}/{task}/{names[0]}"]
        scores = [metrics[f"{split}/{task}/score"] for task in METRICS]
        assert metrics[f"{split}/avg/score"] == pytest.approx(sum(scores) / 3)
        # 6 code problems x 2 samples: pass@1 is a multiple of 1/12, pass@2 of 1/6, pass@2 >= pass@1
        assert metrics[f"{split}/code/pass@1"] * 12 == pytest.approx(
            round(metrics[f"{split}/code/pass@1"] * 12)
        )
        assert metrics[f"{split}/code/pass@2"] >= metrics[f"{split}/code/pass@1"]
    assert "val/avg/score_best" in logged


def test_pass_at_k_beyond_num_samples_fails_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(MultiTaskDataModule, "metrics_for", lambda self, task: METRICS[task])
    cfg = compose_train([*TINY_RUN, "method=lora"], tmp_path)
    with pytest.raises(
        ValueError, match=r"task 'code': metric 'pass@2' needs 2 .* set evaluation.num_samples>=2"
    ):
        run(cfg, tmp_path)
    assert not list(tmp_path.rglob("*.ckpt"))  # failed in setup, before the first training step
