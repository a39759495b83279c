"""cpu_threads: the documented ``auto`` rule on mocked inputs, explicit values, errors, and where it applies."""

from __future__ import annotations

import pytest
import torch

from mtpeft.utils import threads
from mtpeft.utils.threads import (
    apply_cpu_threads,
    auto_threads,
    build_threads,
    physical_cores,
    resolve_cpu_threads,
    using_threads,
)


@pytest.fixture(autouse=True)
def _restore_threads(monkeypatch: pytest.MonkeyPatch):
    """Tests change torch's global thread count and the module's 'chosen' flag: put both back."""
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_chosen", False)
    yield
    torch.set_num_threads(before)


def _machine(monkeypatch: pytest.MonkeyPatch, cores: int, load: float) -> None:
    monkeypatch.setattr(threads, "physical_cores", lambda cpus=None: cores)
    monkeypatch.setattr(threads, "load_average", lambda: load)


@pytest.mark.parametrize(
    ("model", "cores", "load", "expected"),
    [
        ({"kind": "tiny"}, 16, 0.0, 1),  # tiny default width 128
        ({"kind": "tiny", "hidden_size": 512}, 16, 0.0, 1),
        ({"kind": "tiny", "hidden_size": 576}, 16, 0.0, 16),  # wider than 512: free cores
        ({"kind": "hub", "name_or_path": "x"}, 8, 0.4, 8),  # width unknown: free cores
        ({"kind": "hub", "name_or_path": "x"}, 8, 3.7, 5),  # 3 busy cores
        ({"kind": "hub", "name_or_path": "x"}, 2, 9.0, 1),  # oversubscribed: never below 1
        (None, 4, 0.0, 4),
    ],
)
def test_auto_resolves_to_the_documented_value(monkeypatch, model, cores, load, expected):
    _machine(monkeypatch, cores, load)
    assert resolve_cpu_threads("auto", model) == expected


def test_auto_never_exceeds_physical_cores():
    for cores in (1, 2, 8):
        for load in (-1.0, 0.0, 0.5, 1.0, 100.0):
            n, _ = auto_threads(None, cores, load)
            assert 1 <= n <= cores


def test_explicit_and_null_settings(monkeypatch):
    _machine(monkeypatch, 4, 0.0)
    assert resolve_cpu_threads(3, {"kind": "tiny"}) == 3  # an integer wins over the width rule
    assert resolve_cpu_threads(None, {"kind": "tiny"}) is None
    for bad in (0, -2, "four", 1.5, True):
        with pytest.raises(ValueError, match="cpu_threads=.* is invalid: use auto"):
            resolve_cpu_threads(bad)


def test_apply_sets_torch_threads_and_null_keeps_them(monkeypatch):
    _machine(monkeypatch, 4, 0.0)
    torch.set_num_threads(3)
    assert apply_cpu_threads(None) == 3 and torch.get_num_threads() == 3
    assert apply_cpu_threads("auto", {"kind": "tiny"}) == 1 and torch.get_num_threads() == 1
    assert apply_cpu_threads(2) == 2 and torch.get_num_threads() == 2


def test_building_uses_auto_until_the_process_chooses(monkeypatch):
    _machine(monkeypatch, 4, 0.0)
    assert build_threads({"kind": "tiny"}) == 1
    assert build_threads({"kind": "hub"}) == 4
    apply_cpu_threads(2)
    assert build_threads({"kind": "tiny"}) is None  # keep what the run chose


def test_using_threads_restores_the_count():
    torch.set_num_threads(2)
    with using_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError), using_threads(1):
        raise RuntimeError
    assert torch.get_num_threads() == 2


def test_physical_cores_counts_hyperthreads_once(monkeypatch, tmp_path):
    """Two logical CPUs of one core count once; CPUs without readable topology count each."""
    for cpu, core in ((0, 0), (1, 0), (2, 1)):
        topo = tmp_path / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text("0\n")
        (topo / "core_id").write_text(f"{core}\n")
    real_path = threads.Path
    monkeypatch.setattr(
        threads, "Path", lambda p: real_path(str(p).replace("/sys/devices/system/cpu", str(tmp_path)))
    )
    assert physical_cores([0, 1, 2]) == 2
    assert physical_cores([0, 1, 2, 7]) == 3  # cpu7 has no topology here
    assert physical_cores([]) == 1


def test_train_config_defaults_to_auto():
    from omegaconf import OmegaConf

    from tests.conftest import CONF_DIR

    assert OmegaConf.load(CONF_DIR / "train.yaml").cpu_threads == "auto"
