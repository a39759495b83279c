"""`mtpeft.record.RunRecord`: every published results.json reads and writes back unchanged; older records
get their defaults in one place; unknown fields are rejected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from mtpeft.record import EVAL, TRAIN, PeakMemory, RunRecord, checked, parse_record
from mtpeft.results import load_runs

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
PUBLISHED = sorted(EXPERIMENTS.rglob("results.json"))


def test_published_records_are_found() -> None:
    assert len(PUBLISHED) >= 27  # experiments/methods_mix3 alone has 27 runs


@pytest.mark.parametrize("path", PUBLISHED, ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_every_published_record_parses_and_writes_back_unchanged(path: Path) -> None:
    data = json.loads(path.read_text())
    record, problem = parse_record(data)
    assert problem is None
    assert record.to_json() == data  # no field lost, added or changed in value
    assert list(record.to_json()) == [k for k in RunRecord.model_fields if k in data]  # declared order


def test_published_studies_load_without_problems() -> None:
    problems: list = []
    records = load_runs([EXPERIMENTS / "methods_mix3"], problems=problems)
    assert problems == [] and len(records) == 27
    assert {r["method"] for r in records} >= {"lora", "none", "peml"}
    assert all(r["peak_memory_mb"] > 0 and r["scores"]["avg"] is not None for r in records)


def test_older_record_labels_come_from_the_config() -> None:
    config = {"seed": 4, "method": {"name": "lora"}, "data": {"tasks": {"qa": {}, "code": {}}}}
    record = RunRecord.model_validate({"status": "running", "config": config})
    assert (record.method, record.seed, record.tasks, record.kind) == ("lora", 4, ["qa", "code"], TRAIN)
    assert record.job_hash is None and record.peak_mb is None and record.scores("test") == {}
    given = RunRecord.model_validate({"status": "running", "config": config, "method": "x", "seed": 0})
    assert (given.method, given.seed) == ("x", 0)  # a recorded label wins, even a falsy seed


@pytest.mark.parametrize(
    ("value", "mb"),
    [
        ({"cpu_peak_rss_mb": 500.0, "cpu_peak_rss_scope": "run"}, 500.0),
        ({"cpu_peak_rss_mb": 500.0, "cuda_peak_allocated_mb": 80.5}, 80.5),
        (321.0, 321.0),
        (None, None),
    ],
)
def test_peak_memory_prefers_the_cuda_peak(value: object, mb: float | None) -> None:
    record = RunRecord(status="running", config={}, peak_memory_mb=value)
    assert record.peak_mb == mb
    assert isinstance(record.peak_memory_mb, PeakMemory) == isinstance(value, dict)


def test_writers_cannot_add_undeclared_fields() -> None:
    record = {"status": "failed", "config": {}, "error": "ValueError: x", "kind": EVAL}
    assert checked(record) == record  # written as given
    with pytest.raises(ValidationError, match="eror"):
        checked({**record, "eror": "typo"})
    assert "status: Input should be" in parse_record({"status": "ok", "config": {}})[1]
    assert "no 'metrics'" in parse_record({"status": "success", "config": {}})[1]


def test_a_failure_record_is_never_lost(caplog: pytest.LogCaptureFixture) -> None:
    from mtpeft.record import checked_failure

    record = {"status": "failed", "config": {}, "error": "RuntimeError: boom"}
    assert checked_failure(record) == record
    odd = {**record, "tasks": [1, 2]}  # tasks must be names: not a RunRecord, still written
    assert checked_failure(odd) is odd and "does not validate" in caplog.text
