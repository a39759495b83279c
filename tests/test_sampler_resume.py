"""The checkpointed sampler position is what training consumed, not what was drawn: DataLoader workers draw
batches ahead and DDP ranks draw their own shares, yet a run resumed from a checkpoint continues exactly
where training stopped (the single-process, ``num_workers=0`` case is `tests.test_resume`'s)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.trainer.connectors.data_connector import _get_distributed_sampler
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities.data import _update_dataloader
from torch.utils.data import DataLoader, DistributedSampler
from transformers import PreTrainedTokenizerFast

from mtpeft.data.datamodule import MultiTaskDataModule
from mtpeft.data.sampling import RankShard, TemperatureSampler
from tests.conftest import bare_trainer
from tests.test_datamodule import TASKS, tokenizer  # noqa: F401  (the tokenizer fixture)

BATCH = 4
SETTINGS = {"batch_size": BATCH, "eval_batch_size": 5, "samples_per_epoch": 30}
"""30 samples: 8 batches of 4 per epoch in one process (the last one partial), 4 per rank with 2 ranks
(15 samples each, padded to 16)."""


class Recorder(L.LightningModule):
    """Test helper: records every training batch (token ids and task ids) and saves a checkpoint at the
    end of the steps ``save_at`` (``at<step>.ckpt`` in ``into``), as `PeriodicCheckpoint` does."""

    def __init__(self, into: Path | None = None, save_at: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.batches: list[tuple[list[list[int]], list[int]]] = []
        self.into, self.save_at = into, save_at

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.batches.append((batch["input_ids"].tolist(), batch["task_ids"].tolist()))
        return (self.weight**2).sum()

    def on_train_batch_end(self, *args: Any) -> None:
        step = self.trainer.global_step
        if self.into is not None and step in self.save_at:
            self.trainer.save_checkpoint(self.into / f"at{step}.ckpt", weights_only=False)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(dm: MultiTaskDataModule, module: Recorder, root: Path, steps: int, ckpt: Path | None = None) -> None:
    bare_trainer(root, max_steps=steps).fit(module, datamodule=dm, ckpt_path=ckpt)


def test_workers_save_the_consumed_position_and_resume_where_training_stopped(
    tokenizer: PreTrainedTokenizerFast,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A worker prefetches two batches: the sampler has drawn ahead of training when a checkpoint is saved,
    yet the saved position is the samples trained on and the resumed run trains on the same batches."""
    saves = (1, 3, 8)  # mid-epoch (the reviewer's case: 1 batch of 4 trained, 12 drawn), mid-epoch, epoch end
    full = Recorder(tmp_path, saves)
    _fit(MultiTaskDataModule(TASKS, tokenizer, num_workers=1, **SETTINGS), full, tmp_path, steps=11)
    assert len(full.batches) == 11
    for step in saves:
        checkpoint = tmp_path / f"at{step}.ckpt"
        position = torch.load(checkpoint, weights_only=False)["MultiTaskDataModule"]["sampler"]["position"]
        assert position == min(step * BATCH, 30), f"saved at step {step}"
        resumed = Recorder()
        dm = MultiTaskDataModule(TASKS, tokenizer, num_workers=1, **SETTINGS)
        _fit(dm, resumed, tmp_path, steps=11, ckpt=checkpoint)
        assert resumed.batches == full.batches[step:], f"resumed from step {step}"


def test_state_dict_takes_the_consumed_count() -> None:
    sampler = TemperatureSampler({"a": 10, "b": 5}, num_samples=12)
    iterator = iter(sampler)
    drawn = [next(iterator) for _ in range(8)]
    assert sampler.state_dict()["position"] == 8
    state = sampler.state_dict(consumed=4)
    assert state["position"] == 4
    resumed = TemperatureSampler({"a": 10, "b": 5}, num_samples=12)
    resumed.load_state_dict(state)
    assert drawn[:4] + list(resumed) == sampler.epoch_indices()
    with pytest.raises(ValueError, match=r"consumed must be an int in \[0, 12\], got 13"):
        sampler.state_dict(consumed=13)


