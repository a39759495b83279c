"""Plumbing shared by our own low-rank linear adapters (MTL-LoRA, MultiLoRA, MoE-LoRA).

Each of those methods replaces a target ``nn.Linear`` by a subclass of `LowRankLinear`, which keeps the
frozen layer as ``base_layer`` and adds the method's update::

    y = base_layer(x) + delta(x, task_ids)          (delta already scaled by alpha / r)

The common config fields (rank, alpha, dropout, targets, init switch) live in `LowRankConfig`, and
`target_shapes` gives the closed-form ``(d_in, d_out)`` of every adapted linear for the parameter
formulas of docs/methods.md (read off the model config, not off the instantiated modules).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import field
from typing import Annotated, Any

import torch
from pydantic import AfterValidator
from torch import nn

from mtpeft.adapters.base import MethodConfig
from mtpeft.adapters.shapes import decoder_shape
from mtpeft.utils.schema import Bool, Dropout, Float, PositiveInt, Str, config_dataclass

ATTENTION_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _some_targets(targets: list[str]) -> list[str]:
    if not targets:
        raise ValueError("must name at least one linear layer, e.g. [q_proj, v_proj]")
    return targets


Targets = Annotated[list[Str], AfterValidator(_some_targets)]
"""Leaf names (or full-match regular expressions) of the linears a method adapts; at least one."""


@config_dataclass
class LowRankConfig(MethodConfig):
    """Fields every low-rank method shares; method configs subclass this and add their own."""

    r: PositiveInt = 8
    """Rank of each low-rank update (MTL-LoRA README example and repo scripts: 8)."""
    alpha: Float = 16.0
    """Scale numerator: updates are multiplied by alpha / r (MTL-LoRA README example: 16)."""
    dropout: Dropout = 0.05
    """Dropout on the adapter input (MTL-LoRA scripts and MixLoRA README: 0.05)."""
    targets: Targets = field(default_factory=lambda: list(ATTENTION_TARGETS))
    """Linear layers to adapt (regular expressions matched in full against the leaf name); q,k,v,o
    as in the MTL-LoRA repo scripts."""
    init_weights: Bool = True
    """True: the update starts at zero (identity at init). False: a random non-zero start, for tests."""


def kaiming_uniform_(tensor: torch.Tensor) -> torch.Tensor:
    """Kaiming-uniform (a=sqrt(5), the ``nn.Linear`` default) on each trailing 2-D slice of ``tensor``.

    Stacked weights ``[n, rows, cols]`` are initialised slice by slice, as the reference code does
    (``for i: kaiming_uniform_(w[i])``), so the bound is ``1/sqrt(cols)`` and not ``1/sqrt(rows*cols)``.
    """
    with torch.no_grad():
        for piece in tensor.view(-1, *tensor.shape[-2:]) if tensor.dim() > 2 else [tensor]:
            nn.init.kaiming_uniform_(piece, a=math.sqrt(5))
    return tensor


def target_shapes(model_config: Any, names: Iterable[str]) -> list[tuple[int, int]]:
    """Closed-form ``(d_in, d_out)`` of the adapted linears ``names`` (read off the model config)."""
    shape = decoder_shape(model_config)
    return [shape.linear(name.rsplit(".", 1)[-1]) for name in names]


def require_task_ids(task_ids: torch.Tensor | None, where: str) -> torch.Tensor:
    """The task ids injected into a task-conditioned layer; a clear error when there are none."""
    if task_ids is None:
        raise ValueError(
            f"{where} is task-conditioned but got no task_ids; call the adapted model's forward()/"
            "generate() with task_ids=LongTensor[B], not the wrapped Hugging Face model"
        )
    return task_ids


class LowRankLinear(nn.Module):
    """A frozen ``nn.Linear`` (``base_layer``) plus a method-specific update ``delta``."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.r = r
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def weight(self) -> torch.Tensor:
        """The frozen weight, for code that reads ``proj.weight`` (dtype/device probes)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def new_parameter(self, *shape: int) -> nn.Parameter:
        """An (uninitialised) adapter parameter on the frozen layer's device and dtype."""
        weight = self.base_layer.weight
        return nn.Parameter(torch.empty(*shape, device=weight.device, dtype=weight.dtype))

    def delta(self, x: torch.Tensor, task_ids: torch.Tensor | None) -> torch.Tensor:
        """The scaled update for input ``x`` (same leading shape as ``x``, last dim ``out_features``)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        result = self.base_layer(x)
        return result + self.delta(x, task_ids).to(result.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}"
