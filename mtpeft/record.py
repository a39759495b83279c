"""The run record: what a run's ``results.json`` holds, as one typed model.

`mtpeft.run` (training) and `mtpeft.eval` (scoring a saved adapter) write it, `mtpeft.results` reads it.
A record goes through three statuses (`mtpeft.utils.sweep`): ``running`` (written when the run starts:
labels, config, hashes, inputs, start time, pid, host), then ``success`` (scores and costs) or ``failed``
(the error and its traceback). Fields a status does not have are simply absent from the file.

Reading is where records of every mtpeft version meet, so the rules for older records live here, in
`RunRecord.fill_older_fields` and in the field defaults, and nowhere else:

* ``method``, ``seed`` and ``tasks`` missing (or empty) are taken from the stored config
  (``config.method.name``, ``config.seed``, the keys of ``config.data.tasks``): early ``running`` records
  and hand-written ones had only the config;
* ``kind`` missing means a training run (only `mtpeft.eval` writes ``kind: eval``);
* every other field missing is None: records before RESULTS_VERSION 2 have no ``job_hash``, ``inputs``,
  ``resumed_from`` nor ``eval_s_per_1000_prompts``, and none has the fields of the other statuses;
* ``peak_memory_mb`` is a `PeakMemory` object (the CUDA allocator peak on GPU, the process's peak resident
  memory on CPU) or, in hand-written records, a plain number of MB;
* ``config_resolved`` missing means true (only a failure that happened while resolving the config stores
  the raw config, with ``config_resolved: false``).

Unknown fields are rejected (``extra="forbid"``): a writer that adds a field adds it here first, so every
field of a ``results.json`` is declared, typed and documented in one place. Records are written with the
fields their writer set and no others (`RunRecord.to_json`), so the files look as before this model.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

log = logging.getLogger(__name__)
Status = Literal["running", "success", "failed"]
Kind = Literal["train", "eval"]
TRAIN: Kind = "train"
EVAL: Kind = "eval"
Scores = dict[str, float | int | None]
"""One split's metrics: ``<split>/<task>/<metric>`` -> value."""


