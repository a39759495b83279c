"""One training run from a resolved config: build, fit, test, write ``results.json``.

Kept apart from the Hydra entry point (`mtpeft.train`) so tests and other entry points can call it with a
composed config.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf

from mtpeft.methods import build_method
from mtpeft.models.loader import adapter_dtype, describe_model, load_base_model
from mtpeft.module import MultiTaskModule
from mtpeft.preflight import preflight
from mtpeft.utils.confighash import config_hash
from mtpeft.utils.memory import peak_memory_mb, reset_peak_memory
from mtpeft.utils.provenance import provenance
from mtpeft.utils.tables import parameter_table, print_table, results_table
from mtpeft.utils.threads import apply_cpu_threads

log = logging.getLogger(__name__)
RESULTS_FILE = "results.json"


def method_options(cfg: DictConfig) -> tuple[str, dict[str, Any]]:
    """Split the ``method`` node into the registry name and the options of its config dataclass."""
    options = OmegaConf.to_container(cfg.method, resolve=True)
    if "name" not in options:
        raise ValueError(
            "the method config needs a 'name' key naming a registered method (conf/method/*.yaml)"
        )
    return options.pop("name"), options


def build_loggers(cfg: DictConfig) -> list[Any]:
    nodes = cfg.get("logger") or {}
    return [instantiate(node) for node in nodes.values() if node is not None and "_target_" in node]


def build_callbacks(cfg: DictConfig, has_logger: bool) -> list[Any]:
    """Callbacks from ``cfg.callbacks``; the learning-rate monitor only when something logs."""
    nodes = cfg.get("callbacks") or {}
    callbacks = [instantiate(node) for node in nodes.values() if node is not None and "_target_" in node]
    return [c for c in callbacks if has_logger or not isinstance(c, LearningRateMonitor)]


def run(cfg: DictConfig, output_dir: str | Path) -> dict[str, Any]:
    """Train and evaluate one configuration; return the results dict also written to ``results.json``."""
    preflight(cfg)  # every config error before any model is loaded (mtpeft/preflight.py)
    output_dir = Path(output_dir)
    started = time.perf_counter()
    reset_peak_memory()
    apply_cpu_threads(cfg.get("cpu_threads", "auto"), cfg.model)  # training, pre-training and evaluation
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    base_model, tokenizer = load_base_model(cfg.model)
    datamodule = instantiate(
        cfg.data, tokenizer=tokenizer, chat_template=bool(cfg.model.get("chat_template"))
    )
    datamodule.setup("fit")
    name, options = method_options(cfg)
    model = build_method(name, options, base_model, num_tasks=len(datamodule.task_names))
    model.upcast_trainable(adapter_dtype(cfg.model))
    trainable, total = model.count_parameters()
    print_table(parameter_table(model, f"method={name}: trainable parameters"))
    module = MultiTaskModule(
        model,
        tokenizer,
        optimizer=instantiate(cfg.optimizer),
        warmup_ratio=cfg.scheduler.warmup_ratio,
        min_lr_ratio=cfg.scheduler.min_lr_ratio,
        weight_decay=cfg.optimizer.get("weight_decay"),
        max_new_tokens=cfg.evaluation.max_new_tokens,
        num_samples=cfg.evaluation.get("num_samples", 1),
        temperature=cfg.evaluation.get("temperature", 0.8),
        top_p=cfg.evaluation.get("top_p", 0.95),
        gradient_checkpointing=cfg.gradient_checkpointing,
    )
    loggers = build_loggers(cfg)
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=build_callbacks(cfg, bool(loggers)))
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    try:
        if cfg.train and trainable > 0:
            module.train()  # loaders return eval-mode models; Lightning keeps per-module modes
            trainer.fit(module, datamodule=datamodule)
        else:
            log.info("nothing to train (method=%s, train=%s): evaluating the model as is", name, cfg.train)
            trainer.validate(module, datamodule=datamodule)
        best = _best_checkpoint(trainer)
        if cfg.test:
            trainer.test(module, datamodule=datamodule, ckpt_path=best, weights_only=False)
        if cfg.save_adapter and trainable > 0:
            model.save_adapter(output_dir / "adapter")
        for split, metrics in module.last_metrics.items():
            log_task_table(loggers, split, metrics)
    finally:
        for logger in loggers:
            _finish_logger(logger)
    results = _results(cfg, module, model, base_model, datamodule, started, best)
    module.write_example_scores(output_dir)  # scores.jsonl.gz: per-example scores for the bootstrap CIs
    (output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2))
    split = "test" if cfg.test else "val"
    print_table(results_table(results["metrics"][split], split, f"{name}: {split} results"))
    return results


def task_rows(metrics: dict[str, float], split: str) -> list[list[Any]]:
    """``[task, metric, score]`` rows of one split's metrics (``<split>/<task>/<metric>`` keys)."""
    rows = []
    for key, value in sorted(metrics.items()):
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == split and parts[2] not in ("score", "loss"):
            rows.append([parts[1], parts[2], value])
    return rows


def log_task_table(loggers: list[Any], split: str, metrics: dict[str, float]) -> None:
    """Log the per-task results of ``split`` as a table to every logger that supports tables (wandb)."""
    rows = task_rows(metrics, split)
    for logger in loggers:
        if hasattr(logger, "log_table") and rows:
            logger.log_table(key=f"{split}/results", columns=["task", "metric", "score"], data=rows)


def _best_checkpoint(trainer: L.Trainer) -> str | None:
    callback = trainer.checkpoint_callback
    path = getattr(callback, "best_model_path", "") if callback is not None else ""
    return path or None


def _finish_logger(logger: Any) -> None:
    """Close a logger; failures to log never kill a run (wandb offline may be unavailable)."""
    try:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "finish"):
            experiment.finish()
        else:
            logger.finalize("success")
    except Exception as err:  # noqa: BLE001 - logging must not fail a finished run
        log.warning("closing logger %s failed: %s", type(logger).__name__, err)


def _results(cfg, module, model, base_model, datamodule, started, best) -> dict[str, Any]:
    trainable, total = model.count_parameters()
    resolved = OmegaConf.to_container(cfg, resolve=True)
    return {
        "status": "success",
        "method": cfg.method.name,
        "model": describe_model(base_model),
        "tasks": datamodule.task_names,
        "seed": cfg.seed,
        "config": resolved,
        "config_hash": config_hash(resolved),
        "metrics": {"val": module.best_val or module.last_metrics.get("val", {}), **_test(module)},
        "best_checkpoint": best,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100.0 * trainable / total,
        "wall_time_s": round(time.perf_counter() - started, 2),
        "train_time_s": round(module.train_seconds, 2),
        "train_tokens_per_s": round(module.train_tokens / module.train_seconds, 1)
        if module.train_seconds
        else None,
        "peak_memory_mb": peak_memory_mb(),
        "eval_batch_size": cfg.evaluation.batch_size,
        "template": datamodule.template_name,
        "torch_threads": torch.get_num_threads(),
        "provenance": provenance(Path(__file__).resolve().parent.parent),
    }


def _test(module: MultiTaskModule) -> dict[str, dict[str, float]]:
    return {"test": module.last_metrics["test"]} if "test" in module.last_metrics else {}
