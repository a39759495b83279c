"""Method benchmark: the training step of every method relative to LoRA, eager and compiled.

The variants come from the registry: every registered method's ``bench_variants`` (by default the method as
its yaml sets it; a method declares its speed-relevant settings, e.g. ``method=moe_lora
method.num_experts=8``), with the ``bench_reference`` method (LoRA) first. Each variant is the run config
composed with its overrides on the base model of ``model=``, so any model config can be measured. A step is
what a training step computes: forward + token-mean cross-entropy without full logits + per-task reduction
(`mtpeft.module.chunked_losses`; the compiled step: `mtpeft.module.forward_losses`, as ``compile: true``
trains) + aux losses + backward + AdamW update, timed on two kinds of input:

* a fixed random batch (``--batch`` x ``--length`` tokens, no padding, random task ids);
* real batches: the first ``--real-batches`` training batches of the run's datamodule (``data=``), with their
  padding and lengths, one step per batch (the mean is reported).

With ``--compile`` the real batches are also run through the compiled step (``compile: true``); warm-up rounds
absorb the compilation. Variants are interleaved (warm-up rounds, then timed rounds that run every variant once
in turn) and the median per variant is reported, so slow drifts of a shared machine hit every variant alike.
Interleaving keeps every variant alive at once (its own copy of the base model, its optimisers); for a real
model that is several GB per variant, so ``--sequential`` builds, times and frees one variant after the other
(same rounds and medians, without the protection against drifts). Gradient checkpointing follows the run
config (``gradient_checkpointing``), as in training.
Also reported: activation memory saved for backward on the random batch (bytes of the tensors autograd keeps
in the forward of a training step; on CUDA the allocator's peak of the whole step instead) and trainable
parameters. Timings are never asserted in tests.
"""

from __future__ import annotations

import functools
import gc
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mtpeft.bench.config import RunParts
from mtpeft.methods import AdaptedModel, available_methods, get_method
from mtpeft.module import chunked_losses, compile_training_step


def reference_method() -> str:
    """The registered method the benchmark's ratios are relative to (the one with ``bench_reference``)."""
    names = [name for name in available_methods() if get_method(name).bench_reference]
    if len(names) != 1:
        raise RuntimeError(
            f"exactly one registered method must set bench_reference = True, found {names or 'none'}"
        )
    return names[0]


def method_variants() -> dict[str, list[str]]:
    """Variant label -> overrides of the run config, for every registered method's declared
    ``bench_variants`` (`AdaptedModel.bench_variants`); the reference method's first variant comes first."""
    reference = reference_method()
    variants = {}
    for name in [reference, *(n for n in available_methods() if n != reference)]:
        for suffix, overrides in get_method(name).bench_variants.items():
            variants[f"{name} {suffix}".strip()] = [f"method={name}", *overrides]
    return variants


Batch = dict[str, torch.Tensor]
Step = Callable[[Batch], None]


def random_batch(batch: int, length: int, vocab: int, num_tasks: int, device: torch.device) -> Batch:
    """``batch`` x ``length`` random tokens (ids >= 3, no padding), answer loss on every token."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, length), generator=gen)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "labels": ids.to(device),
        "task_ids": torch.randint(0, num_tasks, (batch,), generator=gen).to(device),
    }


def make_step(model: AdaptedModel, num_tasks: int, compiled: bool) -> Step:
    """One optimiser step of ``model`` on a batch (eager, or the compiled step of ``compile: true``)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    losses = compile_training_step(model) if compiled else functools.partial(chunked_losses, model)

    def step(batch: Batch) -> None:
        inputs = (batch["input_ids"], batch["attention_mask"], batch["task_ids"], batch["labels"])
        loss = losses(*inputs, num_tasks)[0]
        for value in model.aux_losses().values():
            loss = loss + value
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def saved_activation_mb(model: AdaptedModel, batch: Batch, num_tasks: int) -> float:
    """MB of tensors autograd saves for backward in the forward of a training step (storage counted once).

    The backward runs too (gradients dropped): it frees the graph, which routers' records of the last forward
    would otherwise keep alive, with every activation, until the model's next forward."""
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    inputs = (batch["input_ids"], batch["attention_mask"], batch["task_ids"], batch["labels"])
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = chunked_losses(model, *inputs, num_tasks)[0]
        for value in model.aux_losses().values():
            loss = loss + value
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values()) / 2**20


@dataclass
class Timer:
    """Median wall and CPU time per step of one workload (a step function over a list of batches).

    CPU time (this process, all its threads) is the steadier figure on a shared machine: waiting for a core
    does not count.
    """

    step: Step
    batches: Sequence[Batch]
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def run(self, record: bool, cuda: bool) -> None:
        if cuda:
            torch.cuda.synchronize()
        start, start_cpu = time.perf_counter(), time.process_time()
        for batch in self.batches:
            self.step(batch)
        if cuda:
            torch.cuda.synchronize()
        if record:
            self.wall.append((time.perf_counter() - start) / len(self.batches))
            self.cpu.append((time.process_time() - start_cpu) / len(self.batches))

    @property
    def ms(self) -> float:
        return 1000 * statistics.median(self.wall) if self.wall else float("nan")

    @property
    def cpu_ms(self) -> float:
        return 1000 * statistics.median(self.cpu) if self.cpu else float("nan")


