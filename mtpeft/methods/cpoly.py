"""C-Poly, Customized Polytropon (Wang et al., ICLR 2024, arXiv 2312.03248): shared plus exclusive skills.

Poly's shared skill inventory (K LoRA skills, softly allocated per task) plus, for every task, B skills
that only that task can use. Per adapted linear, for a sequence of task t and MHR head h::

        x ──► W0 (frozen) ──────────────────────────────────────────┐
        │                                                           (+)──► y = W0 x + (1/r) · x A_t B_t
        └──► A_t (d_in×r) ──► B_t (r×d_out) ────────────────────────┘
               ▲                 ▲
               └─ Σ_k ŵ_{t,h,k} φ_{h,k}  +  Σ_j w̃_{t,j} φ^t_{h,j}       (φ = (A, B), mixed separately)
                  K shared skills           B skills owned by task t

    shared:   ẑ_t = GumbelSigmoid(Z[t])  (training: RelaxedBernoulli(τ=1).rsample; eval: sigmoid)
    specific: ṽ_t = 1 (fixed) | V[t] (learned_raw) | GumbelSigmoid(V[t]) (gumbel_sigmoid)
    normalize_jointly = false:  ŵ = ẑ / (Σ_k ẑ + 1e-12),  w̃ = ṽ              (author code)
    normalize_jointly = true:   [ŵ, w̃] = [ẑ, ṽ] / (Σ_k ẑ + Σ_j ṽ + 1e-12)

A and B are averaged separately, as in Poly, so shared and task-specific skills form cross terms. Scale
1/r, no alpha, no dropout (peft Poly). Init as peft Poly: every A Kaiming-uniform (fan-in d_in/H), every B
zero (``init_weights=False``: Kaiming), logits U(-1e-3, 1e-3); ``learned_raw`` weights start at 1 (the
author's identity ``C``). With B = 0 this is exactly peft's Poly/MHR (same layouts, same router).

The task-specific weights are one per task and skill (``[T, B]``), shared by all MHR heads, as the spec
has them: only the shared allocation is per head. Exclusivity is structural (docs/methods.md §6.2(i)): the
task-specific skills are stored as ``[T, H, B, ...]`` and row b only ever indexes the slice of its own task, so task t can neither read nor send gradients to
task s's skills or weights. This is the masked form ``mask_t ⊙ v[t]`` of docs/methods.md without its zero
entries; the author's fork instead learns a full T×T matrix ``C`` (tasks borrow each other's skills) and
expands it with ``expand((1, n_splits, 1))``, which fails for batch > 1; neither is reproduced.

Trainable parameters per adapted linear: ``(K + T·B)·r·(d_in + d_out) + T·H·K`` plus ``T·B`` for the
learned specific weights (docs/methods.md 6.2h). Sources: TaoSunVoyage/peft @ fde7b65
``src/peft/tuners/poly/{config,router,layer}.py`` (closed PR huggingface/peft#1297); peft Poly.
"""

from __future__ import annotations

import math
from dataclasses import field
from typing import Literal

import torch
from torch import nn
from torch.distributions.relaxed_bernoulli import RelaxedBernoulli

from mtpeft.adapters.base import AdaptedModel, MethodConfig
from mtpeft.adapters.inject import find_modules, wrap_modules
from mtpeft.adapters.lowrank import (
    ATTENTION_TARGETS,
    LowRankLinear,
    Targets,
    require_task_ids,
    target_shapes,
)
from mtpeft.adapters.registry import register_method
from mtpeft.methods.poly import check_splits
from mtpeft.utils.schema import Bool, NonNegativeInt, PositiveInt, config_dataclass

EPS = 1e-12  # peft PolyRouter


