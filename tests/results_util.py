"""Hand-made run directories for the tests of `mtpeft.results` (stats, ranking)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mtpeft.metrics.tracker import write_example_scores
from mtpeft.utils.confighash import config_hash


def scored_run(
    root: Path,
    method: str,
    seed: int,
    hits: dict[str, list[int]],
    trainable: int = 10,
    config_extra: dict | None = None,
    name: str | None = None,
) -> Path:
    """A successful run ``<root>/<name or method_seed>`` whose test items score ``hits[task]`` (results.json
    and scores.jsonl.gz, as `mtpeft.run` writes them); ``config_extra``: more config keys."""
    config = {
        "seed": seed,
        "method": {"name": method},
        "model": {"kind": "tiny", "arch": "llama"},
        "data": {"tasks": {t: {} for t in hits}, "seed": seed},
        **(config_extra or {}),
    }
    scores = {f"test/{t}/score": float(np.mean(v)) for t, v in hits.items()}
    scores["test/avg/score"] = float(np.mean(list(scores.values())))
    run = root / (name or f"{method}_{seed}")
    run.mkdir(parents=True)
    data = {
        "status": "success",
        "method": method,
        "seed": seed,
        "tasks": list(hits),
        "config": config,
        "config_hash": config_hash(config),
        "metrics": {"val": {}, "test": scores},
        "trainable_params": trainable,
        "total_params": 100,
        "trainable_percent": trainable,
    }
    (run / "results.json").write_text(json.dumps(data))
    rows, index = [], 0
    for task, values in hits.items():
        for value in values:
            item = f"{seed}-{task}-{index}"
            rows.append({"split": "test", "task": task, "index": index, "item": item, "score": float(value)})
            index += 1
    write_example_scores(run / "scores.jsonl.gz", rows)
    return run
