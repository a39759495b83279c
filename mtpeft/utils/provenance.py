"""Where a result came from: git state, package versions, device (no host names)."""

from __future__ import annotations

import importlib.metadata
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


def device_description() -> dict[str, object]:
    import torch

    info: dict[str, object] = {"python": platform.python_version(), "machine": platform.machine()}
    info["cpu_threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def provenance(cwd: str | Path) -> dict[str, object]:
    return {"git": git_state(cwd), "packages": package_versions(), "device": device_description()}