def test_rank_shards_deal_the_stream_in_turn_and_resume_at_a_global_position() -> None:
    sampler = TemperatureSampler({"a": 10, "b": 5}, num_samples=11)
    plan = sampler.epoch_indices()
    padded = plan + plan[:1]  # 11 samples over 2 ranks: 6 each, the first sample repeated
    shards = [RankShard(sampler, 2, rank) for rank in range(2)]
    assert [list(s) for s in shards] == [padded[0::2], padded[1::2]] and len(shards[0]) == 6
    dealt = DistributedSampler(range(11), 2, 1, shuffle=False)  # type: ignore[arg-type]
    assert list(shards[1]) == [plan[i] for i in dealt]  # as torch deals a dataset
    for rank in range(2):
        resumed = TemperatureSampler({"a": 10, "b": 5}, num_samples=11)
        resumed.load_state_dict(sampler.state_dict(consumed=8))  # 2 batches of 2 per rank
        assert list(RankShard(resumed, 2, rank)) == padded[rank::2][4:]
    shards[0].set_epoch(3)
    assert sampler.epoch == 3


# -- DDP -----------------------------------------------------------------------------------------------
def _as_lightning_prepares_it(loader: DataLoader, world: int, rank: int) -> DataLoader:
    """The training loader Lightning's DDP strategy makes of ``loader`` (``_DataConnector._prepare_dataloader``
    with ``use_distributed_sampler=True``): a sampler that is no ``DistributedSampler`` is wrapped in a
    shuffling ``DistributedSamplerWrapper``."""
    if isinstance(loader.sampler, DistributedSampler):
        return loader
    sampler = _get_distributed_sampler(
        loader, shuffle=True, overfit_batches=0, mode=RunningStage.TRAINING, num_replicas=world, rank=rank
    )
    return _update_dataloader(loader, sampler, mode=RunningStage.TRAINING)


def _fitting(ready: int) -> SimpleNamespace:
    """A trainer fitting epoch 0 that has handed ``ready`` batches of it to training (on each rank)."""
    progress = SimpleNamespace(current=SimpleNamespace(ready=ready))
    return SimpleNamespace(
        current_epoch=0,
        state=SimpleNamespace(fn=TrainerFn.FITTING),
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)),
    )


def _rank_loader(
    dm: MultiTaskDataModule, world: int, rank: int, monkeypatch: pytest.MonkeyPatch
) -> DataLoader:
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: world)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: rank)
    return _as_lightning_prepares_it(dm.train_dataloader(), world, rank)


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("grouped", [False, True])
def test_ddp_ranks_resume_at_the_consumed_position(
    tokenizer: PreTrainedTokenizerFast,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    grouped: bool,
    world: int,
) -> None:
    """Simulated ranks (also one: DDP on one device, which Lightning wraps all the same), each with its
    own datamodule: they train on 2 batches (having drawn 3), a checkpoint is saved, and each rank's
    resumed loader yields exactly its remaining batches."""
    trained = 2
    settings = {**SETTINGS, "group_by_length": grouped}
    full, saved, dealt = [], [], []
    for rank in range(world):
        dm = MultiTaskDataModule(TASKS, tokenizer, **settings)
        dm.setup("fit")
        dm.trainer = _fitting(0)
        loader = _rank_loader(dm, world, rank, monkeypatch)
        batches = iter(loader.batch_sampler)
        head = [next(batches) for _ in range(trained + 1)]  # one batch prefetched
        dm.trainer = _fitting(trained)
        saved.append(dm.state_dict())
        full.append(head + list(batches))
        plan = dm.sampler.epoch_indices()
        dealt.append((plan + plan[: world * len(loader.sampler) - len(plan)])[rank::world])
    assert [s["sampler"]["position"] for s in saved] == [world * trained * BATCH] * world
    for rank in range(world):
        dm = MultiTaskDataModule(TASKS, tokenizer, **settings)
        dm.load_state_dict(saved[rank])
        dm.setup("fit")
        dm.trainer = _fitting(trained)
        loader = _rank_loader(dm, world, rank, monkeypatch)
        assert list(loader.batch_sampler) == full[rank][trained:], f"rank {rank}"
        assert len(loader) == len(full[rank])  # Lightning counts the epoch's batches from len(loader)
    for rank in range(world):  # in turn, as length grouping assumes, not shuffled
        assert [i for batch in full[rank] for i in batch] == dealt[rank]
