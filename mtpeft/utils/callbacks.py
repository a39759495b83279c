"""Lightning callbacks of mtpeft: `FailOnNonFiniteLoss` (registered in ``conf/callbacks/default.yaml``) and
`ResumeState` (added by `mtpeft.run.run` to every training run: what an exact resume needs)."""

from __future__ import annotations

import math
import os
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.trainer.states import TrainerFn


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


#: Instance attributes of `mtpeft.module.MultiTaskModule` that a resumed run must get back: best validation
#: metrics (reported as the run's val metrics), per-example rows of that epoch, token and time counters.
MODULE_STATE = ("best_val", "last_metrics", "example_rows", "_train_tokens", "train_seconds")


def rng_states() -> dict[str, Any]:
    """The states of every random generator a training step may draw from (Python, NumPy, torch, CUDA)."""
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore `rng_states` (the CUDA part only where CUDA is in use)."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class ResumeState(L.Callback):
    """Save what Lightning's checkpoints leave out but an exact resume needs, and put it back.

    Lightning restores the adapter weights, optimiser, LR scheduler, loop counters and the datamodule's
    sampler position; this adds, under ``checkpoint["mtpeft"]``: the job hash (so ``resume=auto`` never
    continues another job), the module's running results (`MODULE_STATE`: best validation metrics, token
    and time counters) and the random generators' states.

    The generators are restored in ``on_train_start``, not when the checkpoint is loaded: by then Lightning
    has built the resumed run's training iterator (a torch ``DataLoader`` iterator draws its base seed from
    the global generator; the interrupted run drew that seed long before), so the generators continue
    exactly where the interrupted run was when it saved. If the save came at the last batch of an epoch,
    the uninterrupted run then built the next epoch's iterator (one draw) before its next step, and the
    resumed run does not: that draw is replayed. Checkpoints are taken after a step's validation, never
    between a step and its validation (`PeriodicCheckpoint`), so nothing else draws in between. Only the
    ``fit`` stage restores; loading the best checkpoint for ``test`` leaves the module and generators
    alone. Under DDP the states of rank 0 are saved.
    """

    def __init__(self, job_hash: str | None = None) -> None:
        self.job_hash = job_hash
        self._pending_rng: dict[str, Any] | None = None
        self._epoch_end = False

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        attributes = vars(pl_module)
        module = {name: attributes[name] for name in MODULE_STATE if name in attributes}
        epoch_end = bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)
        checkpoint["mtpeft"] = {
            "job_hash": self.job_hash,
            "rng": rng_states(),
            "epoch_end": epoch_end,
            "module": module,
        }

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        state = checkpoint.get("mtpeft")
        if not state or trainer.state.fn != TrainerFn.FITTING:
            return
        for name, value in state.get("module", {}).items():
            setattr(pl_module, name, value)
        self._pending_rng = state.get("rng")
        self._epoch_end = bool(state.get("epoch_end"))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending_rng is not None:
            set_rng_states(self._pending_rng)
            self._pending_rng = None
            if self._epoch_end:  # the uninterrupted run now built the next epoch's iterator (module doc)
                torch.empty((), dtype=torch.int64).random_()


class PeriodicCheckpoint(Checkpoint):
    """Write ``<dirpath>/last.ckpt`` every ``every_n_steps`` optimiser steps (atomically), so a killed run
    loses fewer than that many steps; the best-by-validation checkpoint is left to ``ModelCheckpoint``.

    When validation runs right after the step, the checkpoint is written at the end of that validation,
    after the best-checkpoint bookkeeping: Lightning resumes a checkpoint written between a step and its
    validation by skipping that validation, which would change which checkpoint is best. Saving reads
    state only, so it changes no result. A `lightning.pytorch.callbacks.Checkpoint`, so Lightning runs it
    after the other callbacks (and after the ``ModelCheckpoint`` configured before it).
    """

    def __init__(self, dirpath: str | Path, every_n_steps: int) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"checkpoint_every_n_steps must be an int >= 1 or null, got {every_n_steps!r}")
        self.path = Path(dirpath) / "last.ckpt"
        self.every_n_steps = every_n_steps
        self._due_after_validation = False
        self._saved_step = -1

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        # global_step counts optimiser steps: with gradient accumulation, save right after one, never between
        if trainer.fast_dev_run or step == 0 or step % self.every_n_steps or step == self._saved_step:
            return
        if _validation_follows(trainer):
            self._due_after_validation = True
        else:
            self._save(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._due_after_validation and not trainer.sanity_checking:
            self._due_after_validation = False
            self._save(trainer)

    def _save(self, trainer: L.Trainer) -> None:
        self._saved_step = trainer.global_step
        tmp = self.path.with_name(self.path.name + ".tmp")
        trainer.save_checkpoint(tmp, weights_only=False)  # explicit: Lightning logs its default at every save
        if trainer.is_global_zero:
            os.replace(tmp, self.path)


def _validation_follows(trainer: L.Trainer) -> bool:
    """Whether Lightning validates right after the current training batch (its own rule, asked early)."""
    loop = trainer.fit_loop.epoch_loop
    return bool(trainer.enable_validation and loop._should_check_val_fx(trainer.fit_loop._data_fetcher))
