"""MTL-LoRA (Yang et al., AAAI 2025, arXiv 2410.09437): task-specific transform in a shared low-rank space.

::

                   ┌──────────────── W0 (frozen) ───────────────────────┐
        x ─────────┤                                                    (+)──► y
                   └► dropout ► A (r×d_in, shared) ► Λ_t (r×r) ► B_t ───┘
                                                                  ▲
                       B_t = Σ_i softmax(w_t / τ)_i · B_i   (n shared up-projections B_i ∈ R^{d_out×r})

    y = W0 x + (alpha / r) · B_t Λ_t A dropout(x),        t = task id of the sequence

``A`` is Kaiming-uniform, ``Λ_t`` the identity (``diag``: ones), the ``B_i`` zero, so the model starts as
the base model; the mixing logits ``w`` ([T, n] per adapted linear) are Kaiming-uniform as in the
reference code, so the initial mixing is random and, with τ = 0.1, sharp. Mixing the ``B_i`` in parameter
space equals mixing the outputs because ``A`` and ``Λ_t`` are shared within a sample; we go one step
further and form ``M_t = B_t Λ_t`` for the T tasks (T·d_out·r·(n+r) flops, independent of the batch), so
the batch needs one ``bmm`` against its rows' ``M_t``. Task ids are required at training and inference.
Trainable parameters per adapted linear: ``r·d_in + T·r² (diag: T·r) + n·r·d_out + T·n`` (docs/methods.md 4h).
Source: pUmpKin-Co/MTL-LoRA @ 7848a70, ``src/adapter/mlora.py`` (``mLoRALinear``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mtpeft.adapters.base import AdaptedModel
from mtpeft.adapters.inject import wrap_modules
from mtpeft.adapters.lowrank import (
    LowRankConfig,
    LowRankLinear,
    kaiming_uniform_,
    require_task_ids,
    target_shapes,
)
from mtpeft.adapters.registry import register_method
from mtpeft.utils.schema import PositiveFloat, PositiveInt, config_dataclass


@config_dataclass
class MTLLoRAConfig(LowRankConfig):
    num_up: PositiveInt = 3
    """n, the number of shared up-projections B_i (reference script ``num_B 3``)."""
    tau: PositiveFloat = 0.1
    """Temperature of the per-task softmax over the B_i (reference script ``temperature 0.1``)."""
    lambda_format: Literal["full", "diag"] = "full"
    """Λ_t as a full r×r matrix (reference script, ``diagonal_format=False``) or a diagonal (AdapterHub)."""
    init_w: Literal["kaiming", "ones"] = "kaiming"
    """Init of the mixing logits w: Kaiming-uniform as the reference code, or ones (uniform, AdapterHub)."""


class MTLLoRALinear(LowRankLinear):
    """``W0 x + s · B_t Λ_t A dropout(x)`` with per-sample task ``t`` (see the module docstring)."""

    def __init__(self, base_layer: nn.Linear, config: MTLLoRAConfig, num_tasks: int) -> None:
        super().__init__(base_layer, config.r, config.alpha, config.dropout)
        r, n = config.r, config.num_up
        self.tau = config.tau
        self.diagonal = config.lambda_format == "diag"
        self.lora_A = self.new_parameter(r, self.in_features)
        self.lora_lambdas = (
            self.new_parameter(num_tasks, r) if self.diagonal else self.new_parameter(num_tasks, r, r)
        )
        self.lora_B = self.new_parameter(n, self.out_features, r)
        self.lora_B_w = self.new_parameter(num_tasks, n)
        with torch.no_grad():
            kaiming_uniform_(self.lora_A)
            if self.diagonal:
                self.lora_lambdas.fill_(1.0)
            else:
                self.lora_lambdas.copy_(torch.eye(r).expand(num_tasks, r, r))
            if config.init_weights:
                self.lora_B.zero_()
            else:
                kaiming_uniform_(self.lora_B)
            if config.init_w == "kaiming":
                kaiming_uniform_(self.lora_B_w)
            else:
                self.lora_B_w.fill_(1.0)

    def task_matrices(self) -> torch.Tensor:
        """``M_t = B_t Λ_t`` for every task: [T, d_out, r]."""
        n, d_out, r = self.lora_B.shape
        mix = F.softmax(self.lora_B_w / self.tau, dim=-1, dtype=torch.float32).to(self.lora_B.dtype)
        b_task = (mix @ self.lora_B.reshape(n, d_out * r)).reshape(-1, d_out, r)
        if self.diagonal:
            return b_task * self.lora_lambdas[:, None, :]
        return b_task @ self.lora_lambdas

    def delta(self, x: torch.Tensor, task_ids: torch.Tensor | None) -> torch.Tensor:
        task_ids = require_task_ids(task_ids, "mtl_lora")
        rows = x.reshape(task_ids.shape[0], -1, self.in_features).to(self.lora_A.dtype)
        z = self.dropout(rows) @ self.lora_A.T  # [B, S, r]
        m = self.task_matrices()[task_ids]  # [B, d_out, r]
        return (torch.bmm(z, m.transpose(1, 2)) * self.scaling).reshape(*x.shape[:-1], self.out_features)


def mtl_lora_delta_weight(layer: MTLLoRALinear, task_id: int) -> torch.Tensor:
    """``ΔW_t = (alpha/r) · B_t Λ_t A`` [d_out, d_in] of one layer for task ``task_id`` (the merged update)."""
    return (layer.task_matrices()[task_id] @ layer.lora_A) * layer.scaling


@register_method("mtl_lora")
class MTLLoRA(AdaptedModel):
    """MTL-LoRA on the target linears; every forward/generate needs ``task_ids``."""

    config_class = MTLLoRAConfig
    requires_task_ids = True

    def adapt(self) -> None:
        self.adapted = wrap_modules(
            self.base_model,
            self.config.targets,
            lambda _, linear: MTLLoRALinear(linear, self.config, self.num_tasks),
        )

    def task_conditioned_modules(self) -> list[nn.Module]:
        return list(self.adapted.values())

    def merged_weight_deltas(self, task_id: int) -> dict[str, torch.Tensor]:
        return {name: mtl_lora_delta_weight(layer, task_id) for name, layer in self.adapted.items()}

    def expected_trainable_parameters(self) -> int:
        cfg, t = self.config, self.num_tasks
        lam = t * cfg.r if cfg.lambda_format == "diag" else t * cfg.r**2
        return sum(
            cfg.r * d_in + lam + cfg.num_up * cfg.r * d_out + t * cfg.num_up
            for d_in, d_out in target_shapes(self.base_model.config, self.adapted)
        )
