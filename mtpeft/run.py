"""One training run from a resolved config: build, fit, test, write ``results.json``.

Kept apart from the Hydra entry point (`mtpeft.train`) so tests and other entry points can call it with a
composed config. The lifecycle of a run directory (see README, "Reliability"):

1. the run takes an exclusive lock on its directory (`mtpeft.utils.runlock`): a second live run there
   fails at once, naming the directory and the holder's pid;
2. it writes ``results.json`` with ``status: running`` (config, config and job hashes, inputs, start time,
   pid, host), so a killed run stays visible as incomplete;
3. it trains, resuming from a checkpoint if ``resume`` says so (`mtpeft.utils.resume`; ``null`` = auto in
   sweeps). Every ``checkpoint_every_n_steps`` optimiser steps it writes ``checkpoints/last.ckpt`` (adapter,
   optimiser, scheduler, loop, sampler and RNG states: `mtpeft.utils.callbacks.ResumeState`), so a kill
   loses at most that many steps and the resumed run ends with the same metrics as an uninterrupted one;
4. it replaces the record with ``status: success`` (write-once: nothing replaces a success record later)
   or, on an exception, ``status: failed`` with the error, and re-raises.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf

from mtpeft.inputs import run_inputs
from mtpeft.methods import AdaptedModel, build_method, method_options
from mtpeft.models.loader import adapter_dtype, describe_model, load_base_model
from mtpeft.module import MultiTaskModule
from mtpeft.preflight import preflight
from mtpeft.record import RunRecord, checked, checked_failure
from mtpeft.utils.callbacks import PeriodicCheckpoint, ResumeState
from mtpeft.utils.confighash import config_hash, job_hash
from mtpeft.utils.memory import peak_memory_mb, reset_peak_memory, set_malloc_mmap_threshold
from mtpeft.utils.provenance import provenance
from mtpeft.utils.resume import CHECKPOINT_DIR, find_resume_checkpoint, load_checkpoint
from mtpeft.utils.runlock import RunDirLock
from mtpeft.utils.sweep import (
    RESULTS_FILE,
    failure_record,
    is_recorded,
    mark_recorded,
    read_results,
    running_record,
    write_record,
)
from mtpeft.utils.tables import parameter_table, print_table, results_table
from mtpeft.utils.threads import apply_cpu_threads
from mtpeft.utils.upstream_noise import quiet_upstream_noise

log = logging.getLogger(__name__)


def build_loggers(cfg: DictConfig) -> list[Any]:
    nodes = cfg.get("logger") or {}
    return [instantiate(node) for node in nodes.values() if node is not None and "_target_" in node]


def build_callbacks(cfg: DictConfig, has_logger: bool) -> list[Any]:
    """Callbacks from ``cfg.callbacks``; the learning-rate monitor only when something logs."""
    nodes = cfg.get("callbacks") or {}
    callbacks = [instantiate(node) for node in nodes.values() if node is not None and "_target_" in node]
    return [c for c in callbacks if has_logger or not isinstance(c, LearningRateMonitor)]


def build_module(cfg: DictConfig, model: Any, tokenizer: Any) -> MultiTaskModule:
    """The run's `MultiTaskModule` for ``model`` (also built by the loop benchmark, ``mtpeft.bench``)."""
    return MultiTaskModule(
        model,
        tokenizer,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler),
        warmup_ratio=cfg.warmup_ratio,
        weight_decay=cfg.optimizer.get("weight_decay"),
        max_new_tokens=cfg.evaluation.max_new_tokens,
        num_samples=cfg.evaluation.num_samples,
        temperature=cfg.evaluation.temperature,
        top_p=cfg.evaluation.top_p,
        gradient_checkpointing=cfg.gradient_checkpointing,
        compile_step=bool(cfg.get("compile", False)),
        sampling_seed=int(cfg.seed),
    )


@dataclass(frozen=True)
class Job:
    """What identifies a run's results: resolved config, inputs (data digests, code version), job hash."""

    config: dict[str, Any]
    inputs: dict[str, Any]

    @property
    def hash(self) -> str:
        return job_hash(self.config, self.inputs)


