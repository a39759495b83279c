"""`MultiTaskModule`: the method-agnostic LightningModule.

Training: per-sample LM loss reduced per task (``train/<task>/loss``) and overall (``train/loss``, token
mean), plus the method's auxiliary losses (``train/aux/<name>``), which are added to the objective.
Evaluation (val and test): LM loss per task and generation with the KV cache (greedy, or
``evaluation.num_samples`` sampled completions per prompt for pass@k), every row stopping at its own task's
budget or at EOS, whatever tasks share its batch. Each eval batch updates fresh
``torchmetrics`` objects per task and metric (``mtpeft.metrics.tracker``); at the end of the epoch they are
computed, synced across processes, and logged as ``<split>/<task>/<metric>`` for every metric of the task,
``<split>/<task>/score`` (its first metric), ``<split>/<task>/loss`` and the macro average
``<split>/avg/score``, which selects checkpoints.
Checkpoints hold only the adapter state, not the frozen base model.
"""

from __future__ import annotations

import functools
import math
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch

from mtpeft.adapters.base import AdaptedModel
from mtpeft.data.records import Record
from mtpeft.data.seeding import derive_seed
from mtpeft.generation import generate_rows
from mtpeft.losses import model_token_losses, per_task_mean, token_losses
from mtpeft.metrics.tracker import SCORES_FILE, EvalMetrics, check_metric_names, write_example_scores


def build_scheduler(
    factory: Callable[..., torch.optim.lr_scheduler.LRScheduler],
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_ratio: float,
) -> torch.optim.lr_scheduler.LRScheduler:
    """The run's per-step LR schedule: ``factory`` (conf/train.yaml ``scheduler``, a ``_partial_`` of a
    transformers schedule) completed with the warm-up (``int(warmup_ratio * total_steps)``) and total steps."""
    if not 0 <= warmup_ratio < 1:
        raise ValueError(
            f"warmup_ratio={warmup_ratio} must be in [0, 1): set warmup_ratio in conf/train.yaml"
        )
    return factory(
        optimizer, num_warmup_steps=int(warmup_ratio * total_steps), num_training_steps=total_steps
    )


def _reduce_losses(
    loss: torch.Tensor, mask: torch.Tensor, task_ids: torch.Tensor, num_tasks: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token-mean loss, per-task mean loss, per-task token counts) of per-token losses ``[B, S]``."""
    task_loss, task_tokens = per_task_mean(loss, mask, task_ids, num_tasks)
    return loss.sum() / mask.sum().clamp_min(1), task_loss, task_tokens


def chunked_losses(
    model: AdaptedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    task_ids: torch.Tensor,
    labels: torch.Tensor,
    num_tasks: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token-mean loss, per-task mean loss, per-task token counts) without full-vocabulary logits: the
    output head runs only on labelled positions, in checkpointed chunks (`model_token_losses`).

    The eager training loss (`MultiTaskModule`, the bare loop and the per-method step of `mtpeft.bench`);
    equal to `forward_losses` up to float rounding."""
    loss, mask = model_token_losses(
        lambda: model(input_ids=input_ids, attention_mask=attention_mask, task_ids=task_ids),
        model.base_model.get_output_embeddings(),
        labels,
        head_scope=lambda: model.task_scope(model.check_task_ids(task_ids, task_ids.shape[0])),
    )
    return _reduce_losses(loss, mask, task_ids, num_tasks)


