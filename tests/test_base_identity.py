"""The base model is part of a job's identity (`mtpeft.models.identity`): a run finished on other base weights
or in another dtype is not a finished run of this job, and a study refuses to publish next to another base's
runs (the tiny model is pre-trained per machine and differs across CPUs)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import mtpeft.models.loader as loader
from mtpeft.inputs import run_inputs
from mtpeft.models.identity import base_identity, weight_files_digest
from mtpeft.models.loader import load_tiny
from mtpeft.study.publish import check_published_bases
from mtpeft.utils.confighash import job_hash
from mtpeft.utils.sweep import RESULTS_FILE, find_finished
from tests.conftest import TINY_RUN, compose_train


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> dict:
    cfg = compose_train([*TINY_RUN, "method=lora"], tmp_path_factory.mktemp("run"))
    return OmegaConf.to_container(cfg, resolve=True)


def _saved_dir(tmp_path: Path, name: str, tiny_config: dict) -> Path:
    """A model directory (weights, config, tokenizer) holding the tiny base."""
    art = load_tiny(tiny_config["model"])
    directory = tmp_path / name
    art.model.save_pretrained(directory)
    art.tokenizer.save_pretrained(directory)
    return directory


def _hub_model(path: Path | str, dtype: str = "float32") -> dict:
    return {"kind": "hub", "name_or_path": str(path), "dtype": dtype}


def test_tiny_base_is_named_by_its_weight_files(tiny_config: dict) -> None:
    identity = base_identity(tiny_config["model"])
    entry = load_tiny(tiny_config["model"]).entry
    assert identity == {"weight_files": weight_files_digest(entry), "dtype": "float32"}
    assert run_inputs(tiny_config)["base"] == identity


def test_same_weights_same_identity_other_weights_another(tmp_path: Path, tiny_config: dict) -> None:
    first = _saved_dir(tmp_path, "a", tiny_config)
    copy_dir = tmp_path / "b"
    shutil.copytree(first, copy_dir)
    (copy_dir / "README.md").write_text("notes do not change the weights")
    (copy_dir / "tokenizer_config.json").write_text(json.dumps({"edited": True}))
    assert base_identity(_hub_model(first)) == base_identity(_hub_model(copy_dir))
    model = loader.AutoModelForCausalLM.from_pretrained(copy_dir)
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    model.save_pretrained(copy_dir)
    assert base_identity(_hub_model(first)) != base_identity(_hub_model(copy_dir))


def test_machine_resolved_dtype_is_part_of_the_job(
    tmp_path: Path, tiny_config: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``bfloat16_if_native`` loads bf16 on one machine and float32 on another: two different jobs."""
    config = {
        **tiny_config,
        "model": _hub_model(_saved_dir(tmp_path, "m", tiny_config), "bfloat16_if_native"),
    }
    hashes = {}
    for native in (True, False):
        monkeypatch.setattr(loader, "bf16_is_native", lambda native=native: native)
        inputs = run_inputs(config)
        assert inputs["base"]["dtype"] == ("bfloat16" if native else "float32")
        hashes[native] = job_hash(config, inputs)
    assert hashes[True] != hashes[False]


def test_hub_cache_blobs_are_named_by_their_digest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In the HF hub cache a weight file links to a blob named by its SHA-256: the same identity as hashing
    it, without reading it (a 7B model is 14 GB)."""
    import hashlib

    import mtpeft.models.identity as identity

    content = b"weights" * 1000
    blob = tmp_path / "blobs" / hashlib.sha256(content).hexdigest()
    blob.parent.mkdir()
    blob.write_bytes(content)
    snapshot = tmp_path / "snapshots" / "rev"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(blob)
    copied = tmp_path / "copied"
    copied.mkdir()
    (copied / "model.safetensors").write_bytes(content)
    hashed = weight_files_digest(copied)
    monkeypatch.setattr(identity, "file_digest", lambda path: pytest.fail(f"read {path}"))
    assert weight_files_digest(snapshot) == hashed


def test_hub_id_outside_the_cache_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    identity = base_identity(
        {"kind": "hub", "name_or_path": "org/not-cached", "revision": "abc", "dtype": "auto"}
    )
    assert identity == {"weight_files": "hub:org/not-cached@abc", "dtype": "auto"}


def _record(directory: Path, config: dict, inputs: dict) -> Path:
    directory.mkdir(parents=True)
    record = {"status": "success", "config": config, "inputs": inputs, "metrics": {}}
    (directory / RESULTS_FILE).write_text(json.dumps(record))
    return directory


def test_a_run_on_another_base_is_not_a_finished_job(tmp_path: Path, tiny_config: dict) -> None:
    inputs = run_inputs(tiny_config)
    job = job_hash(tiny_config, inputs)
    same = _record(tmp_path / "same" / "run", tiny_config, inputs)
    assert find_finished(tmp_path / "same", job) == same
    other = copy.deepcopy(inputs)
    other["base"]["weight_files"] = "0" * 16  # the same config pre-trained on another CPU
    _record(tmp_path / "other" / "run", tiny_config, other)
    assert find_finished(tmp_path / "other", job) is None
    unrecorded = {k: v for k, v in inputs.items() if k != "base"}  # published before the base was recorded
    _record(tmp_path / "old" / "run", tiny_config, unrecorded)
    assert find_finished(tmp_path / "old", job) is None


def test_study_refuses_to_publish_next_to_another_base(tmp_path: Path, tiny_config: dict) -> None:
    inputs = run_inputs(tiny_config)
    published = tmp_path / "experiments" / "s" / "runs"
    _record(published / "lora_s0", tiny_config, inputs)
    check_published_bases("s", "s", published)  # same base: fine
    check_published_bases("s", "s", tmp_path / "nothing")  # nothing published: fine
    other = copy.deepcopy(inputs)
    other["base"]["weight_files"] = "0" * 16
    _record(published / "lora_s1", tiny_config, other)
    _record(published / "lora_s2", tiny_config, {k: v for k, v in inputs.items() if k != "base"})
    with pytest.raises(SystemExit) as err:
        check_published_bases("s", "s", published)
    message = str(err.value)
    suffix = inputs["base"]["weight_files"][:8]
    assert str(published) in message and "1 run(s) on unrecorded" in message and "0" * 16 in message
    assert f"python -m mtpeft.study s task_name=s_{suffix}" in message
