"""Where a result came from: git state, package versions, device (no host names)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

PACKAGES = ("torch", "transformers", "peft", "lightning", "hydra-core", "tokenizers", "mtpeft")


def git_state(cwd: str | Path) -> dict[str, object]:
    """``{"sha": ..., "dirty": bool}`` of the repository at ``cwd`` (nulls outside a repository)."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
        return {"sha": sha, "dirty": bool(status.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"sha": None, "dirty": None}


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution in ``names`` (None when it is not installed)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str | None:
    """The CPU's marketing name (``model name`` in Linux's ``/proc/cpuinfo``; `platform.processor` elsewhere),
    so that a study can say which machine made a run: step times differ 2x between the 2-core VMs a session
    gets."""
    try:
        for line in Path(cpuinfo).read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or None


def device_description() -> dict[str, object]:
    """Python, architecture, CPU (name, torch's vector instruction level, logical cores this process may use),
    whether bf16 is native (`mtpeft.models.loader.bf16_is_native`: AVX512-BF16 or AMX, which a virtual CPU's
    name often hides) and torch's thread count; the GPU's name when there is one."""
    import torch

    from mtpeft.models.loader import bf16_is_native

    info: dict[str, object] = {"python": platform.python_version(), "machine": platform.machine()}
    info["cpu"] = cpu_model()
    info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    info["cpu_cores"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info["bf16_native"] = bf16_is_native()
    info["cpu_threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def provenance(cwd: str | Path) -> dict[str, object]:
    return {"git": git_state(cwd), "packages": package_versions(), "device": device_description()}
