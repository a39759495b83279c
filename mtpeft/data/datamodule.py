"""MultiTaskDataModule: build every task's splits, tokenise once, sample by temperature, collate with task ids.

Task ids are the positions of the task names in sorted order. Training draws from the concatenated
train sets with a ``TemperatureSampler`` (re-seeded per epoch, state saved in checkpoints through
``state_dict``/``load_state_dict``). Evaluation visits ``records(split)`` in order, task blocks in
task-id order, and every batch carries ``index`` into that list plus left-padded prompts for
generation. Nothing is dropped silently: truncated or skipped over-length records are logged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from lightning import LightningDataModule
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from mtpeft.data.collate import EvalCollator, TrainCollator
from mtpeft.data.encode import OVERLENGTH_POLICIES, Example, encode_records
from mtpeft.data.records import Record
from mtpeft.data.sampling import TemperatureSampler
from mtpeft.data.tasks import SPLITS, build_splits, get_task
from mtpeft.data.templates import get_template

log = logging.getLogger(__name__)


class MultiTaskDataModule(LightningDataModule):
    """Train/val/test data for a task mixture.

    Args:
        tasks: task name -> ``{train: n, val: n, test: n, **knobs}`` (knobs go to the task's builder).
        tokenizer: fast tokenizer with ``eos_token`` and ``pad_token`` set (pad may differ from eos).
        temperature: sampling temperature T, task probability ``∝ n_i^(1/T)``.
        samples_per_epoch: training samples per epoch; None = sum of train sizes.
        batch_size: training batch size.
        eval_batch_size: validation/test batch size (part of what a score means: keep it fixed).
        max_length: longest tokenised sequence (prompt + target + EOS).
        loss_on_prompt: full-sequence loss (HyCAM) instead of answer-only loss.
        template: prompt template name (``plain``, ``alpaca``).
        seed: seeds the data generation and the sampler.
        num_workers: DataLoader workers.
        overlength: ``truncate`` (cut on the right) or ``skip`` (drop) sequences over ``max_length``.
    """

    def __init__(
        self,
        tasks: Mapping[str, Mapping[str, Any]],
        tokenizer: PreTrainedTokenizerBase,
        temperature: float = 1.0,
        samples_per_epoch: int | None = None,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        max_length: int = 128,
        loss_on_prompt: bool = False,
        template: str = "plain",
        seed: int = 0,
        num_workers: int = 0,
        overlength: str = "truncate",
    ) -> None:
        super().__init__()
        self.task_config = _check_tasks(tasks)
        _check_tokenizer(tokenizer)
        if overlength not in OVERLENGTH_POLICIES:
            raise ValueError(
                f"overlength={overlength!r} is invalid; use one of {', '.join(OVERLENGTH_POLICIES)}"
            )
        if batch_size < 1 or eval_batch_size < 1 or max_length < 2:
            raise ValueError(
                f"need batch_size >= 1, eval_batch_size >= 1, max_length >= 2; "
                f"got {batch_size}, {eval_batch_size}, {max_length}"
            )
        self.tokenizer = tokenizer
        self.template_name = template
        self.template = get_template(template)
        self.temperature = temperature
        self.samples_per_epoch = samples_per_epoch
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.max_length = max_length
        self.loss_on_prompt = loss_on_prompt
        self.seed = seed
        self.num_workers = num_workers
        self.overlength = overlength
        self._records: dict[str, list[Record]] = {}
        self._examples: dict[str, list[Example]] = {}
        self._sampler: TemperatureSampler | None = None
        self._pending_sampler_state: dict[str, Any] | None = None

    # -- tasks ----------------------------------------------------------------------------------
    @property
    def task_names(self) -> list[str]:
        """Task names in task-id order (sorted)."""
        return sorted(self.task_config)

    def task_id(self, name: str) -> int:
        """The id of task ``name``; an unknown name raises ValueError listing this mixture's tasks."""
        if name not in self.task_config:
            raise ValueError(f"task {name!r} is not in this mixture; tasks: {', '.join(self.task_names)}")
        return self.task_names.index(name)

    def metrics_for(self, task: str) -> tuple[str, ...]:
        """Names of the metrics that score ``task``; the first is its score (see ``mtpeft.metrics``)."""
        return get_task(task).metrics

    def max_new_tokens_for(self, task: str) -> int:
        """Generation budget of ``task`` at evaluation."""
        return get_task(task).max_new_tokens

    # -- building -------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Generate and tokenise all splits of all tasks (once; later calls are no-ops)."""
        if self._examples:
            return
        per_split: dict[str, list[Record]] = {split: [] for split in SPLITS}
        for name in self.task_names:
            sizes, knobs = _sizes_and_knobs(self.task_config[name])
            for split, records in build_splits(name, sizes, self.seed, **knobs).items():
                per_split[split].extend(records)
        for split, records in per_split.items():
            task_ids = [self.task_id(r["task"]) for r in records]
            examples, kept, stats = encode_records(
                records,
                task_ids,
                self.tokenizer,
                self.template,
                self.max_length,
                self.loss_on_prompt,
                self.overlength,
            )
            self._report(split, stats, examples)
            self._examples[split], self._records[split] = examples, kept

    def _report(self, split: str, stats: Any, examples: Sequence[Example]) -> None:
        """Log split sizes and, as a warning, every record cut or dropped for length."""
        if stats.truncated or stats.skipped:
            log.warning(
                "%s: %d of %d records exceed max_length=%d tokens (longest %d): %d truncated, %d skipped; "
                "raise max_length to keep them whole",
                split,
                stats.truncated + stats.skipped,
                stats.total,
                self.max_length,
                stats.longest,
                stats.truncated,
                stats.skipped,
            )
        counts = {name: 0 for name in self.task_names}
        for example in examples:
            counts[self.task_names[example.task_id]] += 1
        log.info("%s: %s (longest %d tokens)", split, counts, stats.longest)

    def records(self, split: str) -> list[Record]:
        """The records of ``split`` in the order the dataloaders index them (``batch["index"]``)."""
        self._require_setup()
        if split not in self._records:
            raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        return self._records[split]

    def examples(self, split: str) -> list[Example]:
        """The tokenised examples of ``split`` (aligned with ``records(split)``)."""
        self.records(split)
        return self._examples[split]

    def _require_setup(self) -> None:
        if not self._examples:
            raise RuntimeError("MultiTaskDataModule: call setup() before asking for records or dataloaders")

    # -- sampling -------------------------------------------------------------------------------
    @property
    def sampler(self) -> TemperatureSampler:
        """The training sampler (built on first use, after ``setup``)."""
        if self._sampler is None:
            self._sampler = self._build_sampler()
            if self._pending_sampler_state is not None:
                self._sampler.load_state_dict(self._pending_sampler_state)
                self._pending_sampler_state = None
        return self._sampler

    def _build_sampler(self) -> TemperatureSampler:
        sizes = {name: 0 for name in self.task_names}
        for example in self.examples("train"):
            sizes[self.task_names[example.task_id]] += 1
        sizes = {name: n for name, n in sizes.items() if n > 0}  # eval-only tasks have no train block
        if not sizes:
            raise ValueError("no task has training records; give at least one task a train size > 0")
        return TemperatureSampler(sizes, self.temperature, self.samples_per_epoch, self.seed)

    def state_dict(self) -> dict[str, Any]:
        """Checkpointed state: the sampler's position so a resumed run sees the same sequence."""
        if self._sampler is not None:
            return {"sampler": self._sampler.state_dict()}
        return {"sampler": self._pending_sampler_state} if self._pending_sampler_state else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore ``state_dict`` (applied to the sampler now or when it is built)."""
        state = state_dict.get("sampler")
        if state is None:
            return
        if self._sampler is not None:
            self._sampler.load_state_dict(state)
        else:
            self._pending_sampler_state = dict(state)

    # -- dataloaders ----------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        """Temperature-sampled, right-padded training batches (``task_ids`` included)."""
        sampler = self.sampler
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            sampler.set_epoch(trainer.current_epoch)
        return DataLoader(
            self.examples("train"),  # type: ignore[arg-type]
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=TrainCollator(self.tokenizer.pad_token_id),
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        """Validation batches in ``records("val")`` order, with left-padded prompts and ``index``."""
        return self._eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        """Test batches in ``records("test")`` order, with left-padded prompts and ``index``."""
        return self._eval_dataloader("test")

    def _eval_dataloader(self, split: str) -> DataLoader:
        return DataLoader(
            self.examples(split),  # type: ignore[arg-type]
            batch_size=self.eval_batch_size,
            shuffle=False,
            collate_fn=EvalCollator(self.tokenizer.pad_token_id),
            num_workers=self.num_workers,
        )


def _plain(value: Any) -> Any:
    """Convert config containers (e.g. OmegaConf DictConfig/ListConfig) to plain dicts and lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return [_plain(v) for v in value]
    return value


def _check_tasks(tasks: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Plain-dict copy of the task table; every name must be registered and every entry a mapping."""
    if not isinstance(tasks, Mapping) or not tasks:
        raise ValueError(
            "tasks must be a non-empty mapping task name -> {train: n, val: n, test: n, **knobs}"
        )
    table = _plain(tasks)
    for name, entry in table.items():
        get_task(name)
        if not isinstance(entry, dict):
            raise ValueError(
                f"tasks.{name} must be a mapping like {{train: 3000, val: 100, test: 300}}, got {entry!r}"
            )
    return table


def _sizes_and_knobs(entry: Mapping[str, Any]) -> tuple[dict[str, int], dict[str, Any]]:
    """Split a task entry into split sizes and generator knobs."""
    sizes = {k: v for k, v in entry.items() if k in SPLITS}
    knobs = {k: v for k, v in entry.items() if k not in SPLITS}
    return sizes, knobs


def _check_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """Padding and end-of-text must be defined."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; set tokenizer.eos_token (targets end with it)")
    if tokenizer.pad_token_id is None:
        raise ValueError(
            "the tokenizer has no pad_token; set tokenizer.pad_token (e.g. to a dedicated <pad>)"
        )
