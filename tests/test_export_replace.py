"""A re-export replaces what it writes whole: no file of an earlier export is left beside the new ones
(a LoRA ``adapter_config.json`` beside C-Poly's weights loaded, with a warning, as the plain base), and a
failed export leaves the earlier one as it was."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtpeft.adapters.base import ADAPTER_CONFIG
from mtpeft.export import EXPORT_INFO, main
from mtpeft.utils.staging import staged_dir
from tests.test_export import make_run


def test_reexport_into_the_same_directory_replaces_the_adapter(tmp_path: Path) -> None:
    out = tmp_path / "out"
    lora, _ = make_run("lora", tmp_path)
    cpoly, _ = make_run("cpoly", tmp_path)
    assert main([str(lora), "--out", str(out)]) == 0
    assert (out / "adapter" / ADAPTER_CONFIG).is_file()
    assert main([str(cpoly), "--out", str(out)]) == 0
    assert sorted(p.name for p in (out / "adapter").iterdir()) == sorted(
        p.name for p in (cpoly / "adapter").iterdir()
    )
    assert json.loads((out / EXPORT_INFO).read_text())["method"] == "cpoly"
    assert main([str(cpoly), "--merge", "--task", "qa", "--out", str(out)]) == 0
    (out / "merged-qa" / "stale.txt").write_text("from an earlier export")
    assert main([str(cpoly), "--merge", "--task", "qa", "--out", str(out)]) == 0
    assert not (out / "merged-qa" / "stale.txt").exists()
    assert not list(out.glob(".*staging*"))


def test_a_failed_write_keeps_the_old_directory(tmp_path: Path) -> None:
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), staged_dir(target) as staging:
        (staging / "new.txt").write_text("half")
        raise RuntimeError("killed mid-export")
    assert [p.name for p in target.iterdir()] == ["old.txt"] and not list(tmp_path.glob(".*staging*"))