@config_dataclass
class CPolyConfig(MethodConfig):
    r: PositiveInt = 8
    """Rank of every skill (peft Poly default 8; the paper's rank is UNVERIFIED)."""
    n_skills: NonNegativeInt = 4
    """K, shared skills per adapted linear (peft Poly default 4; docs/methods.md section 11 counts use 4)."""
    n_specific_skills: NonNegativeInt = 1
    """B, exclusive skills per task per adapted linear; 0 reduces to Poly ("B is set to 1 throughout the
    paper", ICLR 2024 review)."""
    n_splits: PositiveInt = 1
    """H, heads of Multi-Head Routing (MHR); must divide d_in and d_out of every target (peft default 1)."""
    specific_weight: Literal["fixed", "learned_raw", "gumbel_sigmoid"] = "gumbel_sigmoid"
    """Weight of a task's own skills: ``fixed`` 1 (author's ``cpoly_simple``), ``learned_raw`` an
    unconstrained learned scalar starting at 1 (author's ``cpoly``, diagonal of its ``C`` only), or
    ``gumbel_sigmoid`` learned logits relaxed like the shared allocation (paper, per ICLR 2024 review)."""
    normalize_jointly: Bool = False
    """False: normalise the shared allocation over the K shared skills and add the specific weights
    unnormalised (author code). True: normalise shared and specific weights together over K + B (ours;
    the paper's normalisation is UNVERIFIED). Needs non-negative specific weights (not ``learned_raw``)."""
    targets: Targets = field(default_factory=lambda: list(ATTENTION_TARGETS))
    """Linear layers to adapt (regular expressions matched in full against the leaf name). The paper does
    not say (UNVERIFIED); q,k,v,o as the LoRA baseline (docs/methods.md 6.2c)."""
    init_weights: Bool = True
    """True: every B = 0, identity at init (peft Poly). False: B Kaiming-uniform, a non-identity start."""

    def __post_init__(self) -> None:
        """Cross-field checks (the layer prefixes the messages with ``method``)."""
        if self.n_skills + self.n_specific_skills == 0:
            raise ValueError("n_skills + n_specific_skills must be >= 1 (no skills at all)")
        if self.normalize_jointly and self.specific_weight == "learned_raw" and self.n_specific_skills:
            raise ValueError(
                "normalize_jointly=true needs non-negative specific weights; "
                "specific_weight=learned_raw is unconstrained (use fixed or gumbel_sigmoid)"
            )

    @property
    def learned_specific(self) -> bool:
        """Whether each task has learned weights for its own skills (T·B parameters per linear)."""
        return self.n_specific_skills > 0 and self.specific_weight != "fixed"


def _relaxed_bernoulli(logits: torch.Tensor, training: bool) -> torch.Tensor:
    """Gumbel-sigmoid (binary Concrete, τ = 1) sample in training, its noise-free sigmoid at eval."""
    logits = logits.float()
    if training:
        return RelaxedBernoulli(temperature=1.0, logits=logits).rsample()
    return torch.sigmoid(logits)


