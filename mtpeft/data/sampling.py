"""Temperature sampling over a concatenation of task datasets, re-seeded per epoch and resumable.

With task sizes ``n_i`` the probability of drawing task ``i`` is ``p_i ∝ n_i^(1/T)``: ``T = 1`` samples
proportionally to size, large ``T`` approaches uniform over tasks (the MT-DNN / T5 mixing rule). Two
optional per-task settings refine it: a cap ``K_i`` counts a task as at most ``K_i`` examples (T5's
"examples-proportional mixing with an artificial limit", so one huge task cannot swamp the mixture), and
a weight ``w_i`` scales its share: ``p_i ∝ w_i * min(n_i, K_i)^(1/T)``. An
epoch draws the task of every sample from ``p``, then walks a fresh permutation of that task's
examples (wrapping around when a small task is drawn more than ``n_i`` times). The epoch's plan
depends only on ``(seed, epoch)``: each epoch mixes differently (LLaMA-Factory #10672), a rerun
repeats it, and ``state_dict`` records the position inside the epoch so a resumed run continues the
same sequence. Global indices address the concatenated dataset (task blocks in the given order).

The position to save is the number of samples training has consumed, which is not always the number
drawn: a DataLoader with workers draws batches ahead, and DDP ranks draw their shares separately. The
sampler counts draws (exact for a single-process loop that trains on each index as it is drawn);
``state_dict(consumed=...)`` takes the count from whoever knows better (the datamodule passes the
trainer's count of batches trained on). Under DDP, `RankShard` deals the epoch's stream to the ranks in
turn, as ``DistributedSampler(shuffle=False)`` would, and resumes every rank at the saved global position.

Length grouping (optional, ``lengths`` given): the epoch's stream is cut into pools of
``pool_batches * batch_size`` consecutive draws; each pool is sorted by length (stable) and cut into
batches, and the full batches of the epoch are shuffled with a generator of their own (the partial batch,
if any, stays last so the DataLoader's consecutive batching cuts the same batches). Only the order
changes: the epoch draws exactly the same multiset of indices, so every task's sampling probability and
realised count are those without grouping, while each batch holds examples of similar length (less
padding). Like HF ``group_by_length``, batches then also tend to hold fewer tasks each.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DistributedSampler, Sampler

from mtpeft.data.seeding import derive_seed


class TemperatureSampler(Sampler[int]):
    """Draw ``num_samples`` global indices per epoch with task probabilities ``∝ n_i^(1/T)``.

    Lightning calls ``set_epoch`` at the start of every epoch (it does so for any sampler with that
    method); call it yourself in a plain loop. With ``lengths`` (one per global index) the epoch is
    length-grouped for a DataLoader of ``batch_size`` (module docstring); ``pool_batches`` batches per pool.
    """

    def __init__(
        self,
        task_sizes: Mapping[str, int],
        temperature: float = 1.0,
        num_samples: int | None = None,
        seed: int = 0,
        lengths: Sequence[int] | None = None,
        batch_size: int = 1,
        pool_batches: int = 8,
        caps: Mapping[str, int] | None = None,
        weights: Mapping[str, float] | None = None,
    ) -> None:
        _check_sizes(task_sizes)
        self.caps = _per_task("caps", caps, task_sizes, int)
        self.weights = _per_task("weights", weights, task_sizes, float)
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
        _check_grouping(lengths, total, batch_size, pool_batches)
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long) if lengths is not None else None
        self.batch_size = batch_size
        self.pool_batches = pool_batches
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
        """Task sampling probabilities ``p_i = w_i min(n_i, K_i)^(1/T) / sum_j w_j min(n_j, K_j)^(1/T)``
        (``w = 1`` and ``K = n`` for a task without a weight or a cap)."""
        logits = [
            math.log(min(n, self.caps.get(name, n))) / self.temperature
            + math.log(self.weights.get(name, 1.0))
            for name, n in zip(self.task_names, self.task_sizes, strict=True)
        ]
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

    @property
    def resume_position(self) -> int:
        """Where the next pass over the epoch starts: the position ``load_state_dict`` restored, until a
        pass begins; 0 otherwise."""
        return self._resume

    def __iter__(self) -> Iterator[int]:
        return self._walk(0, 1, self.num_samples)

    def _walk(self, offset: int, step: int, end: int) -> Iterator[int]:
        """The epoch's indices at positions ``start + offset``, ``+ step``, ... below ``end``, where
        ``start`` is the resume position (once, after ``load_state_dict``; else 0).

        Positions past the epoch wrap to its beginning (`RankShard`'s padding). All ``step`` readers are
        taken to draw in lock-step, so each draw moves the position (samples drawn in the epoch) by ``step``.
        """
        _, _, indices = self._epoch_plan()
        start, self._resume = self._resume, 0
        for i in range(start + offset, end, step):
            self._position = min(self.num_samples, i - offset + step)
            yield int(indices[i % self.num_samples])

    def epoch_indices(self) -> list[int]:
        """The current epoch's global indices in order (the position in the epoch does not move)."""
        return self._epoch_plan()[2].tolist()

    def realised_counts(self) -> dict[str, int]:
        """How many samples of each task the current epoch draws."""
        _, tasks, _ = self._epoch_plan()
        counts = torch.bincount(tasks, minlength=len(self.task_names)).tolist()
        return dict(zip(self.task_names, counts, strict=True))

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """Seed, epoch, position in the epoch and the settings the sequence depends on.

        The position is ``consumed``, the samples of this epoch that training has taken, where the caller
        knows it (module docstring: draws run ahead of training with DataLoader workers or under DDP); by
        default the samples drawn so far.
        """
        if consumed is not None and not (isinstance(consumed, int) and 0 <= consumed <= self.num_samples):
            raise ValueError(
                f"TemperatureSampler.state_dict: consumed must be an int in [0, {self.num_samples}], "
                f"got {consumed!r}"
            )
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self._position if consumed is None else consumed,
            "temperature": self.temperature,
            "num_samples": self.num_samples,
            "task_sizes": dict(zip(self.task_names, self.task_sizes, strict=True)),
            "length_grouping": self._grouping(),
            "mixing": {"caps": self.caps, "weights": self.weights} if self.caps or self.weights else None,
        }

    def _grouping(self) -> dict[str, int] | None:
        """The length-grouping settings the order depends on (None: no grouping)."""
        if self.lengths is None:
            return None
        return {"batch_size": self.batch_size, "pool_batches": self.pool_batches}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a ``state_dict``: the next iteration continues the saved epoch where it stopped.

        The saved task sizes, temperature and epoch length must match this sampler's, otherwise the
        sequence could not be reproduced and a ValueError names the mismatch.
        """
        current = self.state_dict()
        for key in ("temperature", "num_samples", "task_sizes", "length_grouping", "mixing"):
            saved = state.get(key)  # checkpoints from before grouping (or mixing) have no such key
            if saved != current[key]:
                raise ValueError(
                    f"TemperatureSampler.load_state_dict: saved {key}={saved!r} differs from this "
                    f"sampler's {current[key]!r}; build the data with the settings of the saved run "
                    "(data.temperature, data.samples_per_epoch, data.batch_size, data.group_by_length, "
                    "data.group_pool_batches, data.task_caps, data.task_weights)"
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
        if self.lengths is not None:
            order = group_by_length(
                self.lengths[indices],
                self.batch_size,
                self.pool_batches,
                torch.Generator().manual_seed(derive_seed(self.seed, "length-grouping", self.epoch)),
            )
            tasks, indices = tasks[order], indices[order]
        self._plan = (self.epoch, tasks, indices)
        return self._plan


class RankShard(DistributedSampler):
    """One DDP rank's share of a `TemperatureSampler`'s epoch: positions ``rank``, ``rank + world``, ...
    of its global stream, padded by wrapping to the same count on every rank (as ``DistributedSampler``
    with ``shuffle=False`` deals a dataset).

    A resumed epoch starts every rank at the saved global position (a multiple of ``world`` times the batch
    size when the datamodule saved it), so each rank continues its own share where it stopped. Being a
    ``DistributedSampler``, Lightning uses it as it is; it would otherwise wrap the sampler in its
    ``DistributedSamplerWrapper``, which shuffles the stream before dealing it (breaking length groups) and
    lists the whole epoch at its start, leaving the sampler no way to resume. ``set_epoch`` reaches the
    wrapped sampler.
    """

    def __init__(self, sampler: TemperatureSampler, num_replicas: int, rank: int) -> None:
        super().__init__(sampler, num_replicas=num_replicas, rank=rank, shuffle=False)  # type: ignore[arg-type]
        self.sampler = sampler

    def __iter__(self) -> Iterator[int]:
        return self.sampler._walk(self.rank, self.num_replicas, self.total_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of this shard and of the wrapped sampler."""
        super().set_epoch(epoch)
        self.sampler.set_epoch(epoch)


