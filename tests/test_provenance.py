"""Where a result came from: the device description names the CPU a run was made on."""

from __future__ import annotations

import platform
from pathlib import Path

from mtpeft.utils.provenance import cpu_model, device_description


def test_cpu_model_reads_the_model_name_of_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9R14 96-Core Processor\n"
        "processor\t: 1\nmodel name\t: AMD EPYC 9R14 96-Core Processor\n"
    )
    assert cpu_model(cpuinfo) == "AMD EPYC 9R14 96-Core Processor"


def test_cpu_model_falls_back_without_cpuinfo(tmp_path: Path) -> None:
    assert cpu_model(tmp_path / "missing") == (platform.processor() or None)
    arm = tmp_path / "cpuinfo"
    arm.write_text("processor\t: 0\nBogoMIPS\t: 50.00\nmodel name\t:\n")
    assert cpu_model(arm) == (platform.processor() or None)


def test_device_description_names_cpu_cores_and_bf16() -> None:
    device = device_description()
    keys = {"python", "machine", "cpu", "cpu_capability", "cpu_cores", "bf16_native", "cpu_threads"}
    assert keys <= set(device)
    assert isinstance(device["cpu_cores"], int) and device["cpu_cores"] >= 1
    assert isinstance(device["bf16_native"], bool)
    assert isinstance(device["cpu_capability"], str) and device["cpu_capability"]
