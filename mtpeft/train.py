"""Entry point: ``python -m mtpeft.train [method=...] [model=...] [data=...] [-m for sweeps]``.

Composes ``conf/train.yaml`` with the chosen groups and hands the resolved config to `mtpeft.run.run`.
Returns ``val/avg/score`` of the best checkpoint (the metric Hydra's Optuna sweeper optimises).
A failed run writes ``results.json`` with ``status: failed`` and the error, then exits non-zero.
"""

from __future__ import annotations

import json
import logging
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from mtpeft.utils.resolvers import register_resolvers

register_resolvers()
log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    from mtpeft.run import RESULTS_FILE, run  # heavy imports after Hydra parsed the command line

    output_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        results = run(cfg, output_dir)
    except Exception as err:
        failure = {
            "status": "failed",
            "error": f"{type(err).__name__}: {err}",
            "traceback": traceback.format_exc(),
            "config": OmegaConf.to_container(cfg, resolve=False),
        }
        (output_dir / RESULTS_FILE).write_text(json.dumps(failure, indent=2, default=str))
        log.error("run failed: %s (details in %s)", failure["error"], output_dir / RESULTS_FILE)
        raise
    return results["metrics"]["val"].get("val/avg/score", 0.0)


if __name__ == "__main__":
    main()
