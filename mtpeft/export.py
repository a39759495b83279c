"""Export a finished run for standard tools: ``python -m mtpeft.export <run dir> [options]``.

A run directory holds ``.hydra/config.yaml`` (or the resolved config in ``results.json``), ``results.json``
(with the task names, in task-id order) and ``adapter/``. Every export rebuilds the base model from the
run's ``model`` config (`mtpeft.models.loader.load_base_model`), the method from the adapter's own record
(`mtpeft.methods.load_adapter`), and loads the adapter weights. Then, by option:

``--merge``
    one standalone Hugging Face model per task, ``<out>/merged-<task>/`` (``save_pretrained`` of the base
    with ``W0 + ΔW_t`` in every adapted linear, plus the tokenizer). Its logits equal the adapted model's
    for that task (eval mode). Only methods whose update is a per-task weight delta can be merged (LoRA,
    MultiLoRA, MTL-LoRA, Poly, C-Poly, MoE-LoRA with ``gate_input: task``); input-dependent ones (HyCAM,
    MoE-LoRA with token routers, PEML) stop with a clear error and exit status 2 saying why.
``--lmeval-task``
    an lm-evaluation-harness task per task that mtpeft scores by exact match (naming another is an error:
    lm-eval would not compute its score), ``<out>/lmeval/mtpeft_<task>_<split>.{yaml,jsonl}``: the
    ``--split`` records with the prompt rendered exactly as mtpeft renders it (template, chat template),
    generated greedily with the task's generation budget and scored by mtpeft's own ``exact_match`` (SQuAD
    normalisation; the function lies beside the tasks in ``mtpeft_exact_match.py``, as lm-eval's
    ``!function``). Run it with ``--include_path <out>/lmeval`` (see `mtpeft.lmeval`).
neither
    ``<out>/base/`` (the base model and tokenizer as a plain Hugging Face directory) and ``<out>/adapter/``
    (a copy of the adapter): for ``method=lora`` that pair is all plain transformers + peft need
    (``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)``).

``--task`` names a task (repeatable); without it every task of the run is exported (for ``--lmeval-task``
every exact-match task, saying which it skips). ``--out`` defaults to ``<run dir>/export``. Every task named
is checked before anything is written; only finished runs are exported.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from mtpeft.adapters.base import ADAPTER_CONFIG, AdaptedModel, NotMergeableError, read_adapter_meta
from mtpeft.adapters.registry import load_adapter
from mtpeft.models.loader import adapter_dtype, load_base_model
from mtpeft.utils.resolvers import register_resolvers
from mtpeft.utils.staging import staged_dir
from mtpeft.utils.sweep import write_json

log = logging.getLogger(__name__)
EXPORT_INFO = "mtpeft_export.json"
"""Written next to every exported model: run, method, task, task id (what the directory is)."""


@dataclass
class LoadedRun:
    """A run's config, its adapted model (eval mode) and tokenizer, and its task names in id order."""

    run_dir: Path
    cfg: DictConfig
    model: AdaptedModel
    tokenizer: Any
    tasks: list[str]

    def task_id(self, task: str) -> int:
        """The id of task ``task``; an unknown name lists the run's tasks."""
        if task not in self.tasks:
            raise ValueError(f"task {task!r} is not a task of run {self.run_dir}; its tasks: {self.tasks}")
        return self.tasks.index(task)

    def fresh_base(self) -> torch.nn.Module:
        """Another copy of the plain base model (for merging into)."""
        base, _ = load_base_model(self.cfg.model)
        return base


def read_run_config(run_dir: str | Path) -> DictConfig:
    """The run's config: ``.hydra/config.yaml``, else the resolved ``config`` of ``results.json``; its
    ``model.dtype`` is the dtype the run trained with (`pin_trained_dtype`)."""
    run_dir = Path(run_dir)
    register_resolvers()
    hydra_config = run_dir / ".hydra" / "config.yaml"
    results = _results(run_dir)
    if hydra_config.is_file():
        return pin_trained_dtype(OmegaConf.load(hydra_config), results)
    if "config" in results:
        return pin_trained_dtype(OmegaConf.create(results["config"]), results)
    raise FileNotFoundError(
        f"{run_dir} is not a run directory: no .hydra/config.yaml and no config in results.json "
        "(pass the directory a `python -m mtpeft.train` run wrote, e.g. logs/train/runs/<date>)"
    )


