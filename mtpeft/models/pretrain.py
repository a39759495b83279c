"""Plain-PyTorch causal-LM pre-training of the tiny model on the primitives corpus.

PEFT methods need a base that already "speaks" the task surface (facts, equations, Python lines, narrative),
and copy/induction behaviour from repeated facts (docs/data.md section 4.1). This loop is deliberately bare
(no Lightning): it runs once per cache key, and its cost is what the default budget is sized on.

Data: every corpus line becomes ``<s> line </s>``; lines are concatenated into one token stream; each step
draws ``batch_size`` random windows of ``seq_len`` tokens that start at a line's ``<s>`` (so the first line
of a window is whole, and position 0 is ``<s>`` as in fine-tuning), from a seeded generator (reproducible).
The last ``eval_fraction`` of the lines is held out to report the loss before and after training.

Resumable: with a ``checkpoint_dir`` the loop saves model, optimiser, scheduler, both RNG states, the step
and the losses so far every ``checkpoint_every`` steps (atomically), and a later call with the same
directory and config continues from there. The result is bit-identical to an uninterrupted run: nothing
else carries state between steps. The cache keeps that directory across interrupted builds
(``mtpeft.models.cache.resume_dir``).
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from transformers import PreTrainedModel, PreTrainedTokenizerFast, get_cosine_with_min_lr_schedule_with_warmup

from mtpeft.utils.schema import Float, Int, NonNegativeInt, PositiveFloat, PositiveInt, config_dataclass

log = logging.getLogger(__name__)

#: Fewest held-out lines (so that tiny test corpora still give a full evaluation window).
_MIN_EVAL_LINES = 8
#: File of the resumable state inside ``checkpoint_dir``.
CHECKPOINT_FILE = "pretrain-state.pt"
#: Steps between two saves of the resumable state (~12 s of the default build, ~11 MB per save).
CHECKPOINT_EVERY = 200
#: The pre-training LR schedule (part of the base model's cache key: another schedule is another base).
LR_SCHEDULE = "transformers.get_cosine_with_min_lr_schedule_with_warmup"


@config_dataclass(frozen=True)
class PretrainConfig:
    """Pre-training budget and optimiser (defaults: ours, sized to finish in ~3 min on 2 free CPU cores)."""

    steps: NonNegativeInt = 3000
    """Optimiser steps; 0 keeps the random initialisation. Copying (induction) appears after ~2000-2500."""
    batch_size: PositiveInt = 16
    """Windows per step (16 x 64 = 1024 tokens); induction forms after a number of *steps*, so small batches
    reach it sooner in wall time."""
    seq_len: PositiveInt = 64
    """Window length in tokens; a corpus line is <= 62 tokens and the offline tasks need <= 64."""
    lr: PositiveFloat = 3e-3
    """Peak AdamW learning rate; tiny models tolerate (and need, at this budget) a high rate."""
    warmup: NonNegativeInt = 50
    """Linear warm-up steps before the cosine decay."""
    seed: Int = 0
    """Seed of window sampling (and of the corpus, via the loader)."""
    corpus_lines: NonNegativeInt = 20000
    """Lines of ``primitives_corpus`` (~0.55 M tokens); the default run sees each line about 3 times."""
    repeat_prob: Float = 0.5
    """Share of windows whose first line is shown twice (``<s> L </s> <s> L </s> ...``). Copying pays off
    there, which makes induction (copy of repeated facts) appear within the budget; with 0 it had not
    appeared after 1000 steps of 32 windows."""
    weight_decay: Float = 0.01
    """AdamW decoupled weight decay on matrices (not norms or biases)."""
    grad_clip: Float = 1.0
    """Max global gradient norm."""
    min_lr_ratio: Float = 0.1
    """Final learning rate as a fraction of ``lr`` (cosine floor)."""
    eval_fraction: Float = 0.02
    """Share of the corpus lines held out for the start/end loss."""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for hashing and metadata)."""
        return asdict(self)


