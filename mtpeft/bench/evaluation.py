"""Evaluation benchmark: one validation pass of the run's module over the run's datamodule.

What ``eval_s_per_1000_prompts`` in a run's results.json measures (the module's own counters: wall time of
the eval batches, LM loss and KV-cached generation, each row stopping at its task's budget or EOS), for
the composed config's method with freshly initialised adapters (identity-initialised methods then generate
what the base model generates).
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
from hydra.utils import instantiate

from mtpeft.bench.config import RunParts
from mtpeft.run import build_module


@dataclass(frozen=True)
class EvalTiming:
    prompts: int
    seconds: float
    batch_size: int

    @property
    def s_per_1000_prompts(self) -> float:
        return 1000 * self.seconds / self.prompts if self.prompts else float("nan")


def eval_timing(parts: RunParts, batches: int | None = None) -> EvalTiming:
    """Time one validation pass (the first ``batches`` eval batches; None: the whole val split)."""
    cfg = parts.cfg
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = build_module(cfg, parts.fresh_method(), parts.tokenizer)
    trainer = instantiate(
        cfg.trainer,
        logger=False,
        callbacks=[],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1.0 if batches is None else batches,
    )
    trainer.validate(module, datamodule=parts.fresh_datamodule(), verbose=False)
    return EvalTiming(module.eval_prompts, module.eval_seconds, cfg.evaluation.batch_size)


def eval_markdown(timing: EvalTiming, method: str) -> list[str]:
    """One line: eval seconds per 1000 prompts (as in results.json) and what was timed."""
    return [
        f"Evaluation (one validation pass, method={method}, fresh adapters): "
        f"**{timing.s_per_1000_prompts:.1f} s per 1000 prompts** ({timing.prompts} prompts in "
        f"{timing.seconds:.1f} s, eval batch {timing.batch_size}; loss + KV-cached generation, each row "
        "stopping at its task's budget or EOS; `eval_s_per_1000_prompts` in results.json)."
    ]
