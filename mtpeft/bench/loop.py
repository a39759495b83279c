"""Loop benchmark: one composed run config trained N steps by three loops over the same batches.

* ``mtpeft``: ``trainer.fit`` of the run's `MultiTaskModule` and datamodule, with the run's trainer, callbacks
  and loggers (as ``mtpeft.run`` builds them), validation and checkpointing off;
* ``bare``: a plain PyTorch loop over the same dataloader doing what a training step must: forward, token-mean
  cross-entropy (`mtpeft.module.chunked_losses`, as training computes it) plus the method's aux losses, backward, gradient-norm clipping, AdamW and scheduler step;
* ``trainer+peft``: ``transformers.Trainer`` on the plain peft model with the same hyper-parameters, for a
  method with a peft equivalent (LoRA: what a user would pick instead of mtpeft for that method).

Each loop's step time is the mean over the steps after ``skip`` warm-up steps (end of step to end of step,
so data loading, logging and progress bars count); rounds interleave the loops so that a drifting shared
machine hits all alike, and the median over rounds is reported. Tokens are the non-padding tokens of the
batches (the same batches for every loop).
"""

from __future__ import annotations

import logging
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from mtpeft.bench.config import RunParts
from mtpeft.module import build_scheduler, chunked_losses
from mtpeft.run import build_callbacks, build_loggers, build_module

log = logging.getLogger(__name__)

#: Overrides the loop benchmark adds to the run config: N steps, no validation, no checkpoints.
LOOP_OVERRIDES = (
    "+trainer.limit_val_batches=0",
    "+trainer.enable_checkpointing=false",
    "~callbacks.model_checkpoint",
    "test=false",
)
MODEL_KEYS = ("input_ids", "attention_mask", "labels")


@dataclass
class StepClock:
    """Wall and CPU (this process) time at the end of every optimiser step of one loop."""

    ends: list[float] = field(default_factory=list)
    cpu_ends: list[float] = field(default_factory=list)

    def tick(self) -> None:
        self.ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())

    def ms_per_step(self, skip: int, cpu: bool = False) -> float:
        """Mean step time after the first ``skip`` steps (end to end), wall or CPU."""
        ends = self.cpu_ends if cpu else self.ends
        if len(ends) < skip + 2:
            raise ValueError(f"need more than {skip + 1} steps to time, got {len(ends)}")
        return 1000 * (ends[-1] - ends[skip]) / (len(ends) - 1 - skip)


class _ClockCallback(L.Callback):
    def __init__(self, clock: StepClock) -> None:
        self.clock = clock

    def on_train_batch_end(self, *args: Any) -> None:
        self.clock.tick()


def lightning_loop(parts: RunParts, steps: int, workdir: Path) -> StepClock:
    """``trainer.fit`` of the run's module for ``steps`` steps, as ``mtpeft.run`` sets it up."""
    cfg = parts.cfg
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = build_module(cfg, parts.fresh_method(), parts.tokenizer)
    loggers = build_loggers(cfg)
    clock = StepClock()
    callbacks = [*build_callbacks(cfg, bool(loggers)), _ClockCallback(clock)]
    trainer = instantiate(
        cfg.trainer, logger=loggers or False, callbacks=callbacks, max_steps=steps, default_root_dir=workdir
    )
    module.train()
    try:
        trainer.fit(module, datamodule=parts.fresh_datamodule())
    finally:
        for logger in loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "finish"):
                experiment.finish()
    return clock


def _batches(parts: RunParts, steps: int) -> Iterator[dict[str, torch.Tensor]]:
    loader = parts.fresh_datamodule().train_dataloader()
    while True:  # several epochs if the run is longer than one
        for batch in loader:
            yield batch
            steps -= 1
            if steps == 0:
                return


def bare_loop(parts: RunParts, steps: int, workdir: Path) -> StepClock:
    """The floor: a plain PyTorch loop doing the same step as the Lightning module, nothing else."""
    cfg = parts.cfg
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    device = torch.device("cuda" if cfg.trainer.get("accelerator") == "gpu" else "cpu")
    model = parts.fresh_method().to(device)
    weight_decay = cfg.optimizer.get("weight_decay")
    optimizer = instantiate(cfg.optimizer)(
        model.parameter_groups(0.0 if weight_decay is None else weight_decay)
    )
    scheduler = build_scheduler(instantiate(cfg.scheduler), optimizer, steps, cfg.warmup_ratio)
    params = [p for p in model.parameters() if p.requires_grad]
    clip = cfg.trainer.get("gradient_clip_val")
    clock = StepClock()
    for batch in _batches(parts, steps):
        batch = {k: v.to(device) for k, v in batch.items() if k in (*MODEL_KEYS, "task_ids")}
        inputs = (batch["input_ids"], batch["attention_mask"], batch["task_ids"], batch["labels"])
        loss = chunked_losses(model, *inputs, parts.num_tasks)[0]
        for value in model.aux_losses().values():
            loss = loss + value
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        clock.tick()
    return clock