def forward_losses(
    model: AdaptedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    task_ids: torch.Tensor,
    labels: torch.Tensor,
    num_tasks: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token-mean loss, per-task mean loss, per-task token counts) from the model's full logits.

    What ``compile: true`` compiles: forward, cross-entropy and the per-task reduction in one graph (the
    chunked head of `model_token_losses` swaps the head per call, which a compiled graph cannot follow).
    """
    out = model(input_ids=input_ids, attention_mask=attention_mask, task_ids=task_ids)
    loss, mask = token_losses(out.logits, labels)
    return _reduce_losses(loss, mask, task_ids, num_tasks)


def compile_training_step(model: AdaptedModel, **options: Any) -> Callable[..., Any]:
    """`forward_losses` of ``model`` under ``torch.compile`` (task-id hooks made static for tracing)."""
    model.use_static_task_hooks()
    return torch.compile(functools.partial(forward_losses, model), **options)


class MultiTaskModule(L.LightningModule):
    """Trains and evaluates any `AdaptedModel` on a `MultiTaskDataModule`."""

    strict_loading = False  # checkpoints store adapter weights only

    def __init__(
        self,
        model: AdaptedModel,
        tokenizer: Any,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler],
        *,
        warmup_ratio: float,
        weight_decay: float | None,
        max_new_tokens: int | None,
        num_samples: int,
        temperature: float,
        top_p: float,
        gradient_checkpointing: bool = False,
        compile_step: bool = False,
        sampling_seed: int = 0,
    ) -> None:
        """``optimizer``/``scheduler``: partials completed in `configure_optimizers`; the keyword arguments
        come from conf/train.yaml (``warmup_ratio``, ``optimizer.weight_decay``, ``evaluation.*``), which
        alone states their defaults. They are saved as ``hparams`` (checkpoints, loggers)."""
        super().__init__()
        self.save_hyperparameters(ignore=["model", "tokenizer", "optimizer", "scheduler"])
        self.model = model
        self.tokenizer = tokenizer
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.warmup_ratio = warmup_ratio
        self.weight_decay = weight_decay
        self.max_new_tokens = max_new_tokens
        if num_samples < 1:
            raise ValueError(f"evaluation.num_samples must be >= 1, got {num_samples}")
        self.num_samples = num_samples
        self.sampling_seed = sampling_seed
        """Seeds each eval batch's sampling (``num_samples`` > 1) with its split and first record, so that
        `mtpeft.eval` draws the samples the run drew (same eval batches) whatever the RNG state before."""
        self.temperature = temperature
        self.top_p = top_p
        if gradient_checkpointing:
            model.gradient_checkpointing_enable()
        # compile: true -- the training forward + loss under torch.compile (evaluation stays eager)
        self._compiled_step = compile_training_step(model) if compile_step else None
        self.best_val: dict[str, float] = {}
        self.last_metrics: dict[str, dict[str, float]] = {}
        self._train_tokens: torch.Tensor | int = 0  # a device tensor once training runs
        self.train_seconds = 0.0
        self.eval_seconds = 0.0  # evaluation batches (loss + generation), val and test
        self.eval_prompts = 0
        self._eval_start = 0.0
        self._eval = EvalMetrics("val", {})  # replaced when an eval epoch starts
        self._eval_records: list[Record] = []
        self._eval_split = "val"
        self.example_rows: dict[str, list[dict[str, Any]]] = {}  # per-example scores: best val, last test
        self._last_rows: list[dict[str, Any]] = []
        self._step_start = 0.0

    # -- helpers --------------------------------------------------------------------------------
    @property
    def task_names(self) -> list[str]:
        return self.trainer.datamodule.task_names

    def _lm_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(token-mean loss, per-task mean loss, per-task token counts): `chunked_losses` of the batch."""
        inputs = (batch["input_ids"], batch["attention_mask"], batch["task_ids"], batch["labels"])
        return chunked_losses(self.model, *inputs, len(self.task_names))

    # -- training -------------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        sampler = getattr(self.trainer.datamodule, "sampler", None)
        if sampler is not None:
            for task, count in sampler.realised_counts().items():
                self.log(f"data/{task}/samples", float(count), on_step=False, on_epoch=True)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_start = time.perf_counter()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, task_loss, task_tokens = self._train_losses(batch)
        aux = self.model.aux_losses()
        total = loss
        for value in aux.values():
            total = total + value
        self._train_tokens = self._train_tokens + batch["attention_mask"].sum()  # stays on device: no sync
        if self._logs_this_step():
            self._log_train(batch["input_ids"].shape[0], loss, aux, task_loss, task_tokens)
        return total

    def _train_losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """`_lm_loss`, or with ``compile: true`` the compiled `forward_losses` (same values up to rounding)."""
        if self._compiled_step is None:
            return self._lm_loss(batch)
        task_ids = batch["task_ids"]
        task_ids = self.model.check_task_ids(task_ids, task_ids.shape[0])  # range checked eagerly
        inputs = (batch["input_ids"], batch["attention_mask"], task_ids, batch["labels"])
        return self._compiled_step(*inputs, len(self.task_names))

    def _logs_this_step(self) -> bool:
        """True on the steps whose logged values reach the loggers (every ``log_every_n_steps``).

        Lightning keeps only the last on-step value of a key, so logging on the other steps costs time
        (and, for the per-task losses, a device sync) without changing what is written. The same test as
        Lightning's own `LearningRateMonitor`; if that internal ever goes away, every step logs.
        """
        connector = getattr(self.trainer, "_logger_connector", None)
        return bool(getattr(connector, "should_update_logs", True))

    def _log_train(
        self,
        batch_size: int,
        loss: torch.Tensor,
        aux: dict[str, torch.Tensor],
        task_loss: torch.Tensor,
        task_tokens: torch.Tensor,
    ) -> None:
        """``train/loss``, ``train/aux/<name>``, ``train/<task>/loss`` (tasks in the batch), ``routing/*``."""
        for name, value in aux.items():
            self.log(f"train/aux/{name}", value, batch_size=batch_size)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        present = task_tokens.gt(0).tolist()  # one sync, on logging steps only
        for task_id, task in enumerate(self.task_names):
            if present[task_id]:
                self.log(f"train/{task}/loss", task_loss[task_id], batch_size=batch_size)
        for key, value in self.model.routing_stats().items():
            self.log(f"routing/{key}", value, batch_size=batch_size)

    @property
    def train_tokens(self) -> int:
        """Non-padding tokens trained on so far (read at the end of a run)."""
        return int(self._train_tokens)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.train_seconds += time.perf_counter() - self._step_start

    def on_validation_batch_start(self, batch: Any, *args: Any, **kwargs: Any) -> None:
        self._eval_start = time.perf_counter()

    def on_test_batch_start(self, batch: Any, *args: Any, **kwargs: Any) -> None:
        self._eval_start = time.perf_counter()

    def on_validation_batch_end(self, outputs: Any, batch: Any, *args: Any, **kwargs: Any) -> None:
        self._count_eval(batch)

    def on_test_batch_end(self, outputs: Any, batch: Any, *args: Any, **kwargs: Any) -> None:
        self._count_eval(batch)

    def _count_eval(self, batch: dict[str, torch.Tensor]) -> None:
        """Evaluation time and prompts (``eval_s_per_1000_prompts`` in results.json)."""
        self.eval_seconds += time.perf_counter() - self._eval_start
        self.eval_prompts += batch["input_ids"].shape[0]

    def configure_optimizers(self) -> dict[str, Any]:
        weight_decay = self.weight_decay
        groups = self.model.parameter_groups(0.0 if weight_decay is None else weight_decay)
        optimizer = self.optimizer_factory(groups)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = build_scheduler(self.scheduler_factory, optimizer, total, self.warmup_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- evaluation -----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Check every task's metric names (and pass@k against ``num_samples``) before training starts."""
        datamodule = self.trainer.datamodule
        check_metric_names({task: datamodule.metrics_for(task) for task in self.task_names}, self.num_samples)

    def on_validation_epoch_start(self) -> None:
        self._reset_eval("val")

    def on_test_epoch_start(self) -> None:
        self._reset_eval("test")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        metrics = self._finish_eval("val")
        score = metrics["val/avg/score"]
        if score > self.best_val.get("val/avg/score", -math.inf):
            self.best_val = dict(metrics)
            self.example_rows["val"] = self._last_rows
        self.log("val/avg/score_best", self.best_val["val/avg/score"])

    def on_test_epoch_end(self) -> None:
        self._finish_eval("test")

    def _reset_eval(self, split: str) -> None:
        """Fresh metric objects for every task of ``split`` (unknown metric names fail here, early)."""
        datamodule = self.trainer.datamodule
        names = {task: datamodule.metrics_for(task) for task in self.task_names}
        self._eval = EvalMetrics(split, names, self.num_samples, self.device)
        self._eval_split = split
        self._eval_records = datamodule.records(split)

    def _eval_step(self, batch: dict[str, torch.Tensor]) -> None:
        _, task_loss, task_tokens = self._lm_loss(batch)
        for task_id, task in enumerate(self.task_names):
            if task_tokens[task_id] > 0:
                self._eval.update_loss(task, task_loss[task_id], task_tokens[task_id])
        texts = self._generate(batch)
        n = self.num_samples
        by_task: dict[str, tuple[list[list[str]], list[Record], list[int]]] = defaultdict(
            lambda: ([], [], [])
        )
        for row, index in enumerate(batch["index"].tolist()):
            record = self._eval_records[index]
            samples, records, indices = by_task[record["task"]]
            samples.append(texts[row * n : (row + 1) * n])
            records.append(record)
            indices.append(index)
        for task, (samples, records, indices) in by_task.items():
            self._eval.update(task, samples, records, indices)

    def _generate(self, batch: dict[str, torch.Tensor]) -> list[str]:
        """Completions of the batch's prompts: ``num_samples`` per prompt, consecutive (greedy for 1).

        Every row stops at its own task's budget and at EOS (`mtpeft.generation.generate_rows`), so a
        prediction does not depend on which tasks share its batch."""
        n = self.num_samples  # rows repeated here (not num_return_sequences) so task ids expand with them
        prompt, mask, task_ids = (batch[k] for k in ("prompt_ids", "prompt_attention_mask", "task_ids"))
        if n > 1:
            prompt, mask, task_ids = (t.repeat_interleave(n, dim=0) for t in (prompt, mask, task_ids))
        cuda = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda, enabled=n > 1):  # sampling leaves training's RNG alone
            if n > 1:
                first = int(batch["index"][0]) if "index" in batch else 0
                torch.manual_seed(derive_seed(self.sampling_seed, self._eval_split, first))
            rows = generate_rows(
                self.model,
                prompt,
                mask,
                task_ids,
                self._budgets(task_ids),
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
                **self._decoding(),
            )
        return self.tokenizer.batch_decode(rows, skip_special_tokens=True)

    def _budgets(self, task_ids: torch.Tensor) -> list[int]:
        """Each row's generation budget: ``evaluation.max_new_tokens`` if set, else its task's own."""
        if self.max_new_tokens:
            return [self.max_new_tokens] * task_ids.shape[0]
        datamodule, names = self.trainer.datamodule, self.task_names
        per_task = {t: datamodule.max_new_tokens_for(names[t]) for t in set(task_ids.tolist())}
        return [per_task[t] for t in task_ids.tolist()]

    def _decoding(self) -> dict[str, Any]:
        """Greedy decoding (``num_samples=1``), else ``num_samples`` sampled completions per prompt."""
        if self.num_samples == 1:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}

    def _finish_eval(self, split: str) -> dict[str, float]:
        """Compute (synced across processes) and log every metric of ``split``; kept in ``last_metrics``."""
        metrics = self._eval.compute()
        for key, value in metrics.items():
            self.log(key, value, prog_bar=key.endswith("avg/score"))
        self.last_metrics[split] = metrics
        self._last_rows = self._eval.example_rows()  # every process's rows (a collective under DDP)
        if split == "test":
            self.example_rows["test"] = self._last_rows
        return metrics

    def write_example_scores(self, output_dir: Path) -> Path:
        """Write ``<output_dir>/scores.jsonl.gz``: the per-example rows of the best validation epoch and of
        the test epoch (`mtpeft.metrics.tracker`), read by the bootstrap statistics of `mtpeft.results`.
        Under DDP every rank holds every row (gathered at epoch end); only global rank 0 writes."""
        path = Path(output_dir) / SCORES_FILE
        trainer = self._trainer
        if trainer is None or trainer.is_global_zero:
            rows = [*self.example_rows.get("val", []), *self.example_rows.get("test", [])]
            write_example_scores(path, rows)
        return path

    # -- checkpoints ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = {f"model.{name}" for name in self.model.adapter_state_dict()}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
