"""Poly (Ponti et al., 2022) and MHR (Caccia et al., 2022) through peft's ``PolyConfig``.

Every adapted linear holds an inventory of K LoRA "skills" (A_k, B_k) and, per task, logits over them.
A task's adapter is the *parameter average* of the skills it selects; with ``n_splits = H > 1`` (MHR)
the features are cut into H heads and every head has its own allocation::

        x ──► W0 (frozen) ──────────────────────────────────────┐
        │                                                       (+)──► y = W0 x + (1/r) · x A_t B_t
        └──► A_t (d_in×r) ──► B_t (r×d_out) ────────────────────┘
               ▲                 ▲
               └── Σ_k w_{t,h,k} A_{h,k}, Σ_k w_{t,h,k} B_{h,k}   (concatenated over the H heads)

    ẑ_t = RelaxedBernoulli(τ=1, logits=Z[t]).rsample()  (training)  |  sigmoid(Z[t])  (eval)
    w_{t,h,k} = ẑ_{t,h,k} / (Σ_k ẑ_{t,h,k} + 1e-12)                  Z ∈ R^{T × H·K} per adapted linear

A and B are mixed separately, so the adapter contains cross terms A_i B_j (docs/methods.md 6.1). ``A`` is
Kaiming-uniform, ``B`` zero (``init_weights=False``: Kaiming too), the logits U(-1e-3, 1e-3), so the model
starts as the base model. The layers are peft's own (``inject_adapter_in_model``); their ``forward``
reads ``task_ids`` from its keywords, which our task-id scope injects (and repeats for expanded
generation batches, which peft's own ``PolyModel`` does not). Task ids are required at training and
inference. Trainable parameters per adapted linear: ``K·r·(d_in + d_out) + T·H·K`` (docs/methods.md 6.1h).
Source: huggingface/peft ``src/peft/tuners/poly/{config,router,layer,model}.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import field
from typing import Literal

import torch
from peft import PolyConfig, inject_adapter_in_model
from peft.tuners.poly.layer import Linear as PeftPolyLinear
from peft.tuners.poly.router import EPS as POLY_EPS
from peft.tuners.poly.router import PolyRouter
from torch import nn
from torch.distributions.relaxed_bernoulli import RelaxedBernoulli

from mtpeft.adapters.base import AdaptedModel, MethodConfig
from mtpeft.adapters.inject import find_modules
from mtpeft.adapters.lowrank import ATTENTION_TARGETS, Targets, target_shapes
from mtpeft.adapters.registry import register_method
from mtpeft.utils.schema import Bool, PositiveInt, config_dataclass


@config_dataclass
class PolyMethodConfig(MethodConfig):
    r: PositiveInt = 8
    """Rank of every skill (peft ``PolyConfig.r`` default 8)."""
    n_skills: PositiveInt = 4
    """K, the skills (LoRAs) in each adapted linear (peft default 4)."""
    n_splits: PositiveInt = 1
    """H, heads of Multi-Head Routing; 1 is Poly, > 1 is MHR. Must divide d_in and d_out of every target
    (peft default 1)."""
    poly_type: Literal["poly"] = "poly"
    """Router variant; peft implements only ``poly`` (Gumbel-sigmoid allocation per task)."""
    targets: Targets = field(default_factory=lambda: list(ATTENTION_TARGETS))
    """Linear layers to adapt (regular expressions matched in full against the leaf name). q,k,v,o as the
    LoRA baseline and C-Poly, so the comparison is like for like (peft's Llama default is q,v)."""
    init_weights: Bool = True
    """True: B = 0, identity at init (peft default). False: B Kaiming-uniform, a non-identity start."""


class TraceablePolyRouter(PolyRouter):
    """peft's `PolyRouter` that ``torch.compile`` traces into one graph: the same computation, without the
    ``task_ids.max().item()`` range check (a graph break) and the distribution's argument validation (a
    data-dependent check) while compiling. The adapted model checks the ids' range before the call."""

    def forward(self, task_ids: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            return super().forward(task_ids=task_ids, input_ids=input_ids)
        logits = self.module_logits[task_ids.to(self.module_logits.device)]
        logits = logits.view(-1, self.n_splits, self.n_skills)
        if self.training:
            logits = RelaxedBernoulli(temperature=1.0, logits=logits, validate_args=False).rsample()
        else:
            logits = torch.sigmoid(logits)
        return logits / (logits.sum(dim=-1, keepdim=True) + POLY_EPS)


def check_splits(model: nn.Module, names: Sequence[str], n_splits: int) -> None:
    """Raise unless ``n_splits`` divides the input and output features of every adapted linear."""
    for name in names:
        linear = model.get_submodule(name)
        d_in, d_out = linear.in_features, linear.out_features
        if d_in % n_splits or d_out % n_splits:
            raise ValueError(
                f"method.n_splits={n_splits} must divide the input and output features of every target; "
                f"{name} has d_in={d_in}, d_out={d_out}"
            )


def poly_delta_weight(layer: PeftPolyLinear, task_id: int, adapter: str = "default") -> torch.Tensor:
    """``ΔW_t = (1/r) · (A_t B_t)^T`` [d_out, d_in] of one peft Poly layer for task ``task_id``: the product
    its ``forward`` applies to every row of that task (eval-mode router: the noise-free sigmoid)."""
    r = layer.r[adapter]
    router = layer.poly_router[adapter]
    weights = router(task_ids=torch.tensor([task_id], device=router.module_logits.device), input_ids=None)
    a = torch.einsum("bqs,qsdr->bqdr", weights, layer.poly_lora_A[adapter]).reshape(layer.in_features, r)
    b = torch.einsum("bqs,qsrd->bqrd", weights, layer.poly_lora_B[adapter])
    return (a @ b.transpose(1, 2).reshape(r, layer.out_features)).T / r


@register_method("poly")
class Poly(AdaptedModel):
    """peft's Poly/MHR layers on the target linears; every forward/generate needs ``task_ids``."""

    config_class = PolyMethodConfig
    requires_task_ids = True

    def adapt(self) -> None:
        cfg = self.config
        self.target_names = find_modules(self.base_model, cfg.targets)
        check_splits(self.base_model, self.target_names, cfg.n_splits)
        self.peft_config = PolyConfig(
            r=cfg.r,
            target_modules=self.target_names,
            init_weights=cfg.init_weights,
            poly_type=cfg.poly_type,
            n_tasks=self.num_tasks,
            n_skills=cfg.n_skills,
            n_splits=cfg.n_splits,
        )
        inject_adapter_in_model(self.peft_config, self.base_model)
        self._poly_layers = [m for m in self.base_model.modules() if isinstance(m, PeftPolyLinear)]
        for module in self.base_model.modules():
            if type(module) is PolyRouter:
                module.__class__ = TraceablePolyRouter

    def task_conditioned_modules(self) -> list[nn.Module]:
        return self._poly_layers

    def merged_weight_deltas(self, task_id: int) -> dict[str, torch.Tensor]:
        return {
            name: poly_delta_weight(module, task_id)
            for name, module in self.base_model.named_modules()
            if isinstance(module, PeftPolyLinear)
        }

    def expected_trainable_parameters(self) -> int:
        cfg, t = self.config, self.num_tasks
        return sum(
            cfg.n_skills * cfg.r * (d_in + d_out) + t * cfg.n_splits * cfg.n_skills
            for d_in, d_out in target_shapes(self.base_model.config, self.target_names)
        )
