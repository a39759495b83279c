"""The adapter a run saves is the one its record scores: the best validation checkpoint's, also in a run
without a test stage (``test=false``, e.g. a study's tuning runs), where nothing else loads it."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from mtpeft.adapters.base import ADAPTER_WEIGHTS
from mtpeft.run import run
from mtpeft.utils.resume import load_checkpoint
from tests.conftest import TINY_RUN, compose_train

#: "best" = the highest qa validation loss, so the first validation (step 2) wins over the last (step 4).
WORST_IS_BEST = ["callbacks.model_checkpoint.monitor=val/qa/loss", "callbacks.model_checkpoint.mode=max"]


def _weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key.removeprefix("model."): value for key, value in state.items()}


def test_a_run_without_test_saves_the_best_checkpoints_adapter(tmp_path: Path) -> None:
    out = tmp_path / "run"
    overrides = [*TINY_RUN, "logger=none", "method=mtl_lora", "test=false", "checkpoint_every_n_steps=1"]
    result = run(compose_train([*overrides, *WORST_IS_BEST], out), out)
    best = _weights(load_checkpoint(Path(result["best_checkpoint"]))["state_dict"])
    last = _weights(load_checkpoint(out / "checkpoints" / "last.ckpt")["state_dict"])
    assert any(not torch.equal(best[k], last[k]) for k in best), (
        "the test needs a best step that is not the last"
    )
    saved = load_file(str(out / "adapter" / ADAPTER_WEIGHTS))
    assert saved.keys() == best.keys()
    assert all(torch.equal(saved[k], best[k].to(saved[k].dtype)) for k in best)