def run(cfg: DictConfig, output_dir: str | Path, inputs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train and evaluate one configuration; return the results dict also written to ``results.json``.
    ``inputs``: the job's `mtpeft.inputs.run_inputs` if the caller computed them for this config already
    (`mtpeft.train` does, to look for a finished job), so the data and base are not hashed twice.

    Holds ``output_dir``'s lock throughout and keeps its ``results.json`` current (running, then success or
    failed; module docstring). Raises `mtpeft.utils.runlock.RunDirBusy` if another live run holds the
    directory and ValueError if it already holds a successful run (results are never replaced).
    """
    preflight(cfg)  # every config error before any model is loaded (mtpeft/preflight.py)
    quiet_upstream_noise()
    output_dir = Path(output_dir)
    with RunDirLock(output_dir), run_record(cfg, output_dir, inputs=inputs) as job:
        return _train_and_evaluate(cfg, output_dir, job)


@contextlib.contextmanager
def run_record(
    cfg: DictConfig, output_dir: Path, *, inputs: dict[str, Any] | None = None, **extra: Any
) -> Iterator[Job]:
    """Write the ``running`` record, yield the `Job`; on an exception write the ``failed`` record.
    ``inputs``: the config's `run_inputs` if already computed (else computed here). ``extra`` fields go into
    both records (`mtpeft.eval` marks its records ``kind: eval``)."""
    started = time.perf_counter()
    config = OmegaConf.to_container(cfg, resolve=True)
    existing = read_results(output_dir / RESULTS_FILE) if (output_dir / RESULTS_FILE).exists() else None
    if existing is not None and existing.get("status") == "success":
        raise ValueError(
            f"{output_dir} already holds a successful run ({output_dir / RESULTS_FILE}); results are never "
            "replaced: give this run its own directory (drop the hydra.run.dir / hydra.sweep.dir override)"
        )
    job = Job(config, run_inputs(config) if inputs is None else inputs)
    write_record(output_dir, checked(running_record(config, job.inputs, **extra)))
    try:
        yield job
    except Exception as err:
        if not is_recorded(err):
            wall = time.perf_counter() - started
            failure = failure_record(cfg, err, config_hash(config), wall, job.inputs)
            write_record(output_dir, checked_failure({**failure, **extra}))
            mark_recorded(err)
        raise


def resume_callbacks(cfg: DictConfig, output_dir: Path, job: Job) -> list[Any]:
    """`ResumeState` and, with ``checkpoint_every_n_steps``, a `PeriodicCheckpoint` that writes
    ``checkpoints/last.ckpt`` every that many optimiser steps (the best-by-validation one is unchanged)."""
    callbacks: list[Any] = [ResumeState(job.hash)]
    every = cfg.get("checkpoint_every_n_steps")
    if every is not None:
        callbacks.append(PeriodicCheckpoint(output_dir / CHECKPOINT_DIR, every))
    return callbacks


def _in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _resume_checkpoint(cfg: DictConfig, output_dir: Path, job: Job) -> Path | None:
    log_root = Path(cfg.paths.log_dir) / cfg.task_name if cfg.get("paths") else output_dir
    return find_resume_checkpoint(cfg.get("resume"), output_dir, log_root, job.hash, _in_multirun())


def _train_and_evaluate(cfg: DictConfig, output_dir: Path, job: Job) -> dict[str, Any]:
    """Build, fit (or resume), test, save the adapter and write the success record."""
    started = time.perf_counter()
    reset_peak_memory()
    apply_cpu_threads(cfg.get("cpu_threads", "auto"), cfg.model)  # training, pre-training and evaluation
    set_malloc_mmap_threshold(cfg.get("cpu_malloc_mmap_threshold_kb"))
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
    module = build_module(cfg, model, tokenizer)
    loggers = build_loggers(cfg)
    callbacks = build_callbacks(cfg, bool(loggers)) + resume_callbacks(cfg, output_dir, job)
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)
    resumed = None
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    try:
        if cfg.train and trainable > 0:
            module.train()  # loaders return eval-mode models; Lightning keeps per-module modes
            resumed = _resume_checkpoint(cfg, output_dir, job)
            with warnings.catch_warnings():  # the sampler position is restored with the datamodule state
                warnings.filterwarnings("ignore", message=".*checkpoint that ended before the epoch ended")
                trainer.fit(module, datamodule=datamodule, ckpt_path=resumed, weights_only=False)
        else:
            log.info("nothing to train (method=%s, train=%s): evaluating the model as is", name, cfg.train)
            trainer.validate(module, datamodule=datamodule)
        best = _best_checkpoint(trainer)
        if cfg.test:
            trainer.test(module, datamodule=datamodule, ckpt_path=best, weights_only=False)
        if cfg.save_adapter and trainable > 0:
            if best and not cfg.test:  # trainer.test loaded it otherwise
                restore_best_adapter(model, best)
            model.save_adapter(output_dir / "adapter")
        for split, metrics in module.last_metrics.items():
            log_task_table(loggers, split, metrics)
    finally:
        close_loggers(loggers)
    measured = record_fields(cfg, name, module, model, base_model, datamodule, started)
    results = RunRecord(
        **measured,
        metrics={"val": module.best_val or module.last_metrics.get("val", {}), **_test(module)},
        best_checkpoint=best,
        train_time_s=round(module.train_seconds, 2),
        train_tokens_per_s=round(module.train_tokens / module.train_seconds, 1)
        if module.train_seconds
        else None,
        job_hash=job.hash,
        inputs=job.inputs,
        resumed_from=str(resumed) if resumed else None,
    ).to_json()
    module.write_example_scores(output_dir)  # scores.jsonl.gz: per-example scores for the bootstrap CIs
    write_record(output_dir, results)
    split = "test" if "test" in results["metrics"] else "val"
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


def restore_best_adapter(model: AdaptedModel, checkpoint: str | Path) -> None:
    """Load the adapter weights of the best validation checkpoint into ``model``, so that a run saves the
    adapter its record's validation scores belong to (without a test stage, which loads it, the model
    holds the last step's weights)."""
    state = load_checkpoint(Path(checkpoint))["state_dict"]
    model.load_adapter_state_dict({key.removeprefix("model."): value for key, value in state.items()})