@dataclass(frozen=True)
class PretrainResult:
    """What a pre-training run reports (stored in the cache manifest)."""

    final_loss: float
    """Mean training loss over the last 10% of steps."""
    first_loss: float
    """Training loss of the first step."""
    eval_loss_start: float
    """Held-out loss before training."""
    eval_loss_end: float
    """Held-out loss after training."""
    copy_loss_start: float
    """Held-out loss on the second copy of a doubled line before training (see ``eval_copy_loss``)."""
    copy_loss_end: float
    """The same after training: near 0 means the model copies (induction)."""
    wall_s: float
    """Wall time of the optimisation loop."""
    tokens: int
    """Training tokens processed (steps x batch_size x seq_len)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for metadata)."""
        return asdict(self)


@dataclass(frozen=True)
class Windows:
    """Fixed-length windows of a token stream that begin at a line start (``<s>``), as fine-tuning inputs do."""

    stream: torch.Tensor
    """The packed token stream."""
    starts: torch.Tensor
    """Line starts that leave room for a full window."""
    ends: torch.Tensor
    """End (exclusive) of the line beginning at each start."""
    seq_len: int

    def window(self, i: int, repeat: bool = False) -> torch.Tensor:
        """Window ``i``; with ``repeat`` its first line is shown twice (``<s> L </s> <s> L </s> ...``)."""
        start = int(self.starts[i])
        window = self.stream[start : start + self.seq_len]
        if not repeat:
            return window
        return torch.cat([self.stream[start : int(self.ends[i])], window])[: self.seq_len]

    def batch(self, idx: torch.Tensor, repeat: torch.Tensor | None = None) -> torch.Tensor:
        """Stack windows ``idx`` (``repeat``: bool mask of windows whose first line is doubled)."""
        flags = repeat.tolist() if repeat is not None else [False] * len(idx)
        return torch.stack([self.window(i, r) for i, r in zip(idx.tolist(), flags, strict=True)])

    def sample(self, batch_size: int, gen: torch.Generator, repeat_prob: float = 0.0) -> torch.Tensor:
        """A batch of random windows (with replacement); a ``repeat_prob`` share has its first line doubled."""
        idx = torch.randint(0, len(self.starts), (batch_size,), generator=gen)
        return self.batch(idx, torch.rand(batch_size, generator=gen) < repeat_prob)


