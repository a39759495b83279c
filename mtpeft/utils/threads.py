"""CPU thread count for torch: ``cpu_threads`` = ``auto`` (default), an integer, or ``null``.

Why not torch's default (one thread per logical core): OpenMP threads spin while they wait, so when other
processes keep the cores busy a step can get 40x slower (measured on 2 shared cores: tiny-model
pre-training went from 0.06 to 2.4 s/step). Small matrices gain little from more threads anyway.

``auto`` picks, in this order:

1. **1 thread for narrow models** (``hidden_size <= 512``; the tiny models are 128 wide): their matmuls
   are too small to split profitably, and one thread never oversubscribes. Deterministic.
2. otherwise **the free physical cores**: the physical cores this process may run on (CPU affinity,
   hyper-threads of one core counted once) minus the busy ones (the integer part of the 1-minute load
   average), at least 1 and never more than the physical cores.

The width comes from the model config (``hidden_size``; a ``kind: tiny`` node without it has the tiny
default). A hub model's width is unknown before loading, so rule 2 applies. An integer is used as given;
``null`` leaves torch's default (the old behaviour). The count in use is written to ``results.json``
(``torch_threads``); ``cpu_threads`` is not part of the config hash (it does not change what a run computes
up to floating-point summation order).

Building the tiny model (pre-training) inside a process that never called ``apply_cpu_threads`` (a test, a
notebook, the bench) uses the ``auto`` rule for that model; after ``apply_cpu_threads`` it keeps the
process's choice.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

AUTO = "auto"
#: Models at most this wide train on one thread under ``auto``.
NARROW_HIDDEN_SIZE = 512

_chosen = False
"""Whether this process chose its thread count through ``apply_cpu_threads``."""


def physical_cores(cpus: Iterable[int] | None = None) -> int:
    """Physical cores among ``cpus`` (default: the CPUs this process may run on), at least 1.

    Logical CPUs that share a ``(package, core)`` in ``/sys/devices/system/cpu`` count once; where the
    topology cannot be read (non-Linux), every logical CPU counts.
    """
    if cpus is None:
        cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores: set[tuple[str, str]] = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            package = (topology / "physical_package_id").read_text().strip()
            core = (topology / "core_id").read_text().strip()
        except OSError:
            package, core = "cpu", str(cpu)
        cores.add((package, core))
    return max(1, len(cores))


def load_average() -> float:
    """1-minute load average (runnable processes); 0 where the platform has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def model_width(model_cfg: Mapping[str, Any] | None) -> int | None:
    """``hidden_size`` of the model node, the tiny default for ``kind: tiny``, else None (unknown)."""
    if not model_cfg:
        return None
    if model_cfg.get("hidden_size") is not None:
        return int(model_cfg["hidden_size"])
    if model_cfg.get("kind") == "tiny":
        from mtpeft.models.tiny import TinyModelConfig

        return TinyModelConfig.hidden_size
    return None


def auto_threads(width: int | None, cores: int, load: float) -> tuple[int, str]:
    """The ``auto`` rule (module docstring) on explicit inputs; returns ``(threads, reason)``."""
    if width is not None and width <= NARROW_HIDDEN_SIZE:
        return 1, f"hidden_size {width} <= {NARROW_HIDDEN_SIZE}"
    busy = math.floor(max(load, 0.0))
    threads = max(1, min(cores, cores - busy))
    return threads, f"{cores} physical cores, load {load:.1f}"


def resolve_cpu_threads(setting: Any, model_cfg: Mapping[str, Any] | None = None) -> int | None:
    """The thread count ``setting`` stands for (None: leave torch's default); raises on invalid values."""
    return _resolve(setting, model_cfg)[0]


def _resolve(setting: Any, model_cfg: Mapping[str, Any] | None) -> tuple[int | None, str]:
    if setting is None:
        return None, "torch's default"
    if setting == AUTO:
        return auto_threads(model_width(model_cfg), physical_cores(), load_average())
    if isinstance(setting, int) and not isinstance(setting, bool) and setting >= 1:
        return setting, "set explicitly"
    raise ValueError(
        f"cpu_threads={setting!r} is invalid: use auto (safe default), an integer >= 1, or null (torch's "
        "default, one thread per logical core)"
    )


def apply_cpu_threads(setting: Any, model_cfg: Mapping[str, Any] | None = None) -> int:
    """Set torch's intra-op threads from ``cpu_threads`` (``auto`` | int | ``None``); return the count in use."""
    global _chosen
    threads, reason = _resolve(setting, model_cfg)
    _chosen = True
    if threads is not None:
        torch.set_num_threads(threads)
    log.info("cpu_threads=%s: %d torch threads (%s)", setting, torch.get_num_threads(), reason)
    return torch.get_num_threads()


def build_threads(model_cfg: Mapping[str, Any] | None) -> int | None:
    """Threads for building (pre-training) a model: the process's choice if it made one, else ``auto``."""
    return None if _chosen else resolve_cpu_threads(AUTO, model_cfg)


@contextlib.contextmanager
def using_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch threads (None: unchanged), restoring the previous count."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
