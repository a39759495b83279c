"""The stages of a study (`mtpeft.study`) and how a run's directory tells which one it belongs to.

Each stage's sweep writes into ``<log_dir>/<task_name>/multiruns/<time>_<uid>_<stage><suffix>``
(`sweep_dir_name`: ``tune0``, ``tune-widen1-0``, ``tune-optuna-lora-3-0``, ``final``, ``final-lora``,
``final-lora-s0`` and ``final-s1`` when split by seed, ``check-lora``), and a published run's name
starts with its stage (``tune_lora_lr=0.01_s0_3f2a9c1e``), so `run_stage` can read the stage of any run
from where it lies: the publisher names runs by it and ``--status`` (`mtpeft.study.status`) counts them.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from pathlib import Path

STAGES = ("tune", "final", "check")
"""The runner's stages, in order."""
STAGE_DIR = re.compile(r"^\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}_[0-9a-f]+_(?P<stage>[a-z]+)")
"""A sweep directory of the runner: ``<time>_<uid>_<stage>...`` (tune0, final-lora -> tune, final)."""


def sweep_dir_name(stage: str) -> str:
    """A fresh, time-ordered name for one sweep of ``stage`` (plus a suffix: ``tune0``, ``final-lora``)."""
    return f"{datetime.now():%Y-%m-%d_%H-%M-%S}_{uuid.uuid4().hex[:6]}_{stage}"


def run_stage(run_dir: Path, root: Path) -> str | None:
    """The stage (`STAGES`) of a run under ``root``: from the runner's sweep directory between them in
    ``logs/``, or from the first part of a published run's name; None for runs the runner did not launch."""
    relative = run_dir.relative_to(root)
    stage = next((m["stage"] for part in relative.parts if (m := STAGE_DIR.match(part))), None)
    stage = stage or run_dir.name.split("_", 1)[0]
    return stage if stage in STAGES else None