class CPolyLinear(LowRankLinear):
    """``W0 x + (1/r) x A_t B_t`` with C-Poly's per-task mixture of skills (see the module docstring)."""

    def __init__(self, base_layer: nn.Linear, config: CPolyConfig, num_tasks: int) -> None:
        super().__init__(base_layer, config.r, alpha=1.0, dropout=0.0)  # scale 1/r, no dropout (Poly)
        t, h, k, b, r = num_tasks, config.n_splits, config.n_skills, config.n_specific_skills, config.r
        d_in, d_out = self.in_features // h, self.out_features // h
        self.n_splits, self.n_skills, self.n_specific = h, k, b
        self.specific_weight = config.specific_weight
        self.normalize_jointly = config.normalize_jointly
        # Shared skills, laid out as peft's poly_lora_A / poly_lora_B / module_logits.
        self.cpoly_A = self.new_parameter(h, k, d_in, r)
        self.cpoly_B = self.new_parameter(h, k, r, d_out)
        self.cpoly_logits = nn.Parameter(torch.empty(t, h * k, device=self.cpoly_A.device))
        # Exclusive skills: row b reads only [task_ids[b]], so tasks cannot share them.
        if b:
            self.cpoly_specific_A = self.new_parameter(t, h, b, d_in, r)
            self.cpoly_specific_B = self.new_parameter(t, h, b, r, d_out)
            if config.learned_specific:
                self.cpoly_specific_w = nn.Parameter(torch.empty(t, b, device=self.cpoly_A.device))
        self.reset_parameters(config.init_weights)

    @torch.no_grad()
    def reset_parameters(self, init_weights: bool) -> None:
        """peft Poly's init: A U(±1/sqrt(d_in/H)) (Kaiming a=√5), B zero or U(±1/sqrt(r)), logits U(±1e-3)."""
        skills = [(self.cpoly_A, self.cpoly_B)]
        if self.n_specific:
            skills.append((self.cpoly_specific_A, self.cpoly_specific_B))
        for a, b in skills:
            bound = 1.0 / math.sqrt(a.shape[-2])
            a.uniform_(-bound, bound)
            if init_weights:
                b.zero_()
            else:
                bound = 1.0 / math.sqrt(b.shape[-2])
                b.uniform_(-bound, bound)
        self.cpoly_logits.uniform_(-1e-3, 1e-3)
        if hasattr(self, "cpoly_specific_w"):
            if self.specific_weight == "learned_raw":
                self.cpoly_specific_w.fill_(1.0)  # author's C = I
            else:
                self.cpoly_specific_w.uniform_(-1e-3, 1e-3)

    def mixing_weights(self, task_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weights of the shared skills [N, H, K] and of the task's own skills [N, H, B] (or None); the
        latter are one per task and skill, the same for every head."""
        n, h = task_ids.shape[0], self.n_splits
        shared = _relaxed_bernoulli(self.cpoly_logits[task_ids].view(n, h, self.n_skills), self.training)
        specific = None
        if self.n_specific:
            if self.specific_weight == "fixed":
                specific = shared.new_ones(n, self.n_specific)
            elif self.specific_weight == "learned_raw":
                specific = self.cpoly_specific_w[task_ids].float()
            else:
                specific = _relaxed_bernoulli(self.cpoly_specific_w[task_ids], self.training)
            specific = specific.unsqueeze(1).expand(n, h, self.n_specific)
        if self.normalize_jointly and specific is not None:
            total = shared.sum(-1, keepdim=True) + specific.sum(-1, keepdim=True) + EPS
            return shared / total, specific / total
        return shared / (shared.sum(-1, keepdim=True) + EPS), specific

    def task_adapters(self, task_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's mixed ``A_t`` [N, d_in, r] and ``B_t`` [N, r, d_out]."""
        shared, specific = self.mixing_weights(task_ids)
        dtype = self.cpoly_A.dtype
        a = torch.einsum("nhk,hkdr->nhdr", shared.to(dtype), self.cpoly_A)
        b = torch.einsum("nhk,hkrd->nhrd", shared.to(dtype), self.cpoly_B)
        if specific is not None:
            a = a + torch.einsum("nhj,nhjdr->nhdr", specific.to(dtype), self.cpoly_specific_A[task_ids])
            b = b + torch.einsum("nhj,nhjrd->nhrd", specific.to(dtype), self.cpoly_specific_B[task_ids])
        n = task_ids.shape[0]
        return a.reshape(n, self.in_features, self.r), b.transpose(1, 2).reshape(n, self.r, self.out_features)

    def delta(self, x: torch.Tensor, task_ids: torch.Tensor | None) -> torch.Tensor:
        task_ids = require_task_ids(task_ids, "cpoly").to(x.device)
        a, b = self.task_adapters(task_ids)
        rows = x.reshape(task_ids.shape[0], -1, self.in_features).to(a.dtype)
        return (rows.bmm(a).bmm(b) * self.scaling).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, n_skills={self.n_skills}, n_specific={self.n_specific}, "
            f"n_splits={self.n_splits}, specific_weight={self.specific_weight}"
        )


def cpoly_delta_weight(layer: CPolyLinear, task_id: int) -> torch.Tensor:
    """``ΔW_t = (1/r) · (A_t B_t)^T`` [d_out, d_in] of one layer for task ``task_id`` (the merged update;
    eval-mode weights, i.e. the noise-free sigmoid allocation)."""
    a, b = layer.task_adapters(torch.tensor([task_id], device=layer.cpoly_A.device))
    return (a[0] @ b[0]).T * layer.scaling


@register_method("cpoly")
class CPoly(AdaptedModel):
    """C-Poly on the target linears; every forward/generate needs ``task_ids``."""

    config_class = CPolyConfig
    requires_task_ids = True

    def adapt(self) -> None:
        cfg = self.config
        check_splits(self.base_model, find_modules(self.base_model, cfg.targets), cfg.n_splits)
        self.adapted = wrap_modules(
            self.base_model, cfg.targets, lambda _, linear: CPolyLinear(linear, cfg, self.num_tasks)
        )

    def task_conditioned_modules(self) -> list[nn.Module]:
        return list(self.adapted.values())

    def merged_weight_deltas(self, task_id: int) -> dict[str, torch.Tensor]:
        return {name: cpoly_delta_weight(layer, task_id) for name, layer in self.adapted.items()}

    def expected_trainable_parameters(self) -> int:
        cfg, t = self.config, self.num_tasks
        h, k, b = cfg.n_splits, cfg.n_skills, cfg.n_specific_skills
        weights = t * h * k + (t * b if cfg.learned_specific else 0)
        return sum(
            (k + t * b) * cfg.r * (d_in + d_out) + weights
            for d_in, d_out in target_shapes(self.base_model.config, self.adapted)
        )