def trainer_peft_loop(parts: RunParts, steps: int, workdir: Path) -> StepClock | None:
    """``transformers.Trainer`` + plain peft with the run's hyper-parameters; None unless the run's method has
    a peft equivalent (`AdaptedModel.peft_equivalent`, e.g. LoRA's ``LoraConfig``)."""
    cfg = parts.cfg
    peft_config = parts.fresh_method().peft_equivalent()
    if peft_config is None:
        return None
    import copy

    from peft import get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    clock = StepClock()

    class Clock(TrainerCallback):
        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            clock.tick()

    torch.manual_seed(cfg.seed)
    model = get_peft_model(copy.deepcopy(parts.base_model), peft_config)
    model.train()
    betas = tuple(cfg.optimizer.get("betas", (0.9, 0.999)))
    args = TrainingArguments(
        output_dir=str(workdir / "hf_trainer"),
        max_steps=steps,
        per_device_train_batch_size=cfg.data.batch_size,
        learning_rate=cfg.optimizer.lr,
        weight_decay=cfg.optimizer.get("weight_decay") or 0.0,
        adam_beta1=betas[0],
        adam_beta2=betas[1],
        max_grad_norm=cfg.trainer.get("gradient_clip_val") or 0.0,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": cfg.scheduler.min_lr_rate},  # the default scheduler's
        warmup_steps=int(cfg.warmup_ratio * steps),
        logging_steps=cfg.trainer.get("log_every_n_steps", 50),
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        seed=cfg.seed,
        use_cpu=cfg.trainer.get("accelerator") != "gpu",
        dataloader_num_workers=0,
        activation_checkpointing=bool(cfg.get("gradient_checkpointing")),
        activation_checkpointing_kwargs={"use_reentrant": False},
    )

    class LoopTrainer(Trainer):
        def get_train_dataloader(self) -> Any:  # the run's batches, model keys only
            return _ModelKeysLoader(parts.fresh_datamodule().train_dataloader())

    LoopTrainer(model=model, args=args, callbacks=[Clock()]).train()
    return clock


class _ModelKeysLoader:
    """A dataloader view yielding only the keys a Hugging Face model takes (no task ids, no prompts)."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.batch_size = loader.batch_size
        self.sampler = loader.sampler
        self.dataset = loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in self.loader:
            yield {k: batch[k] for k in MODEL_KEYS}


LOOPS: dict[str, Callable[[RunParts, int, Path], StepClock | None]] = {
    "mtpeft (Lightning)": lightning_loop,
    "bare PyTorch": bare_loop,
    "transformers.Trainer + peft": trainer_peft_loop,
}


@dataclass
class LoopRow:
    loop: str
    ms_per_step: float
    cpu_ms_per_step: float
    tokens_per_s: float
    rounds: list[float]


def run_loops(parts: RunParts, steps: int, rounds: int, skip: int) -> list[LoopRow]:
    """Interleaved rounds of every loop; median ms/step (wall, CPU) and tokens/s per loop (loops that apply)."""
    batches = parts.train_batches(steps)
    timed_tokens = sum(int(b["attention_mask"].sum()) for b in batches[skip + 1 :])
    wall: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="mtpeft-bench-") as tmp:
        for round_ in range(rounds):
            for name, loop in LOOPS.items():
                clock = loop(parts, steps, Path(tmp) / f"{round_}-{name.split()[0]}")
                if clock is not None:
                    wall.setdefault(name, []).append(clock.ms_per_step(skip))
                    cpu.setdefault(name, []).append(clock.ms_per_step(skip, cpu=True))
                    log.info("round %d %s: %.1f ms/step", round_, name, wall[name][-1])
    per_step_tokens = timed_tokens / max(1, len(batches) - skip - 1)
    rows = []
    for name, values in wall.items():
        ms = statistics.median(values)
        tokens_per_s = per_step_tokens / (ms / 1000) if ms else math.nan
        rows.append(LoopRow(name, ms, statistics.median(cpu[name]), tokens_per_s, values))
    return rows


def loop_markdown(rows: list[LoopRow], steps: int, skip: int) -> list[str]:
    """The loop table: ms/step (wall and CPU), tokens/s, and their ratios to the bare loop."""
    bare = next((r for r in rows if r.loop == "bare PyTorch"), rows[0])
    lines = [
        f"Loop benchmark: {steps} steps per loop and round, mean step time after {skip} warm-up steps, "
        f"median of {len(bare.rounds)} interleaved rounds (CPU: this process's CPU time per step).",
        "",
        "| loop | ms/step | x bare | CPU ms/step | x bare (CPU) | tokens/s | x bare | rounds (ms/step) |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.loop} | {row.ms_per_step:.1f} | {row.ms_per_step / bare.ms_per_step:.3f} "
            f"| {row.cpu_ms_per_step:.1f} | {row.cpu_ms_per_step / bare.cpu_ms_per_step:.3f} "
            f"| {row.tokens_per_s:,.0f} | {row.tokens_per_s / bare.tokens_per_s:.3f} "
            f"| {', '.join(f'{v:.1f}' for v in row.rounds)} |"
        )
    return lines


def loop_config_overrides(steps: int) -> list[str]:
    return [*LOOP_OVERRIDES, f"trainer.max_steps={steps}"]


def describe(cfg: DictConfig) -> str:
    """One line naming what was trained (method, model, data, batch)."""
    named = (cfg.model.get(key) for key in ("name_or_path", "gguf_file"))
    model = next((str(name) for name in named if name), cfg.model.get("kind", "?"))
    return f"method={cfg.method.name}, model={model}, batch {cfg.data.batch_size}, threads {torch.get_num_threads()}"
