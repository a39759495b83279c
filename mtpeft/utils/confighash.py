"""A stable hash of a resolved run config, ignoring where the run writes its files."""

from __future__ import annotations

import hashlib
import json
from typing import Any

IGNORED_TOP_LEVEL = ("paths", "hydra", "logger", "callbacks", "run_name", "tags")


def config_hash(config: dict[str, Any]) -> str:
    """SHA-256 (first 16 hex digits) of the config without paths, loggers and other bookkeeping."""
    kept = {k: v for k, v in config.items() if k not in IGNORED_TOP_LEVEL}
    trainer = dict(kept.get("trainer", {}))
    trainer.pop("default_root_dir", None)
    kept["trainer"] = trainer
    blob = json.dumps(kept, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