def _best_checkpoint(trainer: L.Trainer) -> str | None:
    callback = trainer.checkpoint_callback
    path = getattr(callback, "best_model_path", "") if callback is not None else ""
    return path or None


def close_loggers(loggers: list[Any]) -> None:
    """Close every logger (`_finish_logger`): at the end of a run, also after a failure."""
    for logger in loggers:
        _finish_logger(logger)


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


def record_fields(
    cfg: DictConfig,
    method: str,
    module: MultiTaskModule,
    model: Any,
    base_model: Any,
    datamodule: Any,
    started: float,
) -> dict[str, Any]:
    """The `RunRecord` fields of a finished run that training and evaluation (`mtpeft.eval`) both write:
    labels, config and hash, parameter counts, wall time since ``started``, evaluation time and settings,
    peak memory, threads and provenance. Each adds its own (metrics, checkpoint, adapter, ...)."""
    trainable, total = model.count_parameters()
    resolved = OmegaConf.to_container(cfg, resolve=True)
    return {
        "status": "success",
        "method": method,
        "model": describe_model(base_model, model.base_state_dict()),
        "tasks": datamodule.task_names,
        "seed": cfg.seed,
        "config": resolved,
        "config_hash": config_hash(resolved),
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100.0 * trainable / total,
        "wall_time_s": round(time.perf_counter() - started, 2),
        "eval_s_per_1000_prompts": eval_s_per_1000_prompts(module),
        "peak_memory_mb": peak_memory_mb(),
        "eval_batch_size": cfg.evaluation.batch_size,
        "template": datamodule.template_name,
        "torch_threads": torch.get_num_threads(),
        "provenance": provenance(Path(__file__).resolve().parent.parent),
    }


def eval_s_per_1000_prompts(module: MultiTaskModule) -> float | None:
    """Seconds of evaluation batches (loss + generation, val and test) per 1000 prompts; None if none ran."""
    if not module.eval_prompts:
        return None
    return round(1000 * module.eval_seconds / module.eval_prompts, 2)


def _test(module: MultiTaskModule) -> dict[str, dict[str, float]]:
    return {"test": module.last_metrics["test"]} if "test" in module.last_metrics else {}
