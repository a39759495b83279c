"""Idempotent sweep jobs: find a finished run with the same config, record failed ones.

A job is identified by `mtpeft.utils.confighash.config_hash` of its resolved config (paths, loggers, names
and tags left out). Before training, `mtpeft.train` looks for a ``results.json`` with ``status: success``
and the same hash under ``<paths.log_dir>/<task_name>/`` and, if there is one, skips the job. Hashes are
recomputed from the stored config rather than read from ``config_hash``, so results written before a change
of what the hash ignores still match.
"""

from __future__ import annotations

import json
import logging
import math
import traceback
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mtpeft.utils.confighash import config_hash

log = logging.getLogger(__name__)
RESULTS_FILE = "results.json"


def read_results(path: Path) -> dict[str, Any] | None:
    """A results.json as a dict, or None if it is unreadable (a job killed while writing it)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        log.warning("ignoring unreadable %s: %s", path, err)
        return None
    return data if isinstance(data, dict) else None


def stored_hash(results: dict[str, Any]) -> str | None:
    """The hash of a stored run: recomputed from its resolved config when present."""
    config = results.get("config")
    if isinstance(config, dict) and results.get("config_resolved", True):
        return config_hash(config)
    return results.get("config_hash")


def find_finished(root: Path, digest: str, exclude: Path | None = None) -> Path | None:
    """The directory of a successful run under ``root`` whose config hashes to ``digest``, if any."""
    if not root.is_dir():
        return None
    exclude = exclude.resolve() if exclude is not None else None
    for path in sorted(root.rglob(RESULTS_FILE)):
        if exclude is not None and path.parent.resolve() == exclude:
            continue
        results = read_results(path)
        if results and results.get("status") == "success" and stored_hash(results) == digest:
            return path.parent
    return None


def resolved_config(cfg: DictConfig) -> tuple[dict[str, Any], bool]:
    """The config as a plain dict, resolved if it can be (a failure may come from resolving it)."""
    try:
        return OmegaConf.to_container(cfg, resolve=True), True
    except Exception:  # noqa: BLE001 - fall back to the raw config
        return OmegaConf.to_container(cfg, resolve=False), False


def failure_record(cfg: DictConfig, err: BaseException, digest: str | None, wall_time_s: float) -> dict:
    """What a failed run writes to results.json: enough to list it next to the successful ones."""
    config, resolved = resolved_config(cfg)
    method = config.get("method") if isinstance(config.get("method"), dict) else {}
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    return {
        "status": "failed",
        "error": f"{type(err).__name__}: {err}",
        "traceback": "".join(traceback.format_exception(err)),
        "method": method.get("name"),
        "seed": config.get("seed"),
        "tasks": list(data.get("tasks") or {}),
        "config": config,
        "config_resolved": resolved,
        "config_hash": digest,
        "wall_time_s": round(wall_time_s, 2),
    }


def objective(results: dict[str, Any]) -> float:
    """``val/avg/score`` of a run (what Optuna maximises); NaN when missing (a failed trial)."""
    value = (results.get("metrics") or {}).get("val", {}).get("val/avg/score")
    return float(value) if value is not None and math.isfinite(value) else float("nan")
