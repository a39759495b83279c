"""MultiLoRA (Wang et al. 2023, arXiv 2311.11501): n parallel LoRAs with learnable scales started at zero.

::

                   ┌──────────────── W0 (frozen) ──────────────────┐
        x ─────────┤                                               (+)──► y
                   ├► dropout ► A_1 ► B_1 ► ⊙ σ_1 ──┐              │
                   │   ...                         (Σ)── · alpha/r ┘
                   └► dropout ► A_n ► B_n ► ⊙ σ_n ──┘

    y = W0 x + (alpha / r) · Σ_i (B_i A_i dropout(x)) ⊙ σ_i,    σ_i ∈ R^{d_out} (or a scalar per LoRA)

``A_i`` and ``B_i`` are both Kaiming-uniform (a non-zero up-projection "democratises" the update) and
the scales ``σ_i`` start at zero, so the model starts as the base model; at step 0 only ``σ`` gets a
gradient. Task-agnostic. We fold ``σ_i`` into ``B_i`` (a [d_out, r] elementwise product) and run the n
LoRAs as one LoRA of rank n·r, so a step costs two matmuls, like LoRA.
Trainable parameters per adapted linear: ``n·r·(d_in + d_out) + n·d_out`` (``module`` scales: ``+ n``),
docs/methods.md 5h. Source: pUmpKin-Co/MTL-LoRA @ 7848a70, ``src/adapter/multilora.py`` (``MultiLoRALinear``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from mtpeft.adapters.base import AdaptedModel
from mtpeft.adapters.inject import wrap_modules
from mtpeft.adapters.lowrank import LowRankConfig, LowRankLinear, kaiming_uniform_, target_shapes
from mtpeft.adapters.registry import register_method
from mtpeft.utils.schema import PositiveInt, config_dataclass


@config_dataclass
class MultiLoRAConfig(LowRankConfig):
    num_loras: PositiveInt = 3
    """n, the number of parallel LoRAs (MTL-LoRA repo baseline ``lora_num 3``; the paper's n UNVERIFIED)."""
    scale_granularity: Literal["channel", "module"] = "channel"
    """σ_i per output channel (reference re-implementation) or one scalar per LoRA (docs/methods.md 5i)."""


class MultiLoRALinear(LowRankLinear):
    """``W0 x + s · Σ_i (B_i A_i dropout(x)) ⊙ σ_i`` (see the module docstring)."""

    def __init__(self, base_layer: nn.Linear, config: MultiLoRAConfig) -> None:
        super().__init__(base_layer, config.r, config.alpha, config.dropout)
        n, r = config.num_loras, config.r
        self.lora_A = self.new_parameter(n, r, self.in_features)
        self.lora_B = self.new_parameter(n, self.out_features, r)
        self.lora_scaling = self.new_parameter(
            n, self.out_features if config.scale_granularity == "channel" else 1
        )
        kaiming_uniform_(self.lora_A)
        kaiming_uniform_(self.lora_B)
        with torch.no_grad():
            self.lora_scaling.fill_(0.0 if config.init_weights else 1.0)

    def delta(self, x: torch.Tensor, task_ids: torch.Tensor | None) -> torch.Tensor:
        n, r, d_in = self.lora_A.shape
        a = self.lora_A.reshape(n * r, d_in)  # [n·r, d_in]
        b = (self.lora_B * self.lora_scaling[:, :, None]).permute(1, 0, 2).reshape(self.out_features, n * r)
        x = self.dropout(x.to(a.dtype))
        return (x @ a.T) @ (b.T * self.scaling)


def multilora_delta_weight(layer: MultiLoRALinear) -> torch.Tensor:
    """``ΔW = (alpha/r) · Σ_i (σ_i ⊙ B_i) A_i`` [d_out, d_in] of one layer (the merged update)."""
    n, r, d_in = layer.lora_A.shape
    b = (layer.lora_B * layer.lora_scaling[:, :, None]).permute(1, 0, 2).reshape(layer.out_features, n * r)
    return (b @ layer.lora_A.reshape(n * r, d_in)) * layer.scaling


@register_method("multilora")
class MultiLoRA(AdaptedModel):
    """MultiLoRA on the target linears; task ids are ignored."""

    config_class = MultiLoRAConfig

    def adapt(self) -> None:
        self.adapted = wrap_modules(
            self.base_model, self.config.targets, lambda _, lin: MultiLoRALinear(lin, self.config)
        )

    def merged_weight_deltas(self, task_id: int) -> dict[str, torch.Tensor]:
        """The same ``ΔW`` for every task (task-agnostic)."""
        return {name: multilora_delta_weight(layer) for name, layer in self.adapted.items()}

    def expected_trainable_parameters(self) -> int:
        cfg = self.config
        n, channel = cfg.num_loras, cfg.scale_granularity == "channel"
        return sum(
            n * cfg.r * (d_in + d_out) + n * (d_out if channel else 1)
            for d_in, d_out in target_shapes(self.base_model.config, self.adapted)
        )