def pack_lines(tokenizer: PreTrainedTokenizerFast, lines: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token stream ``<s> line </s> <s> line </s> ...`` (1-D LongTensor) and the offset of each ``<s>``."""
    ids = tokenizer(lines, add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    lengths = [len(x) + 2 for x in ids]
    offsets = torch.tensor([0, *itertools.accumulate(lengths)][:-1], dtype=torch.long)
    stream = torch.tensor([t for line in ids for t in (bos, *line, eos)], dtype=torch.long)
    return stream, offsets


def make_windows(lines: list[str], tokenizer: PreTrainedTokenizerFast, seq_len: int) -> Windows:
    """Pack ``lines`` and keep the line starts that leave room for a full window."""
    stream, offsets = pack_lines(tokenizer, lines)
    ends = torch.cat([offsets[1:], torch.tensor([len(stream)])])
    room = offsets + seq_len <= len(stream)
    if not room.any():
        raise ValueError(
            f"{len(lines)} corpus lines ({len(stream)} tokens) are too few for seq_len={seq_len}: "
            "raise pretrain.corpus_lines."
        )
    return Windows(stream, offsets[room], ends[room], seq_len)


def _split_lines(lines: list[str], cfg: PretrainConfig) -> tuple[list[str], list[str]]:
    """Hold out the last ``eval_fraction`` of the lines (at least ``_MIN_EVAL_LINES``, at most half)."""
    if len(lines) < 2 * _MIN_EVAL_LINES:
        raise ValueError(
            f"pre-training needs at least {2 * _MIN_EVAL_LINES} corpus lines, got {len(lines)}: "
            "raise pretrain.corpus_lines."
        )
    n_eval = min(max(_MIN_EVAL_LINES, int(len(lines) * cfg.eval_fraction)), len(lines) // 2)
    return lines[:-n_eval], lines[-n_eval:]


def _scheduler(opt: torch.optim.Optimizer, cfg: PretrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 over ``warmup`` steps, then cosine decay to ``min_lr_ratio`` at ``steps``: the
    fine-tuning runs' default schedule (transformers' ``get_cosine_with_min_lr_schedule_with_warmup``)."""
    return get_cosine_with_min_lr_schedule_with_warmup(
        opt, num_warmup_steps=cfg.warmup, num_training_steps=max(1, cfg.steps), min_lr_rate=cfg.min_lr_ratio
    )


def _optimizer(model: PreTrainedModel, cfg: PretrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


@torch.no_grad()
def eval_loss(model: PreTrainedModel, windows: Windows, batch_size: int, max_batches: int = 8) -> float:
    """Mean LM loss over up to ``max_batches`` evenly spread windows (deterministic)."""
    was_training = model.training
    model.eval()
    idx = _spread(len(windows.starts), max_batches * batch_size)
    losses = [
        model(input_ids=b, labels=b).loss.item() for b in (windows.batch(i) for i in idx.split(batch_size))
    ]
    model.train(was_training)
    return sum(losses) / len(losses)


@torch.no_grad()
def eval_copy_loss(model: PreTrainedModel, windows: Windows, batch_size: int, max_batches: int = 4) -> float:
    """Loss on the second copy of a doubled line (``<s> L </s> <s> L </s>``): ~0 once the model can copy.

    A direct measure of induction: the second copy is fully predictable from the first.
    """
    was_training = model.training
    model.eval()
    idx = _spread(len(windows.starts), max_batches * batch_size)
    total, count = 0.0, 0
    for chunk in idx.split(batch_size):
        inputs = windows.batch(chunk, torch.ones(len(chunk), dtype=torch.bool))
        labels = torch.full_like(inputs, -100)
        for row, i in enumerate(chunk.tolist()):
            n = int(windows.ends[i] - windows.starts[i])
            labels[row, n + 1 : 2 * n] = inputs[row, n + 1 : 2 * n]
        logits = model(input_ids=inputs).logits[:, :-1]
        total += F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], reduction="sum").item()
        count += int((labels[:, 1:] != -100).sum())
    model.train(was_training)
    return total / count if count else float("nan")