def group_by_length(
    lengths: torch.Tensor, batch_size: int, pool_batches: int, gen: torch.Generator
) -> torch.Tensor:
    """A permutation of ``range(len(lengths))`` whose consecutive ``batch_size`` chunks hold similar lengths.

    Pools of ``pool_batches * batch_size`` consecutive positions are sorted by length (stable) and cut into
    batches; the full batches are shuffled with ``gen`` and a final partial batch stays last.
    """
    pool = pool_batches * batch_size
    batches: list[torch.Tensor] = []
    for start in range(0, len(lengths), pool):
        positions = torch.arange(start, min(start + pool, len(lengths)))
        ranked = positions[torch.argsort(lengths[positions], stable=True)]
        batches.extend(ranked.split(batch_size))
    tail = [batches.pop()] if batches and len(batches[-1]) < batch_size else []
    shuffled = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
    return torch.cat([*shuffled, *tail]) if batches or tail else torch.empty(0, dtype=torch.long)


def _check_grouping(lengths: Sequence[int] | None, total: int, batch_size: int, pool_batches: int) -> None:
    """Length grouping needs one length per global index and positive batch and pool sizes."""
    if lengths is None:
        return
    if len(lengths) != total:
        raise ValueError(
            f"TemperatureSampler: got {len(lengths)} lengths for {total} examples; pass one length per "
            "global index (task blocks in order)"
        )
    for name, value in (("batch_size", batch_size), ("pool_batches", pool_batches)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(
                f"TemperatureSampler: {name} must be an int >= 1 for length grouping, got {value!r}"
            )


def _check_sizes(task_sizes: Mapping[str, int]) -> None:
    """Every task needs at least one example; name the empty one otherwise."""
    if not task_sizes:
        raise ValueError("TemperatureSampler: task_sizes is empty; pass at least one task with examples")
    for name, size in task_sizes.items():
        if not isinstance(size, int) or size < 1:
            raise ValueError(
                f"TemperatureSampler: task {name!r} has size {size!r}; every task needs >= 1 example"
            )


def _per_task(
    name: str, values: Mapping[str, Any] | None, task_sizes: Mapping[str, int], kind: type
) -> dict[str, Any]:
    """``values`` (task -> cap or weight) as a plain dict after checking that every task is one of
    ``task_sizes`` and every value a positive number (caps: an int)."""
    values = dict(values or {})
    unknown = sorted(set(values) - set(task_sizes))
    if unknown:
        raise ValueError(
            f"TemperatureSampler: {name} name {', '.join(map(repr, unknown))}, which are not tasks with training "
            f"records; tasks: {', '.join(task_sizes)}"
        )
    for task, value in values.items():
        valid = (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and value > 0
        )
        if not valid or (kind is int and not isinstance(value, int)):
            raise ValueError(
                f"TemperatureSampler: {name}[{task!r}] must be a positive {kind.__name__}, got {value!r}"
            )
    return {task: kind(value) for task, value in values.items()}
