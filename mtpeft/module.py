"""`MultiTaskModule`: the method-agnostic LightningModule.

Training: per-sample LM loss reduced per task (``train/<task>/loss``) and overall (``train/loss``, token
mean), plus the method's auxiliary losses (``train/aux/<name>``), which are added to the objective.
Evaluation (val and test): LM loss per task and greedy generation with the KV cache, scored per task
with the task's metric (``<split>/<task>/<metric>``; ``<split>/<task>/score`` is the same number under a
uniform name) and the macro average ``<split>/avg/score``, which selects checkpoints.
Checkpoints hold only the adapter state, not the frozen base model.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import lightning as L
import torch

from mtpeft.losses import per_task_mean, token_losses
from mtpeft.methods.base import AdaptedModel
from mtpeft.metrics import get_metric


class MultiTaskModule(L.LightningModule):
    """Trains and evaluates any `AdaptedModel` on a `MultiTaskDataModule`."""

    strict_loading = False  # checkpoints store adapter weights only

    def __init__(
        self,
        model: AdaptedModel,
        tokenizer: Any,
        optimizer: Callable[..., torch.optim.Optimizer],
        warmup_ratio: float = 0.05,
        min_lr_ratio: float = 0.1,
        weight_decay: float | None = None,
        max_new_tokens: int | None = None,
        gradient_checkpointing: bool = False,
        num_samples: int = 1,
        temperature: float = 0.8,
        top_p: float = 0.95,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.optimizer_factory = optimizer
        self.warmup_ratio = warmup_ratio
        self.min_lr_ratio = min_lr_ratio
        self.weight_decay = weight_decay
        self.max_new_tokens = max_new_tokens
        if num_samples < 1:
            raise ValueError(f"evaluation.num_samples must be >= 1, got {num_samples}")
        self.num_samples = num_samples
        self.temperature = temperature
        self.top_p = top_p
        if gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.best_val: dict[str, float] = {}
        self.last_metrics: dict[str, dict[str, float]] = {}
        self.train_tokens = 0
        self.train_seconds = 0.0
        self._eval_state: dict[str, Any] = {}
        self._step_start = 0.0

    # -- helpers --------------------------------------------------------------------------------
    @property
    def task_names(self) -> list[str]:
        return self.trainer.datamodule.task_names

    def _lm_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], task_ids=batch["task_ids"]
        )
        loss, mask = token_losses(out.logits, batch["labels"])
        task_loss, task_tokens = per_task_mean(loss, mask, batch["task_ids"], len(self.task_names))
        return loss.sum() / mask.sum().clamp_min(1), task_loss, task_tokens

    # -- training -------------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        sampler = getattr(self.trainer.datamodule, "sampler", None)
        if sampler is not None:
            for task, count in sampler.realised_counts().items():
                self.log(f"data/{task}/samples", float(count), on_step=False, on_epoch=True)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_start = time.perf_counter()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, task_loss, task_tokens = self._lm_loss(batch)
        total = loss
        batch_size = batch["input_ids"].shape[0]
        for name, value in self.model.aux_losses().items():
            total = total + value
            self.log(f"train/aux/{name}", value, batch_size=batch_size)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        for task_id, task in enumerate(self.task_names):
            if task_tokens[task_id] > 0:
                self.log(f"train/{task}/loss", task_loss[task_id], batch_size=batch_size)
        if self.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            for key, value in self.model.routing_stats().items():
                self.log(f"routing/{key}", value, batch_size=batch_size)
        self.train_tokens += int(batch["attention_mask"].sum())
        return total

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.train_seconds += time.perf_counter() - self._step_start

    def configure_optimizers(self) -> dict[str, Any]:
        weight_decay = self.weight_decay
        groups = self.model.parameter_groups(0.0 if weight_decay is None else weight_decay)
        optimizer = self.optimizer_factory(groups)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(self.warmup_ratio * total)
        floor = self.min_lr_ratio

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- evaluation -----------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._reset_eval()

    def on_test_epoch_start(self) -> None:
        self._reset_eval()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        metrics = self._finish_eval("val")
        score = metrics["val/avg/score"]
        if score > self.best_val.get("val/avg/score", -math.inf):
            self.best_val = dict(metrics)
        self.log("val/avg/score_best", self.best_val["val/avg/score"])

    def on_test_epoch_end(self) -> None:
        self._finish_eval("test")

    def _reset_eval(self) -> None:
        self._eval_state = {"loss": defaultdict(float), "tokens": defaultdict(float), "predictions": {}}

    def _eval_step(self, batch: dict[str, torch.Tensor]) -> None:
        _, task_loss, task_tokens = self._lm_loss(batch)
        state = self._eval_state
        for task_id in range(len(self.task_names)):
            if task_tokens[task_id] > 0:
                state["loss"][task_id] += float(task_loss[task_id] * task_tokens[task_id])
                state["tokens"][task_id] += float(task_tokens[task_id])
        texts = self._generate(batch)
        n = self.num_samples
        for row, index in enumerate(batch["index"].tolist()):
            state["predictions"][index] = texts[row * n : (row + 1) * n]

    def _generate(self, batch: dict[str, torch.Tensor]) -> list[str]:
        datamodule = self.trainer.datamodule
        tasks = {self.task_names[t] for t in batch["task_ids"].tolist()}
        max_new = self.max_new_tokens or max(datamodule.max_new_tokens_for(t) for t in tasks)
        n = self.num_samples  # rows repeated here (not num_return_sequences) so task ids expand with them
        prompt = batch["prompt_ids"].repeat_interleave(n, dim=0)
        generated = self.model.generate(
            input_ids=prompt,
            attention_mask=batch["prompt_attention_mask"].repeat_interleave(n, dim=0),
            task_ids=batch["task_ids"].repeat_interleave(n, dim=0),
            max_new_tokens=max_new,
            **self._decoding(),
            use_cache=True,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        return self.tokenizer.batch_decode(generated[:, prompt.shape[1] :], skip_special_tokens=True)

    def _decoding(self) -> dict[str, Any]:
        """Greedy decoding (``num_samples=1``), else ``num_samples`` sampled completions per prompt."""
        if self.num_samples == 1:
            return {"do_sample": False}
        return {
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
        }

    def _gather_eval_state(self) -> dict[str, Any]:
        """Every rank's predictions and per-task losses merged (DDP), so each metric sees the whole split."""
        state = self._eval_state
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return state
        world = torch.distributed.get_world_size()
        parts: list[Any] = [None] * world
        torch.distributed.all_gather_object(parts, state)
        merged: dict[str, Any] = {"loss": defaultdict(float), "tokens": defaultdict(float), "predictions": {}}
        for part in parts:
            merged["predictions"].update(part["predictions"])
            for key in ("loss", "tokens"):
                for task_id, value in part[key].items():
                    merged[key][task_id] += value
        return merged

    def _finish_eval(self, split: str) -> dict[str, float]:
        datamodule = self.trainer.datamodule
        records = datamodule.records(split)
        state = self._gather_eval_state()
        metrics: dict[str, float] = {}
        scores = []
        for task_id, task in enumerate(self.task_names):
            indices = [i for i, r in enumerate(records) if r["task"] == task and i in state["predictions"]]
            if not indices:
                continue
            samples = [state["predictions"][i] for i in indices]
            task_records = [records[i] for i in indices]
            for metric_name in datamodule.metrics_for(task):
                metric = get_metric(metric_name)
                predictions = samples if metric.uses_samples else [s[0] for s in samples]
                metrics[f"{split}/{task}/{metric_name}"] = metric.compute(predictions, task_records)
            score = metrics[f"{split}/{task}/{datamodule.metrics_for(task)[0]}"]
            metrics[f"{split}/{task}/score"] = score
            if state["tokens"][task_id]:
                metrics[f"{split}/{task}/loss"] = state["loss"][task_id] / state["tokens"][task_id]
            scores.append(score)
        metrics[f"{split}/avg/score"] = sum(scores) / len(scores) if scores else 0.0
        for key, value in metrics.items():
            self.log(key, value, prog_bar=key.endswith("avg/score"))
        self.last_metrics[split] = metrics
        return metrics

    # -- checkpoints ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = {f"model.{name}" for name in self.model.adapter_state_dict()}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