def _spread(n: int, k: int) -> torch.Tensor:
    """Up to ``k`` indices spread evenly over ``range(n)`` (deterministic evaluation sample)."""
    return torch.arange(0, n, max(1, n // k))[:k]


def _log_progress(step: int, steps: int, losses: list[float], t0: float, first: int = 0) -> None:
    """Log every 10% of the run (the Rich bar is invisible in non-terminal logs, e.g. batch jobs).

    ``first``: the step this process started from (a resumed run), for the ETA.
    """
    if step % max(1, steps // 10) == 0 or step == steps:
        elapsed = time.perf_counter() - t0
        recent = losses[-max(1, steps // 10) :]
        eta = elapsed / max(1, step - first) * (steps - step)
        log.info(
            "pre-training step %d/%d loss %.3f (%.0f s, ETA %.0f s)",
            step,
            steps,
            sum(recent) / len(recent),
            elapsed,
            eta,
        )


def _progress(enabled: bool) -> Progress:
    """Rich progress bar with step, loss, elapsed time and ETA."""
    return Progress(
        TextColumn("[bold]pre-training"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        disable=not enabled,
    )


@dataclass
class _Progress:
    """What the loop carries from step to step besides model, optimiser, scheduler and generator."""

    losses: list[float]
    eval_loss_start: float
    copy_loss_start: float
    elapsed_s: float = 0.0


def save_checkpoint(
    path: Path,
    cfg: PretrainConfig,
    model: PreTrainedModel,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    gen: torch.Generator,
    progress: _Progress,
) -> None:
    """Write the resumable state to ``path`` atomically (a crash mid-write keeps the previous one)."""
    state = {
        "config": cfg.to_dict(),
        "step": len(progress.losses),
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "generator": gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "progress": asdict(progress),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(
    path: Path,
    cfg: PretrainConfig,
    model: PreTrainedModel,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    gen: torch.Generator,
) -> _Progress | None:
    """Restore a state saved by ``save_checkpoint`` for the same config; None (start afresh) otherwise."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, weights_only=True)
    except Exception as err:  # noqa: BLE001 - an unreadable checkpoint only costs the steps it held
        log.warning("pre-training checkpoint %s is unreadable (%s); starting from step 0", path, err)
        return None
    if state.get("config") != cfg.to_dict():
        log.warning("pre-training checkpoint %s is from another config; starting from step 0", path)
        return None
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    gen.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    log.info("pre-training resumes at step %d/%d from %s", state["step"], cfg.steps, path)
    return _Progress(**state["progress"])


def pretrain(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    lines: list[str],
    cfg: PretrainConfig,
    progress: bool = True,
    checkpoint_dir: Path | None = None,
    checkpoint_every: int = CHECKPOINT_EVERY,
    on_step: Callable[[int], None] | None = None,
) -> PretrainResult:
    """Pre-train ``model`` in place on ``lines`` for ``cfg.steps`` steps; leaves it in eval mode.

    ``checkpoint_dir``: save the resumable state there every ``checkpoint_every`` steps and resume from it
    (the caller removes the directory when done). ``on_step(step)`` runs after each step (and its save).
    ``torch.set_num_threads`` is not touched: the caller (``mtpeft.utils.threads``) decides.
    """
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every={checkpoint_every} must be >= 1.")
    train_lines, eval_lines = _split_lines(lines, cfg)
    train = make_windows(train_lines, tokenizer, cfg.seq_len)
    held_out = make_windows(eval_lines, tokenizer, cfg.seq_len)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = _optimizer(model, cfg)
    sched = _scheduler(opt, cfg)
    path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    state = load_checkpoint(path, cfg, model, opt, sched, gen) if path is not None else None
    if state is None:
        start_eval = eval_loss(model, held_out, cfg.batch_size)
        state = _Progress([], start_eval, eval_copy_loss(model, held_out, cfg.batch_size))
    losses, first, before = state.losses, len(state.losses), state.elapsed_s
    model.train()
    t0 = time.perf_counter()
    with _progress(progress) as bar:
        task = bar.add_task("pretrain", total=cfg.steps, completed=first, loss=float("nan"))
        for step in range(first + 1, cfg.steps + 1):
            batch = train.sample(cfg.batch_size, gen, cfg.repeat_prob)
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.update(task, advance=1, loss=losses[-1])
            _log_progress(step, cfg.steps, losses, t0, first)
            if path is not None and step % checkpoint_every == 0 and step < cfg.steps:
                state.elapsed_s = before + time.perf_counter() - t0
                save_checkpoint(path, cfg, model, opt, sched, gen, state)
            if on_step is not None:
                on_step(step)
    wall = before + time.perf_counter() - t0
    model.eval()
    tail = losses[-max(1, len(losses) // 10) :] if losses else [state.eval_loss_start]
    return PretrainResult(
        final_loss=sum(tail) / len(tail),
        first_loss=losses[0] if losses else state.eval_loss_start,
        eval_loss_start=state.eval_loss_start,
        eval_loss_end=eval_loss(model, held_out, cfg.batch_size),
        copy_loss_start=state.copy_loss_start,
        copy_loss_end=eval_copy_loss(model, held_out, cfg.batch_size),
        wall_s=wall,
        tokens=cfg.steps * cfg.batch_size * cfg.seq_len,
    )