def pin_trained_dtype(cfg: DictConfig, results: dict[str, Any]) -> DictConfig:
    """``cfg`` with ``model.dtype`` set to the base dtype the run recorded (``inputs.base.dtype`` of
    results.json), where there is one: ``bfloat16_if_native`` resolves per machine, and an adapter trained
    on a float32 base must be exported and scored on a float32 base wherever that happens (and a bf16 one
    on bf16, emulated if need be)."""
    trained = ((results.get("inputs") or {}).get("base") or {}).get("dtype")
    configured = OmegaConf.select(cfg, "model.dtype")
    if trained and configured is not None and configured != trained:
        log.info(
            "model.dtype=%s: the run trained on a %s base, loading it as %s", configured, trained, trained
        )
        cfg.model.dtype = trained
    return cfg


def run_tasks(run_dir: Path, cfg: DictConfig, tokenizer: Any) -> list[str]:
    """Task names in task-id order: from ``results.json``, else from the run's data config."""
    tasks = _results(run_dir).get("tasks")
    if tasks:
        return list(tasks)
    return build_datamodule(cfg, tokenizer).task_names


def load_run(run_dir: str | Path) -> LoadedRun:
    """Rebuild the base model and the adapted model of a finished run (eval mode)."""
    run_dir = Path(run_dir)
    adapter = run_adapter_dir(run_dir)
    cfg = read_run_config(run_dir)
    check_run_adapter(adapter, cfg)
    model, tokenizer = load_adapted(adapter, cfg.model)
    return LoadedRun(run_dir, cfg, model, tokenizer, run_tasks(run_dir, cfg, tokenizer))


def run_adapter_dir(run_dir: Path) -> Path:
    """``<run dir>/adapter``; a clear error when the run saved none."""
    adapter = Path(run_dir) / "adapter"
    if not adapter.is_dir():
        raise FileNotFoundError(
            f"{run_dir} has no adapter/ directory: the run saved no adapter (save_adapter=false, "
            "method=none, or the run failed)"
        )
    return adapter


def check_run_adapter(adapter: Path, cfg: DictConfig) -> dict[str, Any]:
    """The adapter's record (`read_adapter_meta`), checked against the run config's method name."""
    meta, _ = read_adapter_meta(adapter)
    name = OmegaConf.select(cfg, "method.name")
    if name is not None and name != meta["method"]:
        raise ValueError(f"{adapter} holds a {meta['method']!r} adapter but the run's config says {name!r}")
    return meta


def load_adapted(adapter: Path, model_cfg: DictConfig) -> tuple[AdaptedModel, Any]:
    """(adapted model in eval mode, tokenizer): the base model of ``model_cfg`` with the adapter in
    ``adapter`` loaded, its parameters in ``model.adapter_dtype`` as in training. Shared by the export,
    lm-eval and `mtpeft.eval`."""
    base, tokenizer = load_base_model(model_cfg)
    return load_adapter(adapter, base, adapter_dtype(model_cfg)).eval(), tokenizer


def build_datamodule(cfg: DictConfig, tokenizer: Any) -> Any:
    """The run's datamodule, built as the run built it (same template, chat template, seed, sizes)."""
    from hydra.utils import instantiate

    datamodule = instantiate(
        cfg.data, tokenizer=tokenizer, chat_template=bool(cfg.model.get("chat_template"))
    )
    return datamodule


# -- merged standalone models ------------------------------------------------------------------------
def export_merged(run: LoadedRun, task: str, out_dir: str | Path) -> Path:
    """Write the standalone model of ``task`` (weights merged) and the tokenizer into ``out_dir``."""
    task_id = run.task_id(task)
    run.model.check_mergeable()  # before a second copy of the base is loaded
    merged = run.model.merge_into(run.fresh_base(), task_id)
    out_dir = Path(out_dir)
    with staged_dir(out_dir) as staging:  # a re-export replaces the directory whole
        merged.save_pretrained(staging)
        run.tokenizer.save_pretrained(staging)
        _write_info(staging, run, {"kind": "merged", "task": task, "task_id": task_id})
    return out_dir


def export_base_and_adapter(run: LoadedRun, out_dir: str | Path) -> Path:
    """Write ``base/`` (plain base model + tokenizer) and ``adapter/`` (a copy) into ``out_dir``.

    A peft adapter's ``base_model_name_or_path`` is pointed at the exported ``base/`` (absolute path), so
    ``AutoPeftModelForCausalLM.from_pretrained(<out>/adapter)`` finds it; the run's own value names its
    cache directory, which exists only on the machine that trained it."""
    out_dir = Path(out_dir)
    with staged_dir(out_dir / "base") as staging:  # a re-export replaces base/ and adapter/ whole
        run.fresh_base().save_pretrained(staging)
        run.tokenizer.save_pretrained(staging)
    with staged_dir(out_dir / "adapter") as staging:
        shutil.copytree(run.run_dir / "adapter", staging, dirs_exist_ok=True)
        peft_config = staging / ADAPTER_CONFIG
        if peft_config.is_file():
            config = json.loads(peft_config.read_text())
            if "base_model_name_or_path" in config:
                config["base_model_name_or_path"] = str((out_dir / "base").resolve())
                peft_config.write_text(json.dumps(config, indent=2) + "\n")
    _write_info(out_dir, run, {"kind": "base+adapter"})
    return out_dir


def _write_info(out_dir: Path, run: LoadedRun, extra: dict[str, Any]) -> None:
    info = {
        "run_dir": str(run.run_dir.resolve()),
        "method": run.model.method_name,
        "tasks": run.tasks,
        **extra,
    }
    write_json(out_dir / EXPORT_INFO, info)


# -- lm-eval tasks -----------------------------------------------------------------------------------
def lmeval_task_name(task: str, split: str) -> str:
    """The lm-eval task name of an exported mtpeft task split."""
    return f"mtpeft_{task}_{split}"


def export_lmeval_task(
    cfg: DictConfig, tokenizer: Any, task: str, split: str, out_dir: str | Path, datamodule: Any = None
) -> Path:
    """Write ``<name>.jsonl`` (``prompt``, ``answers``, ``index``) and ``<name>.yaml`` into ``out_dir``.

    The prompts are the run's own (its template and chat template), the generation budget is the
    task's (``evaluation.max_new_tokens`` when set), decoding is greedy, the score is exact match under
    SQuAD normalisation. Returns the YAML path.
    """
    datamodule = datamodule or build_datamodule(cfg, tokenizer)
    datamodule.setup("test")
    check_lmeval_task(datamodule, task)
    from mtpeft.metrics.base import golds

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = lmeval_task_name(task, split)
    data = out_dir / f"{name}.jsonl"
    with data.open("w") as lines:
        for index, record in enumerate(datamodule.records(split)):
            if record["task"] == task:  # index: the record's position in the split, as in scores.jsonl.gz
                prompt, _ = datamodule.template(record)
                lines.write(json.dumps({"prompt": prompt, "answers": golds(record), "index": index}) + "\n")
    budget = OmegaConf.select(cfg, "evaluation.max_new_tokens") or datamodule.max_new_tokens_for(task)
    (out_dir / f"{LMEVAL_METRIC_MODULE}.py").write_text(LMEVAL_METRIC_SOURCE)
    path = out_dir / f"{name}.yaml"
    path.write_text(lmeval_task_yaml(lmeval_task_spec(name, data.resolve(), int(budget))))
    return path


LMEVAL_METRIC = "exact_match"
"""The one metric an exported lm-eval task computes (SQuAD-normalised exact match, `LMEVAL_METRIC_SOURCE`)."""


def check_lmeval_task(datamodule: Any, task: str) -> None:
    """An error unless ``task`` is one of the run's tasks and scored by `LMEVAL_METRIC`."""
    if task not in datamodule.task_names:
        raise ValueError(f"task {task!r} is not in the run's data; its tasks: {datamodule.task_names}")
    metric = datamodule.metrics_for(task)[0]
    if metric != LMEVAL_METRIC:
        raise ValueError(
            f"task {task!r} is scored by {metric}, and an exported lm-eval task scores {LMEVAL_METRIC} only "
            f"(its score would not be mtpeft's); export the tasks scored by {LMEVAL_METRIC} "
            f"({', '.join(lmeval_tasks(datamodule)) or 'none in this run'}) or score {task!r} with "
            "python -m mtpeft.eval"
        )


def lmeval_tasks(datamodule: Any) -> list[str]:
    """The run's tasks whose score an exported lm-eval task reproduces: those scored by `LMEVAL_METRIC`."""
    return [t for t in datamodule.task_names if datamodule.metrics_for(t)[0] == LMEVAL_METRIC]


LMEVAL_METRIC_MODULE = "mtpeft_exact_match"
"""The module written beside every exported task YAML; its ``exact_match`` is the task's metric."""
LMEVAL_METRIC_SOURCE = '''"""mtpeft's exact match for lm-eval tasks exported by ``python -m mtpeft.export --lmeval-task``.

lm-eval's built-in exact_match cannot express SQuAD normalisation (it deletes regex matches before it drops
punctuation, and cannot collapse whitespace), so the exported tasks score with mtpeft's own normaliser.
lm-eval calls this with every gold answer of a record and one prediction repeated; 1.0 if any matches.
"""

from mtpeft.metrics.exact_match import normalize_answer


def exact_match(references, predictions, **kwargs):
    hits = [normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references)]
    return {"exact_match": float(any(hits))}
'''


@dataclass(frozen=True)
class LmevalFunction:
    """``!function <module>.<name>`` in an lm-eval task YAML: a function of a module beside the YAML."""

    reference: str


def lmeval_task_spec(name: str, data: Path, max_new_tokens: int) -> dict[str, Any]:
    """An lm-eval task config: local JSONL, greedy generation, mtpeft's SQuAD-normalised exact match."""
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "answers",
        "target_delimiter": "",
        "generation_kwargs": {"until": [], "max_gen_toks": max_new_tokens, "do_sample": False},
        "filter_list": [
            {"name": "strip", "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}]}
        ],
        "metric_list": [
            {
                "metric": LmevalFunction(f"{LMEVAL_METRIC_MODULE}.exact_match"),
                "aggregation": "mean",
                "higher_is_better": True,
            }
        ],
        "metadata": {"version": 1.0},
    }


def lmeval_task_yaml(spec: dict[str, Any]) -> str:
    """The YAML text of a task spec (`LmevalFunction` values as ``!function`` tags, which lm-eval resolves
    against the YAML's directory)."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(LmevalFunction, lambda d, f: d.represent_scalar("!function", f.reference))
    return yaml.dump(spec, Dumper=Dumper, sort_keys=False)


# -- command line ------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mtpeft.export",
        description="Export a finished run: merged standalone models (--merge), lm-eval tasks "
        "(--lmeval-task), or the plain base model plus the adapter (default).",
    )
    parser.add_argument(
        "run_dir", type=Path, help="run directory (.hydra/config.yaml, results.json, adapter/)"
    )
    parser.add_argument(
        "--task",
        action="append",
        help="task to export (repeatable; default: every task, for --lmeval-task every exact-match task)",
    )
    parser.add_argument("--merge", action="store_true", help="write one merged standalone model per task")
    parser.add_argument(
        "--lmeval-task", action="store_true", help="write lm-eval task YAML + JSONL per exact-match task"
    )
    parser.add_argument("--split", default="test", choices=("val", "test"), help="records for --lmeval-task")
    parser.add_argument("--out", type=Path, help="output directory (default: <run dir>/export)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the export; returns the exit status (2: the method cannot be merged, 1: bad input)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    out = args.out or args.run_dir / "export"
    try:
        written = _export(args, out)
    except NotMergeableError as err:
        print(f"mtpeft.export: error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"mtpeft.export: error: {err}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


def _export(args: argparse.Namespace, out: Path) -> list[Path]:
    if args.lmeval_task and not args.merge:
        cfg = read_run_config(args.run_dir)
        _, tokenizer = load_base_model(cfg.model)
        datamodule, tasks = _lmeval_choice(cfg, tokenizer, args.task)
        return [export_lmeval_task(cfg, tokenizer, t, args.split, out / "lmeval", datamodule) for t in tasks]
    run = load_run(args.run_dir)
    tasks = args.task or run.tasks
    for task in tasks:
        run.task_id(task)  # unknown names fail before anything is written
    if args.lmeval_task:  # and so do tasks an lm-eval task cannot score
        datamodule, chosen = _lmeval_choice(run.cfg, run.tokenizer, args.task)
    written: list[Path] = []
    if args.merge:
        written += [export_merged(run, t, out / f"merged-{t}") for t in tasks]
    else:
        written.append(export_base_and_adapter(run, out))
    if args.lmeval_task:
        out_dir = out / "lmeval"
        written += [
            export_lmeval_task(run.cfg, run.tokenizer, t, args.split, out_dir, datamodule) for t in chosen
        ]
    return written


def _lmeval_choice(cfg: DictConfig, tokenizer: Any, asked: list[str] | None) -> tuple[Any, list[str]]:
    """The run's datamodule (set up) and the tasks ``--lmeval-task`` exports: ``asked``, else every
    exact-match task; each checked (`check_lmeval_task`) before anything is written."""
    datamodule = build_datamodule(cfg, tokenizer)
    datamodule.setup("test")
    tasks = asked or _exact_match_tasks(datamodule)
    for task in tasks:
        check_lmeval_task(datamodule, task)
    return datamodule, tasks


def _exact_match_tasks(datamodule: Any) -> list[str]:
    """`lmeval_tasks`, saying on stderr which tasks it leaves out (none at all is an error)."""
    chosen = lmeval_tasks(datamodule)
    skipped = [t for t in datamodule.task_names if t not in chosen]
    if not chosen:
        raise ValueError(
            f"no task of this run is scored by {LMEVAL_METRIC}: nothing to export as an lm-eval task; score "
            "its tasks with python -m mtpeft.eval instead"
        )
    if skipped:
        print(
            f"mtpeft.export: --lmeval-task skips {', '.join(skipped)} (not scored by {LMEVAL_METRIC})",
            file=sys.stderr,
        )
    return chosen


def _results(run_dir: Path) -> dict[str, Any]:
    """The record of a finished run (``{}`` for a directory without ``results.json``); an unreadable record,
    or one of a run that is still running or failed, is an error saying what to do: such a run's
    ``adapter/`` may be partial or not its best checkpoint's, and its record lists the tasks in config
    order, not in the adapter's task-id order."""
    path = run_dir / "results.json"
    if not path.is_file():
        return {}
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{path} is unreadable ({err}): the run may have been killed while writing it; re-run its command "
            "(resume=auto finishes it) or pass another run directory"
        ) from None
    status = results.get("status") if isinstance(results, dict) else None
    if status != "success":
        detail = {"running": f", pid {results.get('pid')}", "failed": f": {results.get('error')}"}.get(
            status, ""
        )
        raise ValueError(
            f"{run_dir} is not a finished run: its results.json has status {status!r}{detail}. Pass the "
            "directory of a run that finished (status 'success'), or finish this one first (re-run its "
            "command; resume=auto continues from its last checkpoint)"
        )
    return results


if __name__ == "__main__":
    sys.exit(main())
