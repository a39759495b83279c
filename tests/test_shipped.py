"""The default tiny base ships with mtpeft (`mtpeft.models.shipped`): a fresh cache gets its weights by copy,
not by pre-training, so every machine trains on the same base (pre-training differs across CPUs)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

import mtpeft.models.loader as loader
from mtpeft.models.cache import read_manifest
from mtpeft.models.config import parse_model
from mtpeft.models.identity import weight_files_digest
from mtpeft.models.shipped import SHIPPED_DIR, copy_shipped, shipped_entry
from tests.conftest import compose_train


@pytest.fixture(scope="module")
def default_spec(tmp_path_factory: pytest.TempPathFactory):
    """The model spec of ``python -m mtpeft.train`` without overrides."""
    return parse_model(compose_train([], tmp_path_factory.mktemp("run")).model)


def test_the_default_tiny_config_has_an_intact_shipped_base(default_spec) -> None:
    name = loader.tiny_entry_name(default_spec)
    shipped = shipped_entry(name)
    assert shipped is not None, (
        f"no shipped base {name} in {SHIPPED_DIR}: the default tiny config or the build code changed; "
        "re-ship it (mtpeft/models/shipped.py says how)"
    )
    assert read_manifest(shipped) is not None
    assert [p.name for p in SHIPPED_DIR.iterdir()] == [name]  # stale entries are removed when re-shipping


def test_a_fresh_cache_copies_the_shipped_base(
    default_spec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("pre-trained although a base is shipped")

    monkeypatch.setattr(loader, "pretrain", refuse)
    spec = dataclasses.replace(default_spec, cache_dir=str(tmp_path / "cache"))
    art = loader.load_tiny(spec)
    shipped = shipped_entry(art.entry.name)
    assert shipped is not None and art.entry.parent == tmp_path / "cache"
    assert weight_files_digest(art.entry) == weight_files_digest(shipped)
    assert art.meta["shipped_build_id"] == read_manifest(shipped)["meta"]["build_id"]
    assert art.meta["pretrain"]["tokens"] > 0  # the shipped build's pre-training record comes along


def test_a_corrupt_shipped_base_is_an_error(tmp_path: Path) -> None:
    source = tmp_path / "shipped"
    shutil.copytree(next(SHIPPED_DIR.iterdir()), source)
    weights = source / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    (tmp_path / "build").mkdir()
    with pytest.raises(RuntimeError, match="incomplete or corrupt.*reinstall mtpeft"):
        copy_shipped(source, tmp_path / "build")