@dataclass
class Variant:
    """One benchmarked variant: its model, memory figure and timed workloads (random, real, compiled)."""

    model: AdaptedModel
    memory_mb: float
    timers: dict[str, Timer]

    def row(self, label: str) -> dict[str, Any]:
        row: dict[str, Any] = {name: timer.ms for name, timer in self.timers.items()}
        row.update({f"{name}_cpu": timer.cpu_ms for name, timer in self.timers.items()})
        row.update(variant=label, memory_mb=self.memory_mb, trainable=self.model.count_parameters()[0])
        return row


def run_methods(
    parts: RunParts,
    variants: dict[str, list[str]],
    compose: Callable[[list[str]], Any],
    *,
    batch: int,
    length: int,
    real_batches: int,
    repeats: int,
    warmup: int,
    compiled: bool,
    sequential: bool = False,
) -> tuple[list[dict[str, Any]], torch.device]:
    """Time every variant, interleaved rounds (or one variant after the other with ``sequential``, which
    holds one variant in memory at a time); one row per variant with ms per step and memory."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vocab = parts.base_model.get_input_embeddings().weight.shape[0]
    fixed = random_batch(batch, length, vocab, parts.num_tasks, device)
    keys = ("input_ids", "attention_mask", "labels", "task_ids")
    real = [{k: b[k].to(device) for k in keys} for b in parts.train_batches(real_batches)]

    def build(overrides: list[str]) -> Variant:
        cfg = compose(overrides)
        model = parts.fresh_method(cfg).to(device)
        memory = _memory_mb(model, fixed, device, parts.num_tasks)
        timers = {
            "random": Timer(make_step(model, parts.num_tasks, compiled=False), [fixed]),
            "real": Timer(make_step(model, parts.num_tasks, compiled=False), real),
        }
        if compiled:
            twin = parts.fresh_method(cfg).to(device)  # compiled on its own copy
            timers["compiled"] = Timer(make_step(twin, parts.num_tasks, compiled=True), real)
        return Variant(model, memory, timers)

    def time_rounds(built: list[Variant]) -> None:
        for round_ in range(warmup + repeats):
            for variant in built:
                for timer in variant.timers.values():
                    timer.run(record=round_ >= warmup, cuda=device.type == "cuda")

    if not sequential:
        built = {label: build(overrides) for label, overrides in variants.items()}
        time_rounds(list(built.values()))
        return [variant.row(label) for label, variant in built.items()], device
    rows = []
    for label, overrides in variants.items():
        variant = build(overrides)
        time_rounds([variant])
        rows.append(variant.row(label))
        del variant
        gc.collect()
    return rows, device


def _memory_mb(model: AdaptedModel, batch: Batch, device: torch.device, num_tasks: int) -> float:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        make_step(model, num_tasks, compiled=False)(batch)
        return torch.cuda.max_memory_allocated() / 2**20
    return saved_activation_mb(model, batch, num_tasks)


def methods_markdown(rows: list[dict[str, Any]], device: torch.device, compiled: bool) -> list[str]:
    """The per-method table: ms/step (wall and CPU) and ratios to the reference (the first row) on random and
    real batches, compiled/eager."""
    ref = rows[0]
    times = f"x {ref['variant']}"
    memory = "peak CUDA MB" if device.type == "cuda" else "saved activations MB"
    columns = [("random", "random"), ("real", "real"), ("real_cpu", "real, CPU")]
    head = "| variant | " + " | ".join(f"{title} ms | {times}" for _, title in columns) + " |"
    rule = "|---|" + "---:|---:|" * len(columns)
    if compiled:
        head += " compiled real ms | compiled / eager | compiled / eager (CPU) |"
        rule += "---:|---:|---:|"
    lines = [f"{head} {memory} | {times} | trainable |", f"{rule}---:|---:|---:|"]
    for row in rows:
        cells = [row["variant"]]
        for key, _ in columns:
            cells += [f"{row[key]:.1f}", f"{row[key] / ref[key]:.2f}"]
        if compiled:
            cells += [
                f"{row['compiled']:.1f}",
                f"{row['compiled'] / row['real']:.2f}",
                f"{row['compiled_cpu'] / row['real_cpu']:.2f}",
            ]
        cells += [
            f"{row['memory_mb']:.1f}",
            f"{row['memory_mb'] / ref['memory_mb']:.2f}",
            f"{row['trainable']:,}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines
