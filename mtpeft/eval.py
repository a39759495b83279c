"""Entry point: ``python -m mtpeft.eval adapter=<run dir | adapter dir> [split=val] [data=...] [model=...]``.

Scores a saved adapter on the ``test`` split (or ``split=val``) of any data preset and writes a
``results.json`` with the fields of a training run's (``metrics: {<split>: {...}}``, parameters, wall time,
``eval_s_per_1000_prompts``, memory, provenance, ...) plus ``kind: eval``, the adapter it scored and the
task-id mapping, into its own run directory (``logs/<task_name>/runs/...``, ``task_name: eval``), with the
per-example ``scores.jsonl.gz``. Composes ``conf/eval.yaml``; the pieces are those of a training run
(`mtpeft.run`: module, loggers, run-directory lock and ``running``/``success``/``failed`` records).

Where the settings come from:

* ``adapter=<run dir>`` (what ``python -m mtpeft.train`` left: ``adapter/`` plus ``.hydra/config.yaml`` or
  ``results.json``): the model, data, seed and evaluation settings are the run's, so by default the run's
  own test scores are reproduced exactly. ``model=<preset>`` / ``data=<preset>`` replace the run's model /
  data config, ``seed=`` and ``evaluation.*=`` replace single values, ``model.x=`` / ``data.x=`` keys
  given with ``++`` change the run's config in place.
* ``adapter=<adapter dir>`` (a bare ``adapter/`` directory with ``mtpeft_adapter.json``): it records the
  method, not the base model nor the data, so ``model=`` and ``data=`` are required; seed and evaluation
  settings default to conf/train.yaml's.
* The method and its options always come from the adapter's own record; trainer, logger and paths from
  conf/eval.yaml (the trainer is not taken from the run: pass ``trainer=gpu`` as the run had it).

Task ids: an adapter knows its tasks by id (positions in the trained task list, results.json ``tasks``).
The evaluated data's tasks are mapped to those ids by name. A task-conditioned method
(``requires_task_ids``) cannot score a task it was not trained on: that is an error naming the task and
the trained tasks. Task-agnostic methods score any task (they then get no task ids at all).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from mtpeft.adapters.base import METHOD_META, read_adapter_meta
from mtpeft.export import (
    build_datamodule,
    check_run_adapter,
    load_adapted,
    read_run_config,
    run_adapter_dir,
    run_tasks,
)
from mtpeft.models.cache import check_cache_dir
from mtpeft.preflight import (
    CONF_DIR,
    check_data,
    check_declared_nodes,
    check_evaluation,
    check_method,
    check_model,
    check_run_settings,
    check_targets,
    check_top_level_keys,
    run_cli,
)
from mtpeft.record import EVAL, RunRecord, checked_failure
from mtpeft.run import (
    Job,
    build_loggers,
    build_module,
    close_loggers,
    log_task_table,
    record_fields,
    run_record,
)
from mtpeft.utils.memory import reset_peak_memory
from mtpeft.utils.resolvers import register_resolvers
from mtpeft.utils.runlock import RunDirLock
from mtpeft.utils.sweep import RESULTS_FILE, failure_record, is_recorded, read_results, write_record
from mtpeft.utils.tables import parameter_table, print_table, results_table
from mtpeft.utils.threads import apply_cpu_threads

register_resolvers()
log = logging.getLogger(__name__)

SPLITS = ("test", "val")
EVAL_KEYS = ("adapter", "split")
"""Top-level keys of conf/eval.yaml that conf/train.yaml does not have."""
INHERITED_GROUPS = ("model", "data")
"""Config groups taken from the adapter's run unless a preset is chosen on the command line."""


# -- where the adapter comes from ---------------------------------------------------------------------
@dataclass(frozen=True)
class AdapterSource:
    """A saved adapter: its directory and record, and the run that trained it (None for a bare directory)."""

    adapter_dir: Path
    meta: dict[str, Any]
    run_dir: Path | None = None
    run_config: DictConfig | None = None
    run_results: dict[str, Any] = field(default_factory=dict)

    def record(self, trained_tasks: list[str] | None) -> dict[str, Any]:
        """The ``adapter`` field of the results: what was scored, and the run that trained it."""
        return {
            "path": str(self.adapter_dir.resolve()),
            "run_dir": str(self.run_dir.resolve()) if self.run_dir else None,
            "method": self.meta["method"],
            "num_tasks": self.meta["num_tasks"],
            "trained_tasks": trained_tasks,
            "run_config_hash": self.run_results.get("config_hash"),
            "run_job_hash": self.run_results.get("job_hash"),
        }


def adapter_source(path: str | Path) -> AdapterSource:
    """Read what ``adapter=`` names (no model is loaded): a run directory or a bare adapter directory."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"adapter={path}: no such directory; pass a run directory (logs/train/runs/<run>) or an adapter "
            f"directory (<run>/adapter, holding {METHOD_META})"
        )
    if (path / "adapter").is_dir() or _is_run_dir(path):
        adapter = run_adapter_dir(path)
        run_config = read_run_config(path)
        meta = check_run_adapter(adapter, run_config)
        results = read_results(path / RESULTS_FILE) if (path / RESULTS_FILE).is_file() else None
        return AdapterSource(adapter, meta, path, run_config, results or {})
    try:
        meta, _ = read_adapter_meta(path)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"adapter={path} is neither a run directory (adapter/ with .hydra/config.yaml or results.json) "
            f"nor an adapter directory ({METHOD_META})"
        ) from err
    return AdapterSource(path, meta)


def _is_run_dir(path: Path) -> bool:
    return (path / ".hydra" / "config.yaml").is_file() or (path / RESULTS_FILE).is_file()


# -- the evaluation's config ----------------------------------------------------------------------------
def train_defaults() -> DictConfig:
    """conf/train.yaml's own keys (seed, evaluation, optimizer, ...), without its config groups."""
    base = OmegaConf.load(CONF_DIR / "train.yaml")
    return OmegaConf.masked_copy(base, [k for k in base if k != "defaults"])


def group_choices(cfg: DictConfig) -> dict[str, str | None]:
    """The preset chosen for each of ``model`` and ``data`` (None: none chosen), from Hydra's runtime
    choices; outside Hydra, a node present in ``cfg`` counts as chosen."""
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    return {
        group: choices.get(group, "given") if cfg.get(group) is not None else None
        for group in INHERITED_GROUPS
    }


def eval_config(cfg: DictConfig, source: AdapterSource, choices: Mapping[str, str | None]) -> DictConfig:
    """``cfg`` with model, data, seed and evaluation settings filled in from the adapter's run (where the
    command line did not give them) and ``method`` from the adapter's record (module docstring)."""
    missing = [group for group in INHERITED_GROUPS if choices.get(group) is None]
    if source.run_config is None and missing:
        raise ValueError(_bare_adapter_message(source.adapter_dir, missing))
    base = source.run_config if source.run_config is not None else train_defaults()
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        for group in missing:
            cfg[group] = _inherited_group(cfg.get(group), base, group)
        if cfg.get("seed") is None:
            cfg.seed = base.get("seed", train_defaults().seed)
        cfg.evaluation = _evaluation(cfg.get("evaluation") or {}, base)
        cfg.method = {"name": source.meta["method"], **source.meta["config"]}
    return cfg


def _bare_adapter_message(adapter: Path, missing: Sequence[str]) -> str:
    given = " ".join(f"{group}=<preset>" for group in missing)
    message = (
        f"adapter={adapter} is a bare adapter directory: it records the method but not the base model nor "
        f"the data it was trained on, so pass {given} (e.g. model=tiny_llama data=mix3)"
    )
    if _is_run_dir(adapter.parent):
        message += f", or pass the run directory that holds it (adapter={adapter.parent})"
    return message


def _inherited_group(own: DictConfig | None, base: DictConfig, group: str) -> DictConfig:
    """The run's ``group`` node, with the keys given without a preset (``++data.x=...``) on top."""
    inherited = base.get(group)
    if inherited is None:
        raise ValueError(f"the adapter's run config has no {group!r} node: pass {group}=<preset>")
    return OmegaConf.merge(inherited, own) if own is not None else inherited


def _evaluation(own: Mapping[str, Any], base: DictConfig) -> DictConfig:
    """conf/train.yaml's defaults, then the run's values, then those given (non-null) for the evaluation."""
    given = {key: value for key, value in own.items() if value is not None}
    return OmegaConf.merge(train_defaults().evaluation, base.get("evaluation") or {}, given)


def module_config(cfg: DictConfig, source: AdapterSource) -> DictConfig:
    """What `mtpeft.run.build_module` reads: the adapter's training config with this evaluation's settings,
    no compile, no activation checkpointing, and today's optimiser and schedule nodes (unused when
    evaluating; an adapter trained by an older mtpeft may hold another schedule node)."""
    defaults = train_defaults()
    module_cfg = copy.deepcopy(source.run_config if source.run_config is not None else defaults)
    with open_dict(module_cfg):
        for key in ("optimizer", "scheduler", "warmup_ratio"):
            module_cfg[key] = defaults[key]
        module_cfg.evaluation = cfg.evaluation
        module_cfg.gradient_checkpointing = False
        module_cfg.compile = False
    return module_cfg


# -- pre-flight -------------------------------------------------------------------------------------
def preflight_eval(cfg: DictConfig) -> None:
    """The checks of `mtpeft.preflight` that apply to an evaluation, before any model is loaded: keys,
    settings, evaluation, instantiated nodes, the adapter's method record, the model node, cache dir, data and
    split."""
    if cfg.split not in SPLITS:
        raise ValueError(f"split={cfg.split!r} is not valid: use one of {', '.join(SPLITS)}")
    check_top_level_keys(OmegaConf.masked_copy(cfg, [k for k in cfg if k not in EVAL_KEYS]))
    check_run_settings(cfg)
    check_declared_nodes(cfg)
    check_evaluation(cfg.evaluation)
    check_targets(cfg)
    check_method(cfg)
    check_model(cfg)
    check_cache_dir(cfg.model.get("cache_dir"))
    check_data(cfg.data, test=cfg.split == "test")


# -- task ids ---------------------------------------------------------------------------------------
class TaskIdMap(nn.Module):
    """An adapted model fed the evaluated data's task ids, translated to the ids it was trained with.

    ``ids[i]`` is the trained id of the data's task ``i``; ``ids=None`` drops task ids altogether (a
    task-agnostic method scored on tasks it never saw). Everything `mtpeft.module.MultiTaskModule` calls
    on a model at evaluation goes through: forward, generate, ``check_task_ids``/``task_scope`` (the loss
    head's scope) and ``base_model``.
    """

    def __init__(self, adapted: nn.Module, ids: Sequence[int] | None) -> None:
        super().__init__()
        self.adapted = adapted
        self.register_buffer("ids", None if ids is None else torch.tensor(list(ids)), persistent=False)

    @property
    def base_model(self) -> nn.Module:
        return self.adapted.base_model

    def translate(self, task_ids: torch.Tensor | None) -> torch.Tensor | None:
        """The trained ids of a batch's task ids (None when ids are dropped)."""
        if task_ids is None or self.ids is None:
            return None
        return self.ids.to(task_ids.device)[torch.as_tensor(task_ids, dtype=torch.long)]

    def check_task_ids(self, task_ids: torch.Tensor | None, batch_size: int) -> torch.Tensor | None:
        return self.adapted.check_task_ids(self.translate(task_ids), batch_size)

    @contextmanager
    def task_scope(self, task_ids: torch.Tensor | None) -> Iterator[None]:
        """The adapted model's scope for ids already translated (by `check_task_ids`)."""
        with self.adapted.task_scope(task_ids):
            yield

    def forward(self, *args: Any, task_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        return self.adapted(*args, task_ids=self.translate(task_ids), **kwargs)

    @torch.no_grad()
    def generate(self, *args: Any, task_ids: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        return self.adapted.generate(*args, task_ids=self.translate(task_ids), **kwargs)


def trained_ids(tasks: Sequence[str], trained: Sequence[str] | None, num_tasks: int) -> list[int | None]:
    """For each evaluated task, its id in the trained task list (None: not trained on it). A bare adapter
    does not record task names: the data's tasks are then taken as the trained ones when as many."""
    if trained is None:
        return list(range(len(tasks))) if len(tasks) == num_tasks else [None] * len(tasks)
    return [list(trained).index(task) if task in trained else None for task in tasks]


def bind_tasks(
    model: Any, tasks: Sequence[str], trained: Sequence[str] | None
) -> tuple[nn.Module, dict[str, int | None]]:
    """(the model to evaluate, ``{task: trained id}``): ``model`` itself when the data's task ids are the
    trained ones, else a `TaskIdMap`. A task-conditioned method on an untrained task is an error."""
    ids = trained_ids(tasks, trained, model.num_tasks)
    mapping = dict(zip(tasks, ids, strict=True))
    unknown = [task for task, i in mapping.items() if i is None]
    if unknown and model.requires_task_ids:
        raise ValueError(_untrained_message(model.method_name, unknown, trained, model.num_tasks, tasks))
    if trained is None and model.requires_task_ids:
        log.warning(
            "a bare adapter directory does not record its task names: task ids 0..%d are assumed to be "
            "the data's tasks %s in this order (pass the run directory to have them checked)",
            model.num_tasks - 1,
            list(tasks),
        )
    if ids == list(range(len(tasks))):
        return model, mapping
    if unknown:
        log.info("tasks %s were not trained on: method %r gets no task ids", unknown, model.method_name)
        return TaskIdMap(model, None), mapping
    log.info("task ids of the data -> the adapter's: %s", mapping)
    return TaskIdMap(model, ids), mapping


def _untrained_message(
    method: str, unknown: list[str], trained: Sequence[str] | None, num_tasks: int, tasks: Sequence[str]
) -> str:
    if trained is None:
        return (
            f"method {method!r} is task-conditioned and this bare adapter directory does not record which "
            f"{num_tasks} task(s) it was trained on; the data has {len(tasks)} ({list(tasks)}): pass the run "
            "directory instead (adapter=<run dir>), whose results.json names them"
        )
    return (
        f"method {method!r} is task-conditioned: it has no task id for task(s) {unknown}, which it was not "
        f"trained on (its tasks: {list(trained)}); evaluate it on data with those tasks (e.g. its run's data: "
        "drop data=), or use a task-agnostic method"
    )


# -- the evaluation -------------------------------------------------------------------------------------
def evaluate(cfg: DictConfig, output_dir: str | Path) -> dict[str, Any]:
    """Score the adapter named by ``cfg.adapter``; return the results also written to ``results.json``.

    Every config error (and a bare adapter without ``model=``/``data=``) is raised before any model is
    loaded. Holds ``output_dir``'s lock and keeps its ``results.json`` current (running, then success or
    failed, each with ``kind: eval``), like a training run (`mtpeft.run.run`).
    """
    if OmegaConf.is_missing(cfg, "adapter"):
        raise ValueError("adapter is required: adapter=<run dir> (logs/train/runs/<run>) or an adapter dir")
    source = adapter_source(cfg.adapter)
    cfg = eval_config(cfg, source, group_choices(cfg))
    warn_on_other_precision(cfg, source)
    preflight_eval(cfg)
    output_dir = Path(output_dir)
    with RunDirLock(output_dir), run_record(cfg, output_dir, kind=EVAL) as job:
        return _evaluate(cfg, source, output_dir, job)


def warn_on_other_precision(cfg: DictConfig, source: AdapterSource) -> None:
    """A warning when this evaluation's ``trainer.precision`` is not the one the run trained and tested
    with (the trainer comes from conf/eval.yaml, not from the run): the scores then differ from the run's."""
    ran = OmegaConf.select(source.run_config, "trainer.precision") if source.run_config is not None else None
    now = OmegaConf.select(cfg, "trainer.precision")
    if ran is not None and str(ran) != str(now):
        log.warning(
            "trainer.precision=%s, but the run used %s: scores will differ from the run's; pass "
            "trainer.precision=%s (or the run's trainer preset, e.g. trainer=gpu) to reproduce them",
            now,
            ran,
            ran,
        )


def _evaluate(cfg: DictConfig, source: AdapterSource, output_dir: Path, job: Job) -> dict[str, Any]:
    """Load, score one split, write scores.jsonl.gz and the success record."""
    started = time.perf_counter()
    reset_peak_memory()
    apply_cpu_threads(cfg.get("cpu_threads", "auto"), cfg.model)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model, tokenizer = load_adapted(source.adapter_dir, cfg.model)
    print_table(parameter_table(model, f"method={model.method_name}: adapter parameters"))
    datamodule = build_datamodule(cfg, tokenizer)
    trained = _trained_tasks(source, tokenizer)
    evaluated, mapping = bind_tasks(model, datamodule.task_names, trained)
    module = build_module(module_config(cfg, source), evaluated, tokenizer)
    loggers = build_loggers(cfg)
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=[])
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    try:
        score = trainer.test if cfg.split == "test" else trainer.validate
        score(module, datamodule=datamodule)
        log_task_table(loggers, cfg.split, module.last_metrics[cfg.split])
    finally:
        close_loggers(loggers)
    results = RunRecord(
        **record_fields(cfg, model.method_name, module, model, model.base_model, datamodule, started),
        kind=EVAL,
        split=cfg.split,
        metrics={cfg.split: module.last_metrics[cfg.split]},
        adapter=source.record(trained),
        task_ids=mapping,
        job_hash=job.hash,
        inputs=job.inputs,
    ).to_json()
    module.write_example_scores(output_dir)  # scores.jsonl.gz: per-example scores for the bootstrap CIs
    write_record(output_dir, results)
    split = cfg.split
    print_table(results_table(results["metrics"][split], split, f"{model.method_name}: {split} results"))
    return results


def _trained_tasks(source: AdapterSource, tokenizer: Any) -> list[str] | None:
    """The run's task names in task-id order (None for a bare adapter), checked against the adapter."""
    if source.run_dir is None:
        return None
    tasks = run_tasks(source.run_dir, source.run_config, tokenizer)
    if len(tasks) != source.meta["num_tasks"]:
        raise ValueError(
            f"run {source.run_dir} lists {len(tasks)} tasks ({tasks}) but its adapter was saved with "
            f"num_tasks={source.meta['num_tasks']}: the run directory's results.json and adapter/ disagree"
        )
    return tasks


# -- command line -----------------------------------------------------------------------------------
@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> float:
    """Evaluate; return ``<split>/avg/score``. A failure before the run's own record is written still
    leaves a ``failed`` record (``kind: eval``); under ``--multirun`` the sweep goes on (NaN)."""
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    started = time.perf_counter()
    with RunDirLock(output_dir):  # a busy directory fails here, before anything is written into it
        try:
            results = evaluate(cfg, output_dir)
        except Exception as err:
            if not is_recorded(err):
                failure = failure_record(cfg, err, None, time.perf_counter() - started)
                write_record(output_dir, checked_failure({**failure, "kind": EVAL}))
            log.error("evaluation failed: %s (details in %s)", err, output_dir / RESULTS_FILE)
            if not multirun:
                raise
            return float("nan")
    split = results["split"]
    return float(results["metrics"][split][f"{split}/avg/score"])


if __name__ == "__main__":
    run_cli(main)  # a failure's last stderr line is "Error: <message>"
