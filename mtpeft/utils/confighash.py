"""A stable hash of a resolved run config, ignoring where the run writes its files."""

from __future__ import annotations

import hashlib
import json
from typing import Any

#: Bookkeeping that never changes what a run computes: where it writes (paths, the study's directory name
#: ``task_name``), how it reports (logger, callbacks, names, tags), where it is launched (``cluster``) and
#: whether finished runs are skipped.
IGNORED_TOP_LEVEL = (
    "paths",
    "hydra",
    "logger",
    "callbacks",
    "run_name",
    "run_group",
    "tags",
    "task_name",
    "skip_finished",
    "cpu_threads",
    "optimized_metric",
    "cluster",
)
#: Nested paths (``section.key``) that hold directories.
IGNORED_NESTED = (("trainer", "default_root_dir"), ("model", "cache_dir"))


def hashed_part(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a resolved config that decides a run's results (what `config_hash` hashes)."""
    kept = {k: v for k, v in config.items() if k not in IGNORED_TOP_LEVEL}
    for section, key in IGNORED_NESTED:
        if isinstance(kept.get(section), dict):
            kept[section] = {k: v for k, v in kept[section].items() if k != key}
    kept.setdefault("trainer", {})
    return kept


def config_hash(config: dict[str, Any]) -> str:
    """SHA-256 (first 16 hex digits) of the config without paths, loggers and other bookkeeping."""
    blob = json.dumps(hashed_part(config), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
