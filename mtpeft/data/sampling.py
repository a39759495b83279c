"""Temperature sampling over a concatenation of task datasets, re-seeded per epoch and resumable.

With task sizes ``n_i`` the probability of drawing task ``i`` is ``p_i ∝ n_i^(1/T)``: ``T = 1`` samples
proportionally to size, large ``T`` approaches uniform over tasks (the MT-DNN / T5 mixing rule). An
epoch draws the task of every sample from ``p``, then walks a fresh permutation of that task's
examples (wrapping around when a small task is drawn more than ``n_i`` times). The epoch's plan
depends only on ``(seed, epoch)``: each epoch mixes differently (LLaMA-Factory #10672), a rerun
repeats it, and ``state_dict`` records the position inside the epoch so a resumed run continues the
same sequence. Global indices address the concatenated dataset (task blocks in the given order).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import Sampler

from mtpeft.data.seeding import derive_seed


class TemperatureSampler(Sampler[int]):
    """Draw ``num_samples`` global indices per epoch with task probabilities ``∝ n_i^(1/T)``.

    Lightning calls ``set_epoch`` at the start of every epoch (it does so for any sampler with that
    method); call it yourself in a plain loop.
    """

    def __init__(
        self,
        task_sizes: Mapping[str, int],
        temperature: float = 1.0,
        num_samples: int | None = None,
        seed: int = 0,
    ) -> None:
        _check_sizes(task_sizes)
        if not (isinstance(temperature, int | float) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(
                f"TemperatureSampler: temperature must be a finite number > 0 (1 = proportional, "
                f"large = uniform), got {temperature!r}"
            )
        total = sum(task_sizes.values())
        num_samples = total if num_samples is None else num_samples
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(
                f"TemperatureSampler: num_samples must be an int >= 1 or None, got {num_samples!r}"
            )
        self.task_names = list(task_sizes)
        self.task_sizes = [int(task_sizes[name]) for name in self.task_names]
        self.offsets = [sum(self.task_sizes[:i]) for i in range(len(self.task_sizes))]
        self.temperature = float(temperature)
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0
        self._position = 0
        self._resume = 0
        self._plan: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def probabilities(self) -> dict[str, float]:
        """Task sampling probabilities ``p_i = n_i^(1/T) / sum_j n_j^(1/T)``."""
        logits = [math.log(n) / self.temperature for n in self.task_sizes]
        top = max(logits)
        weights = [math.exp(x - top) for x in logits]
        total = sum(weights)
        return {name: w / total for name, w in zip(self.task_names, weights, strict=True)}

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose plan ``__iter__`` yields; a new epoch starts at its beginning."""
        if epoch != self.epoch:
            self.epoch = epoch
            self._resume = 0
            self._position = 0

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        _, _, indices = self._epoch_plan()
        start, self._resume = self._resume, 0
        for i in range(start, self.num_samples):
            self._position = i + 1
            yield int(indices[i])

    def realised_counts(self) -> dict[str, int]:
        """How many samples of each task the current epoch draws."""
        _, tasks, _ = self._epoch_plan()
        counts = torch.bincount(tasks, minlength=len(self.task_names)).tolist()
        return dict(zip(self.task_names, counts, strict=True))

    def state_dict(self) -> dict[str, Any]:
        """Seed, epoch, position in the epoch and the settings the sequence depends on."""
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self._position,
            "temperature": self.temperature,
            "num_samples": self.num_samples,
            "task_sizes": dict(zip(self.task_names, self.task_sizes, strict=True)),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a ``state_dict``: the next iteration continues the saved epoch where it stopped.

        The saved task sizes, temperature and epoch length must match this sampler's, otherwise the
        sequence could not be reproduced and a ValueError names the mismatch.
        """
        current = self.state_dict()
        for key in ("temperature", "num_samples", "task_sizes"):
            if state[key] != current[key]:
                raise ValueError(
                    f"TemperatureSampler.load_state_dict: saved {key}={state[key]!r} differs from this "
                    f"sampler's {current[key]!r}; build the data with the settings of the saved run"
                )
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self._position = self._resume = int(state["position"])
        self._plan = None

    def _epoch_plan(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        """``(epoch, task of each sample, global index of each sample)``, computed once per epoch."""
        if self._plan is not None and self._plan[0] == self.epoch:
            return self._plan
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "temperature-sampler", self.epoch))
        probs = torch.tensor(list(self.probabilities().values()), dtype=torch.float64)
        tasks = torch.multinomial(probs, self.num_samples, replacement=True, generator=gen)
        indices = torch.empty(self.num_samples, dtype=torch.long)
        for t, (size, offset) in enumerate(zip(self.task_sizes, self.offsets, strict=True)):
            perm = torch.randperm(size, generator=gen)
            mask = tasks == t
            walk = torch.arange(int(mask.sum())) % size
            indices[mask] = perm[walk] + offset
        self._plan = (self.epoch, tasks, indices)
        return self._plan


def _check_sizes(task_sizes: Mapping[str, int]) -> None:
    """Every task needs at least one example; name the empty one otherwise."""
    if not task_sizes:
        raise ValueError("TemperatureSampler: task_sizes is empty; pass at least one task with examples")
    for name, size in task_sizes.items():
        if not isinstance(size, int) or size < 1:
            raise ValueError(
                f"TemperatureSampler: task {name!r} has size {size!r}; every task needs >= 1 example"
            )
