"""The LR schedule: one library schedule (transformers' cosine with a floor) for fine-tuning and pre-training."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate

from mtpeft.eval import train_defaults
from mtpeft.models.pretrain import PretrainConfig, _scheduler
from mtpeft.module import build_scheduler


def _lrs(scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int) -> list[float]:
    """The multiplier applied at each of ``steps`` optimiser steps (base lr 1)."""
    values = []
    for _ in range(steps):
        values.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return values


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)


def _expected(step: int, warmup: int, total: int, floor: float) -> float:
    """Linear warm-up from 0, then cosine from 1 down to ``floor`` at ``total`` (written out by hand)."""
    if step < warmup:
        return step / warmup
    progress = (step - warmup) / (total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def test_default_run_schedule_warms_up_then_decays_to_the_floor() -> None:
    cfg = train_defaults()
    total = 200
    scheduler = build_scheduler(instantiate(cfg.scheduler), _optimizer(), total, cfg.warmup_ratio)
    warmup = int(cfg.warmup_ratio * total)
    floor = cfg.scheduler.min_lr_rate
    expected = [_expected(step, warmup, total, floor) for step in range(total)]
    assert _lrs(scheduler, total) == pytest.approx(expected, abs=1e-12)
    assert expected[0] == 0 and expected[warmup] == 1


def test_pretraining_uses_the_same_schedule() -> None:
    cfg = PretrainConfig(steps=120, warmup=10, min_lr_ratio=0.2)
    expected = [_expected(step, 10, 120, 0.2) for step in range(120)]
    assert _lrs(_scheduler(_optimizer(), cfg), 120) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("ratio", [-0.1, 1.0])
def test_warmup_ratio_outside_0_1_is_refused(ratio: float) -> None:
    factory = instantiate(train_defaults().scheduler)
    with pytest.raises(ValueError, match=r"warmup_ratio=.* must be in \[0, 1\)"):
        build_scheduler(factory, _optimizer(), 100, ratio)
