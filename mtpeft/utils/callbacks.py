"""Lightning callbacks of mtpeft (registered in ``conf/callbacks/default.yaml``)."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite (the run is recorded as failed)."""


class FailOnNonFiniteLoss(L.Callback):
    """Raise `TrainingDiverged` as soon as a training step returns a non-finite loss.

    Lightning would otherwise keep stepping on NaNs (gradient clipping does not help) and the run would
    end "successfully" with meaningless metrics. The check reads the loss the step returned, so it works for
    every method and needs no logger.
    """

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        if not math.isfinite(value):
            raise TrainingDiverged(
                f"training diverged: non-finite train/loss ({value}) at step {trainer.global_step}"
            )
