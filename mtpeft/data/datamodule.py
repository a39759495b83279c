"""MultiTaskDataModule: build every task's splits, tokenise once, sample by temperature, collate with task ids.

Tasks come from two places that can be mixed: ``tasks`` (procedural generators registered in
``mtpeft.data.tasks``, sized per split) and ``sources`` (files and ``datasets`` ids, see
``mtpeft.data.sources``). The datamodule keeps its own task table (name -> metrics, generation budget);
source tasks never enter the global registry. Task ids are the positions of the task names in sorted order. Training draws from the concatenated
train sets with a ``TemperatureSampler`` (re-seeded per epoch, state saved in checkpoints through
``state_dict``/``load_state_dict``), optionally grouped by length (``group_by_length=true``) so that
batches carry little padding (the share is logged once as ``data/padding_fraction``). Evaluation visits ``records(split)`` task by task in
task-id order, each task's prompts shortest first (less left padding), and every batch carries ``index``
into that list plus left-padded prompts for generation. Nothing is dropped silently: truncated or skipped
over-length records are logged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Annotated, Any, Literal

import torch
from lightning import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.trainer.states import TrainerFn
from pydantic import BaseModel, Field, Strict
from torch.utils.data import DataLoader, Sampler
from transformers import PreTrainedTokenizerBase

from mtpeft.data.budgets import BUDGET_KEY, eval_budget, target_lengths, warn_unreachable_targets
from mtpeft.data.collate import EvalCollator, TrainCollator, padding_fraction
from mtpeft.data.encode import EncodeStats, Example, encode_records
from mtpeft.data.records import Record
from mtpeft.data.sampling import RankShard, TemperatureSampler
from mtpeft.data.sources import SourceTask, default_max_new_tokens, load_sources, parse_sources
from mtpeft.data.tasks import SPLITS, TaskSpec, build_splits, get_task
from mtpeft.data.templates import get_template, with_chat_template
from mtpeft.utils.schema import (
    CONFIG,
    Bool,
    ConfigError,
    Int,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Str,
    checked_arguments,
    parse,
    to_plain,
)

log = logging.getLogger(__name__)

Overlength = Literal["truncate", "skip"]
"""What happens to a sequence longer than ``max_length`` (``mtpeft.data.encode.OVERLENGTH_POLICIES``)."""


class MultiTaskDataModule(LightningDataModule):
    """Train/val/test data for a task mixture.

    Args:
        tasks: generator task name -> ``{train: n, val: n, test: n, **knobs}`` (knobs go to the task's builder).
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
        sources: data sources (``key -> entry`` or a list): files or ``datasets`` ids with a format, a
            split and scoring options (``mtpeft.data.sources.SourceConfig``). Loaded at ``setup`` (or on
            the first question about task names).
        chat_template: wrap each rendered prompt in the tokenizer's chat template (instruct models; set
            from ``model.chat_template`` by the run).
        group_by_length: group training examples of similar length into batches: pools of
            ``group_pool_batches`` batches of the temperature-sampled stream are sorted by length and the
            batches shuffled (``mtpeft.data.sampling``); same examples per epoch, less padding.
        group_pool_batches: batches per sorting pool (more: less padding, batches less mixed in task).
        task_caps: task -> K: the task counts as at most K examples in the sampling probabilities (T5's
            limit on examples-proportional mixing), ``p_i ∝ w_i min(n_i, K_i)^(1/T)``.
        task_weights: task -> w: scales the task's sampling probability (``mtpeft.data.sampling``).
    """

    @checked_arguments("data")
    def __init__(
        self,
        tasks: Mapping[str, Any] | None,
        tokenizer: PreTrainedTokenizerBase,
        temperature: PositiveFloat = 1.0,
        samples_per_epoch: PositiveInt | None = None,
        batch_size: PositiveInt = 32,
        eval_batch_size: PositiveInt = 64,
        max_length: Annotated[int, Strict(), Field(ge=2)] = 128,
        loss_on_prompt: Bool = False,
        template: Str = "plain",
        seed: Int = 0,
        num_workers: NonNegativeInt = 0,
        overlength: Overlength = "truncate",
        sources: Mapping[str, Any] | list[Any] | None = None,
        chat_template: Bool = False,
        group_by_length: Bool = False,
        group_pool_batches: PositiveInt = 8,
        task_caps: dict[str, PositiveInt] | None = None,
        task_weights: dict[str, PositiveFloat] | None = None,
    ) -> None:
        super().__init__()
        self.source_configs = parse_sources(sources)
        self.task_config = parse_tasks(tasks, allow_empty=bool(self.source_configs))
        self.mixing = {"task_caps": dict(task_caps or {}), "task_weights": dict(task_weights or {})}
        if not self.source_configs:  # the tasks are known now: a wrong name fails before any data is built
            check_mixing_names(self.mixing, list(self.task_config))
        _check_tokenizer(tokenizer)
        self.group_by_length = group_by_length
        self.group_pool_batches = group_pool_batches
        self.padding_fraction: float | None = None
        """Share of padding tokens in the first training epoch's batches (set by ``train_dataloader``)."""
        self.tokenizer = tokenizer
        self.template_name = f"{template}+chat" if chat_template else template
        self.template = get_template(template)
        if chat_template:
            self.template = with_chat_template(self.template, tokenizer)
        self.temperature = temperature
        self.samples_per_epoch = samples_per_epoch
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.max_length = max_length
        self.loss_on_prompt = loss_on_prompt
        self.seed = seed
        self.num_workers = num_workers
        self.overlength = overlength
        self._table: dict[str, TaskSpec | SourceTask] | None = None
        self._records: dict[str, list[Record]] = {}
        self._examples: dict[str, list[Example]] = {}
        self._sampler: TemperatureSampler | None = None
        self._pending_sampler_state: dict[str, Any] | None = None

    # -- tasks ----------------------------------------------------------------------------------
    @classmethod
    def from_files(
        cls,
        paths: Sequence[str],
        tokenizer: PreTrainedTokenizerBase,
        ratios: Sequence[float] = (8, 1, 1),
        split_seed: int = 2333,
        format: str = "alpaca",
        metrics: Sequence[str] | None = None,
        max_new_tokens: int | None = None,
        dedup: bool = True,
        limit: Mapping[str, int | None] | None = None,
        fields: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> MultiTaskDataModule:
        """A datamodule over local JSON/JSONL ``paths`` (``data=files data.paths=[a.json,b.jsonl]``).

        One source: every file is split by ``ratios`` with ``split_seed``; the task is each record's
        ``task`` field, else the file stem. Other keyword arguments go to the constructor.
        """
        if not paths or paths == "???":
            raise ValueError(
                "data.paths is not set: pass data.paths=[a.json,b.jsonl] (Alpaca JSON or JSON Lines)"
            )
        source = {"format": format, "files": paths, "ratios": ratios, "split_seed": split_seed}
        optional = {"metrics": metrics, "max_new_tokens": max_new_tokens, "limit": limit, "fields": fields}
        source.update({"dedup": dedup, **{k: v for k, v in optional.items() if v is not None}})
        source = to_plain(source)
        return cls(None, tokenizer, sources={"files": source}, **kwargs)

    @property
    def task_names(self) -> list[str]:
        """Task names in task-id order (sorted); loads the sources on first use."""
        return sorted(self._task_table())

    def task_id(self, name: str) -> int:
        """The id of task ``name``; an unknown name raises ValueError listing this mixture's tasks."""
        if name not in self._task_table():
            raise ValueError(f"task {name!r} is not in this mixture; tasks: {', '.join(self.task_names)}")
        return self.task_names.index(name)

    def task_spec(self, name: str) -> TaskSpec | SourceTask:
        """This mixture's description of task ``name`` (metrics, generation budget)."""
        self.task_id(name)
        return self._task_table()[name]

    def metrics_for(self, task: str) -> tuple[str, ...]:
        """Names of the metrics that score ``task``; the first is its score (see ``mtpeft.metrics``)."""
        return self.task_spec(task).metrics

    def max_new_tokens_for(self, task: str) -> int:
        """Generation budget of ``task`` at evaluation (set at ``setup``: `_derive_budgets`)."""
        self._require_setup()
        budget = self.task_spec(task).max_new_tokens
        assert budget is not None
        return budget

    def _task_table(self) -> dict[str, TaskSpec | SourceTask]:
        """Generator tasks from the registry plus this datamodule's source tasks (loaded once)."""
        if self._table is None:
            table: dict[str, TaskSpec | SourceTask] = {name: get_task(name) for name in self.task_config}
            for task in load_sources(self.source_configs):
                if task.name in table:
                    raise ValueError(
                        f"task {task.name!r} from {task.source} has the name of a generator task in "
                        f"data.tasks; rename it ({task.source}.task: <name>)"
                    )
                table[task.name] = task
            self._table = table
        return self._table

    # -- building -------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Build (or load) and tokenise all splits of all tasks (once; later calls are no-ops)."""
        if self._examples:
            return
        check_mixing_names(self.mixing, self.task_names)
        blocks = {name: self._task_splits(name) for name in self.task_names}
        self._derive_budgets(blocks)
        for split in SPLITS:
            self._examples[split], self._records[split] = self._encode_split(split, blocks)

    def _encode_split(
        self, split: str, blocks: Mapping[str, Mapping[str, list[Record]]]
    ) -> tuple[list[Example], list[Record]]:
        """Tokenise one split task by task (task blocks in task-id order), counting cuts per task."""
        examples: list[Example] = []
        kept: list[Record] = []
        stats: dict[str, EncodeStats] = {}
        for name in self.task_names:
            records = blocks[name].get(split, [])
            task_examples, task_kept, stats[name] = encode_records(
                records,
                [self.task_id(name)] * len(records),
                self.tokenizer,
                self.template,
                self.max_length,
                self.loss_on_prompt,
                self.overlength,
            )
            if records and not task_kept and isinstance(self.task_spec(name), SourceTask):
                raise ValueError(
                    f"{split}: every record of task {name!r} is longer than max_length={self.max_length} "
                    f"tokens (longest {stats[name].longest}) and overlength=skip dropped them all; raise "
                    "data.max_length or use overlength=truncate"
                )
            examples.extend(replace(e, index=e.index + len(kept)) for e in task_examples)
            kept.extend(task_kept)
        self._report(split, stats)
        return examples, kept

    def _task_splits(self, name: str) -> dict[str, list[Record]]:
        """The records of task ``name`` per split: generated from the seed, or as loaded from its source."""
        spec = self._task_table()[name]
        if isinstance(spec, SourceTask):
            return dict(spec.splits)
        sizes, knobs = _sizes_and_knobs(self.task_config[name])
        return build_splits(name, sizes, self.seed, **knobs)

    def _derive_budgets(self, blocks: Mapping[str, Mapping[str, list[Record]]]) -> None:
        """Set every task's generation budget (`eval_budget`): a source task without ``max_new_tokens``
        gets its longest train target's length (+ EOS, capped); a registered task its
        ``data.tasks.<name>.max_new_tokens``, else its registered budget raised to fit its longest val/test
        target. A budget some val/test target does not fit is logged as a warning naming the key to set."""
        table = self._task_table()
        for name, spec in table.items():
            evaluated = [r for split in ("val", "test") for r in blocks[name].get(split, [])]
            lengths = target_lengths(evaluated, self.tokenizer, self.template)
            if isinstance(spec, SourceTask):
                if spec.max_new_tokens is None:
                    records = blocks[name].get("train") or [r for part in blocks[name].values() for r in part]
                    budget = default_max_new_tokens(records, self.tokenizer, self.template)
                    table[name] = replace(spec, max_new_tokens=budget)
                    log.info("task %r: max_new_tokens=%d (longest train target + EOS)", name, budget)
                key = f"max_new_tokens of the data.sources entry of {spec.source}"
            else:
                given = self.task_config[name].get(BUDGET_KEY)
                budget = eval_budget(spec.max_new_tokens, given, lengths)
                if budget != spec.max_new_tokens:
                    origin = "data.tasks" if given else "raised to fit the longest val/test target + EOS"
                    log.info("task %r: max_new_tokens=%d (%s)", name, budget, origin)
                table[name] = replace(spec, max_new_tokens=budget)
                key = f"data.tasks.{name}.{BUDGET_KEY}"
            warn_unreachable_targets(name, lengths, table[name].max_new_tokens, key)

    def _report(self, split: str, stats: Mapping[str, EncodeStats]) -> None:
        """Log split sizes per task and, as a warning per task, every record cut or dropped for length."""
        for name, task_stats in stats.items():
            if task_stats.truncated or task_stats.skipped:
                log.warning(
                    "%s/%s: %d of %d records exceed max_length=%d tokens (longest %d): %d truncated, %d skipped; "
                    "raise max_length to keep them whole",
                    split,
                    name,
                    task_stats.truncated + task_stats.skipped,
                    task_stats.total,
                    self.max_length,
                    task_stats.longest,
                    task_stats.truncated,
                    task_stats.skipped,
                )
            if task_stats.prompts_cut and split != "train":
                log.warning(
                    "%s/%s: %d prompts are longer than max_length=%d tokens: generation sees their BOS and last "
                    "tokens, %d in all (their beginning is dropped); raise max_length to keep them whole",
                    split,
                    name,
                    task_stats.prompts_cut,
                    self.max_length,
                    self.max_length,
                )
        counts = {name: s.total - s.skipped for name, s in stats.items()}
        longest = max((s.longest for s in stats.values()), default=0)
        log.info("%s: %s (longest %d tokens)", split, counts, longest)

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
        caps, weights = self.mixing["task_caps"], self.mixing["task_weights"]
        untrained = sorted((set(caps) | set(weights)) - set(sizes))
        if untrained:
            raise ConfigError(
                f"data.task_caps / data.task_weights: {', '.join(map(repr, untrained))} has no training "
                "records (an evaluation-only task is never sampled): remove it there"
            )
        mixing = {"caps": caps or None, "weights": weights or None}
        if not self.group_by_length:
            return TemperatureSampler(sizes, self.temperature, self.samples_per_epoch, self.seed, **mixing)
        return TemperatureSampler(
            sizes,
            self.temperature,
            self.samples_per_epoch,
            self.seed,
            lengths=[len(e.input_ids) for e in self.examples("train")],
            batch_size=self._global_batch_size(),
            pool_batches=self.group_pool_batches,
            **mixing,
        )

    def _global_batch_size(self) -> int:
        """Examples per optimiser step over all DDP ranks: the training loader deals the sampled stream to
        the ranks in turn (`RankShard`), so groups of this many similar lengths give every rank's batch
        similar lengths."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        return self.batch_size * (torch.distributed.get_world_size() if distributed else 1)

    def state_dict(self) -> dict[str, Any]:
        """Checkpointed state: the sampler's position so a resumed run sees the same sequence."""
        if self._sampler is not None:
            return {"sampler": self._sampler.state_dict(self._consumed())}
        return {"sampler": self._pending_sampler_state} if self._pending_sampler_state else {}

    def _consumed(self) -> int | None:
        """Samples of the current epoch that training has taken, over all ranks; None outside a fit.

        The sampler's own count is of indices drawn, which runs ahead of training: DataLoader workers
        prefetch batches, and under DDP each rank draws its own share. Lightning's count of the epoch's
        batches handed to training (``batch_progress.current.ready``, which a resumed run restores and
        continues) times the global batch size is what was consumed; it is capped by what was drawn, which
        it can only exceed between an epoch's ``set_epoch`` and the reset of Lightning's counter.
        """
        trainer = getattr(self, "trainer", None)
        loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
        if loop is None or trainer.state.fn != TrainerFn.FITTING or self._sampler is None:
            return None
        batches = loop.batch_progress.current.ready
        drawn = self._sampler.state_dict()["position"]
        return min(batches * self._global_batch_size(), drawn)

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
        """Temperature-sampled, right-padded training batches (``task_ids`` included); under DDP each rank
        gets its `RankShard` of the sampled stream.

        The sampler is set to the trainer's epoch; a run resumed from a checkpoint saved after an epoch's
        last batch (every sample of the epoch consumed) starts the next one. Lightning moves its epoch on
        only after building the loader, whose workers start drawing at once (``num_workers > 0``): they
        would draw the finished epoch's nothing and the next epoch would be skipped.
        """
        sampler = self.sampler
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            sampler.set_epoch(trainer.current_epoch)
            if sampler.resume_position == len(sampler):
                sampler.set_epoch(trainer.current_epoch + 1)
        if self.padding_fraction is None:
            self._report_padding(sampler, trainer)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        world, rank = _world_and_rank()
        return DataLoader(
            self.examples("train"),  # type: ignore[arg-type]
            batch_size=self.batch_size,
            # also for one process: Lightning wraps any other sampler under DDP (shuffling the stream)
            sampler=RankShard(sampler, world, rank) if distributed else sampler,
            collate_fn=TrainCollator(self.tokenizer.pad_token_id),
            num_workers=self.num_workers,
        )

    def _report_padding(self, sampler: TemperatureSampler, trainer: Any) -> None:
        """Log (once) the share of padding tokens in this epoch's training batches, also to the loggers."""
        examples = self.examples("train")
        lengths = [len(examples[i].input_ids) for i in sampler.epoch_indices()]
        self.padding_fraction = padding_fraction(lengths, self._global_batch_size())
        batches = -(-len(lengths) // self._global_batch_size())
        log.info(
            "training padding: %.1f%% of tokens over %d batches (group_by_length=%s)",
            100 * self.padding_fraction,
            batches,
            self.group_by_length,
        )
        for logger in getattr(trainer, "loggers", None) or []:
            logger.log_metrics({"data/padding_fraction": self.padding_fraction}, step=0)

    def val_dataloader(self) -> DataLoader:
        """Validation batches (task by task, prompts shortest first) with left-padded prompts and ``index``
        into ``records("val")``."""
        return self._eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        """Test batches (task by task, prompts shortest first) with left-padded prompts and ``index``
        into ``records("test")``."""
        return self._eval_dataloader("test")

    def _eval_dataloader(self, split: str) -> DataLoader:
        examples = _by_prompt_length(self.examples(split))
        return DataLoader(
            examples,  # type: ignore[arg-type]
            batch_size=self.eval_batch_size,
            sampler=_eval_sampler(examples),
            collate_fn=EvalCollator(self.tokenizer.pad_token_id),
            num_workers=self.num_workers,
        )


def _by_prompt_length(examples: Sequence[Example]) -> list[Example]:
    """Eval examples by task id, then prompt length (stable): batches hold one task and prompts of similar
    length, so less left padding is generated over (mix3's test split: 20% -> 9% of prompt tokens; eval
    up to ~12% faster on the tiny model, the same predictions). Results go back to records by ``index``."""
    return sorted(examples, key=lambda e: (e.task_id, len(e.prompt_ids)))


def _eval_sampler(examples: Sequence[Example]) -> Sampler[int] | None:
    """Under DDP, each example on exactly one rank: Lightning's default ``DistributedSampler`` pads the
    last ranks with repeated examples, which the summed metric states would count twice. None (sequential
    order) in a single process."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    if world == 1:
        return None
    return UnrepeatedDistributedSampler(examples, num_replicas=world, rank=rank, shuffle=False)


def _world_and_rank() -> tuple[int, int]:
    """``(world size, rank)`` of the initialised process group; ``(1, 0)`` in a single process."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1, 0
    return torch.distributed.get_world_size(), torch.distributed.get_rank()


class TaskSizes(BaseModel):
    """Split sizes and generation budget of one generator task (``data.tasks.<name>``); its other keys are
    the generator's knobs."""

    model_config = CONFIG

    train: NonNegativeInt = 0
    """Training records (0: the task is only evaluated)."""
    val: NonNegativeInt = 0
    """Validation records."""
    test: NonNegativeInt = 0
    """Test records."""
    max_new_tokens: PositiveInt | None = None
    """Generation budget at evaluation (tokens). None: the task's registered budget, raised to the longest
    val/test target + EOS under this run's tokenizer and template (`eval_budget`)."""


def parse_tasks(tasks: Mapping[str, Any] | None, allow_empty: bool = False) -> dict[str, dict[str, Any]]:
    """Plain-dict copy of the ``data.tasks`` table after checking it: every name is a registered generator
    task and every entry has integer split sizes >= 0 and only the task's own knobs (errors name
    ``data.tasks.<name>.<key>``)."""
    table = to_plain(tasks)
    if allow_empty and not table:
        return {}
    if not isinstance(table, Mapping) or not table:
        raise ConfigError(
            "data.tasks must be a non-empty mapping task name -> {train: n, val: n, test: n, **knobs}, "
            "or give data.sources (files or datasets)"
        )
    for name, entry in table.items():
        try:
            spec = get_task(name)
        except ValueError as err:
            raise ConfigError(f"data.tasks.{name}: {err}") from None
        if not isinstance(entry, Mapping):
            raise ConfigError(
                f"data.tasks.{name} must be a mapping like {{train: 3000, val: 100, test: 300}}, got {entry!r}"
            )
        sizes = {k: v for k, v in entry.items() if k not in spec.knobs}
        parse(TaskSizes, sizes, f"data.tasks.{name}", extra_keys=spec.knobs)
        if spec.config is not None:
            knobs = {k: v for k, v in entry.items() if k in spec.knobs}
            parse(spec.config, knobs, f"data.tasks.{name}", extra_keys=TaskSizes.model_fields)
    return table


def check_mixing_names(mixing: Mapping[str, Any], tasks: Sequence[str]) -> None:
    """``mixing`` (``{"task_caps": {...}, "task_weights": {...}}``, from ``data``) names tasks of ``tasks``."""
    for key in ("task_caps", "task_weights"):
        unknown = sorted(set(mixing.get(key) or {}) - set(tasks))
        if unknown:
            raise ConfigError(
                f"data.{key}: {', '.join(map(repr, unknown))} is not a task of this mixture; tasks: "
                f"{', '.join(sorted(tasks))}"
            )


def _sizes_and_knobs(entry: Mapping[str, Any]) -> tuple[dict[str, int], dict[str, Any]]:
    """Split a task entry into split sizes and generator knobs (its ``max_new_tokens`` is neither)."""
    sizes = {k: v for k, v in entry.items() if k in SPLITS}
    knobs = {k: v for k, v in entry.items() if k not in SPLITS and k != BUDGET_KEY}
    return sizes, knobs


def _check_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """Padding and end-of-text must be defined."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; set tokenizer.eos_token (targets end with it)")
    if tokenizer.pad_token_id is None:
        raise ValueError(
            "the tokenizer has no pad_token; set tokenizer.pad_token (e.g. to a dedicated <pad>)"
        )
