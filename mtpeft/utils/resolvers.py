"""OmegaConf resolvers used by conf/ (registered once, on import of the entry points)."""

from __future__ import annotations

import secrets
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf


def sweep_group(task_name: str) -> str:
    """The group of a run: ``<task_name>-<sweep directory name>`` inside a multirun job, else ``task_name``.

    All jobs of one sweep share it (they share the sweep directory), and two sweeps of the same study get
    different groups, so a wandb project never mixes a study's re-runs into one group.
    """
    if not HydraConfig.initialized():
        return task_name
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN or not hydra_cfg.runtime.output_dir:
        return task_name
    return f"{task_name}-{Path(hydra_cfg.runtime.output_dir).parent.name}"


def register_resolvers() -> None:
    """Register ``mtpeft_uid`` (short random suffix), ``mtpeft_run_name`` (fallback for empty names) and
    ``mtpeft_sweep_group`` (see ``sweep_group``)."""
    if not OmegaConf.has_resolver("mtpeft_uid"):
        OmegaConf.register_new_resolver("mtpeft_uid", lambda: secrets.token_hex(3), use_cache=True)
    if not OmegaConf.has_resolver("mtpeft_run_name"):
        OmegaConf.register_new_resolver("mtpeft_run_name", lambda overrides="": overrides or "defaults")
    if not OmegaConf.has_resolver("mtpeft_sweep_group"):
        OmegaConf.register_new_resolver("mtpeft_sweep_group", sweep_group)
