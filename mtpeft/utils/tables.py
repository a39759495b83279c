"""Rich tables printed at the start and end of a run."""

from __future__ import annotations

from collections.abc import Mapping

from rich.console import Console
from rich.table import Table
from torch import nn


def parameter_table(model: nn.Module, title: str, max_rows: int = 12) -> Table:
    """Trainable parameters grouped by module type path (first rows) with the total."""
    table = Table(title=title)
    table.add_column("trainable parameter")
    table.add_column("shape")
    table.add_column("count", justify="right")
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for name, param in trainable[:max_rows]:
        table.add_row(name, str(tuple(param.shape)), f"{param.numel():,}")
    if len(trainable) > max_rows:
        table.add_row(f"... {len(trainable) - max_rows} more tensors", "", "")
    total = sum(p.numel() for p in model.parameters())
    count = sum(p.numel() for _, p in trainable)
    table.add_row(
        "[bold]total trainable[/bold]", f"{100 * count / max(total, 1):.3f}% of {total:,}", f"{count:,}"
    )
    return table


def results_table(metrics: Mapping[str, float], split: str, title: str) -> Table:
    """One row per task: its metric and score; the macro average last."""
    table = Table(title=title)
    table.add_column("task")
    table.add_column("metric")
    table.add_column("score", justify="right")
    tasks = sorted(
        {k.split("/")[1] for k in metrics if k.startswith(f"{split}/") and k.count("/") == 2} - {"avg"}
    )
    for task in tasks:
        named = [
            k
            for k in metrics
            if k.startswith(f"{split}/{task}/") and k.rsplit("/", 1)[1] not in ("score", "loss")
        ]
        metric = named[0].rsplit("/", 1)[1] if named else "score"
        table.add_row(task, metric, f"{metrics[f'{split}/{task}/score']:.3f}")
    if f"{split}/avg/score" in metrics:
        table.add_row("[bold]average[/bold]", "macro", f"[bold]{metrics[f'{split}/avg/score']:.3f}[/bold]")
    return table


def print_table(table: Table) -> None:
    Console().print(table)