class PeakMemory(BaseModel):
    """Peak memory of a run (`mtpeft.utils.memory.peak_memory_mb`), MB."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    cpu_peak_rss_mb: float | None = None
    """Peak resident memory of the process."""
    cpu_peak_rss_scope: str | None = None
    """``run`` (reset at the run's start) or ``process`` (since the process started)."""
    cuda_peak_allocated_mb: float | None = None
    """Peak of the CUDA caching allocator (GPU runs only)."""

    @property
    def mb(self) -> float | None:
        """The number a table shows: the CUDA peak when recorded, else the CPU peak."""
        return (
            self.cuda_peak_allocated_mb if self.cuda_peak_allocated_mb is not None else self.cpu_peak_rss_mb
        )


class RunRecord(BaseModel):
    """One ``results.json`` (module docstring: statuses, and the defaults for older records)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    # -- every status
    status: Status
    """``running`` (started; killed if it stays so), ``success`` or ``failed``."""
    kind: Kind = TRAIN
    """``train`` (`mtpeft.run`) or ``eval`` (`mtpeft.eval`: re-scores a trained adapter)."""
    method: str | None = None
    """The method's registry name."""
    model: dict[str, Any] | None = None
    """The base model as built (`mtpeft.models.loader.describe_model`); the config's ``model`` node is
    what was asked for."""
    tasks: list[str] = []
    """Task names in task-id order."""
    split: str | None = None
    """The split an evaluation scored (``kind: eval`` only; a training run has ``val`` and ``test``)."""
    seed: int | None = None
    config: dict[str, Any]
    """The resolved config (the raw one when resolving it failed: ``config_resolved: false``)."""
    config_resolved: bool = True
    config_hash: str | None = None
    job_hash: str | None = None
    """Config hash plus the inputs' digests (`mtpeft.utils.confighash.job_hash`)."""
    inputs: dict[str, Any] | None = None
    """Data file digests and code version that make up the job hash."""
    # -- running
    started: str | None = None
    pid: int | None = None
    host: str | None = None
    interrupted: str | None = None
    """A ``running`` record whose process died: what happened, and the run that took over."""
    superseded_by: str | None = None
    superseded_at: str | None = None
    # -- success
    metrics: dict[str, Scores] | None = None
    """Per split (``val``: the best checkpoint's; ``test``), ``<split>/<task>/<metric>`` -> value."""
    best_checkpoint: str | None = None
    trainable_params: int | None = None
    total_params: int | None = None
    trainable_percent: float | None = None
    wall_time_s: float | None = None
    train_time_s: float | None = None
    train_tokens_per_s: float | None = None
    eval_s_per_1000_prompts: float | None = None
    """Seconds of evaluation batches (loss + generation) per 1000 prompts."""
    peak_memory_mb: PeakMemory | float | None = None
    eval_batch_size: int | None = None
    template: str | None = None
    torch_threads: int | None = None
    provenance: dict[str, Any] | None = None
    """Git commit, package versions, device (`mtpeft.utils.provenance`)."""
    resumed_from: str | None = None
    """The checkpoint a training run resumed from (None: it started fresh)."""
    adapter: dict[str, Any] | None = None
    """``kind: eval``: the adapter scored and the run that trained it."""
    task_ids: dict[str, int | None] | None = None
    """``kind: eval``: each evaluated task's id in the adapter's trained task list (None: not trained)."""
    # -- failed
    error: str | None = None
    traceback: str | None = None

    @model_validator(mode="before")
    @classmethod
    def fill_older_fields(cls, data: Any) -> Any:
        """Labels missing from a record come from its config (module docstring)."""
        if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
            return data
        config = data["config"]
        method = config.get("method") if isinstance(config.get("method"), dict) else {}
        tasks = config.get("data", {}).get("tasks") if isinstance(config.get("data"), dict) else None
        filled = dict(data)
        if not filled.get("method") and method.get("name"):
            filled["method"] = method["name"]
        if filled.get("seed") is None and config.get("seed") is not None:
            filled["seed"] = config["seed"]
        if not filled.get("tasks") and isinstance(tasks, dict | list):
            filled["tasks"] = list(tasks)
        return filled

    @model_validator(mode="after")
    def _success_has_metrics(self) -> RunRecord:
        if self.status == "success" and self.metrics is None:
            raise ValueError("says status 'success' but has no 'metrics' object")
        return self

    @property
    def peak_mb(self) -> float | None:
        """Peak memory in MB (`PeakMemory.mb`), None when not recorded."""
        if isinstance(self.peak_memory_mb, PeakMemory):
            return self.peak_memory_mb.mb
        return self.peak_memory_mb

    def scores(self, split: str) -> Scores:
        """The metrics of ``split`` (empty when the run has none)."""
        return (self.metrics or {}).get(split) or {}

    def to_json(self) -> dict[str, Any]:
        """The dict written to ``results.json``: the fields the writer set, nothing else."""
        return self.model_dump(exclude_unset=True)


def checked(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` validated as a `RunRecord` (raises pydantic's ValidationError naming the field)."""
    return RunRecord.model_validate(record).to_json()


def checked_failure(record: dict[str, Any]) -> dict[str, Any]:
    """A ``failed`` record validated like `checked`, but written as it is if it does not validate (with a
    warning): it is written while an error propagates, and losing the error would be worse than an
    undeclared field (`mtpeft.results` then lists the file as not a run record, with the reason)."""
    try:
        return checked(record)
    except ValidationError as err:
        log.warning("the failure record does not validate as a RunRecord (%s); written as it is", err)
        return record


def parse_record(data: Any) -> tuple[RunRecord | None, str | None]:
    """(record, None) for a parsed results.json that is a run record, else (None, why it is not)."""
    if not isinstance(data, dict):
        return None, f"holds a JSON {type(data).__name__}, not a run record (an object)"
    try:
        return RunRecord.model_validate(data), None
    except ValidationError as err:
        return None, "not a run record: " + "; ".join(_describe(e) for e in err.errors())


def _describe(error: Any) -> str:
    """One pydantic error as ``field: message (got value)``."""
    where = ".".join(str(part) for part in error["loc"]) or "record"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] in ("missing", "value_error") or "input" not in error:
        return f"{where}: {message}"
    return f"{where}: {message} (got {error['input']!r:.80})"
