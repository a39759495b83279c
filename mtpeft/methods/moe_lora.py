"""MoE-LoRA: a mixture of LoRA experts behind a router on every target linear (METHODS.md section 7).

::

                   ┌──────────────────── W0 (frozen) ────────────────────┐
        x ─────────┤                                                     (+)──► y
                   ├► router (fp32) ► softmax ► top-k, renormalised g    │
                   └► dropout ► expert i ∈ top-k: B_i A_i ► Σ g_i · ─────┘   (alpha / r)

    p = softmax(W_g x)  (fp32),  S(x) = top-k of p,  g_i = p_i / Σ_{j∈S(x)} p_j
    y = W0 x + (alpha / r) Σ_{i∈S(x)} g_i B_i A_i dropout(x)

Default (MoLA-style, MoE-PEFT ``MolaSparseMoe``): a token-level router per adapted linear, top-2 of 4 rank-8
experts, and the Switch/Mixtral load-balancing loss on non-padding tokens, ``L_aux = E Σ_i f_i P_i`` (= k at
perfect balance; ``f_i`` share of routed slots, ``P_i`` mean router probability), coefficient 0.01
(MixLoRA README). Variants by flag: ``top_k = num_experts`` is dense (LoRAMoE-style; no dispatch),
``expert_rank: r/E`` splits the rank over the experts (parameter-matched to LoRA r, as MOELoRA), and
``gate_input: task`` replaces the token routers by MOELoRA's single model-level gate
``g = softmax(W_G Emb(t))`` (then task ids are required and there is no balance loss). MOELoRA itself is
that gate, dense (``top_k = num_experts``), with the rank split (``expert_rank: r/E``) and expert A's drawn
from N(0, 0.01) (``expert_init: normal``): the preset ``method=moe_lora/moelora``. Other combinations with
the task gate are MOELoRA-style variants, and building one logs a warning saying so.

Dispatch (``dispatch``, same sum either way): ``sparse`` sorts the (token, slot) pairs by expert, runs
each expert's A/B on its own tokens only (on CPU two grouped GEMMs per layer, whatever E) and scatter-adds
the gate-weighted outputs back, so the cost grows with k, not with E; ``dense`` runs every expert on every
token with zero gates for the unchosen ones (two large products, cost ~ E), which is cheaper while E·r_e is
small; ``auto`` (default) picks dense up to E·r_e = 64 (`AUTO_DENSE_MAX_RANK`), else sparse. Under
``torch.compile`` sparse runs as dense (static shapes; see `dispatch_experts`). Experts that get no token
have a zero gradient rather than a missing one.

The routers keep the fp32 logits of their last call; `aux_losses` and `routing_stats` combine them with the
attention mask recorded by `MoELoRA.forward` (the record of the last forward, like the logits). The layers
themselves never read the mask, so a gradient-checkpointing recompute runs exactly the same computation,
and because the losses are built from tensors of the checkpointed forward (non-reentrant), their gradient
reaches the routers. Trainable parameters per adapted linear: ``E·r_e·(d_in + d_out) + E·d_in``
(task gate: no per-linear router, plus ``(T+1)·64 + 64·E`` once: MOELoRA's embedding table has T + 1
rows, of which task ids 0..T-1 use the first T), docs/methods.md §7(h).
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mtpeft.methods.base import AdaptedModel
from mtpeft.methods.inject import wrap_modules
from mtpeft.methods.lowrank import (
    LowRankConfig,
    LowRankLinear,
    kaiming_uniform_,
    require_task_ids,
    target_shapes,
)
from mtpeft.methods.registry import register_method

#: ``dispatch: auto`` runs the experts densely up to this total rank E·r_e (CPU, tiny model: dense E=8, r=8
#: 1.29x LoRA per training step vs sparse 1.44x; at E=16 sparse 1.47x vs dense 1.52x).
AUTO_DENSE_MAX_RANK = 64
#: Std of MOELoRA's normal init of the expert A matrices (``expert_init: normal``).
MOELORA_A_STD = 0.01
log = logging.getLogger(__name__)


@dataclass
class MoELoRAConfig(LowRankConfig):
    num_experts: int = 4
    """E, LoRA experts per adapted linear (METHODS.md 7a recommends 4-8; ours: 4)."""
    top_k: int = 2
    """Experts per token (MixLoRA README: top-2); ``top_k = num_experts`` is dense (LoRAMoE-style)."""
    expert_rank: Literal["r", "r/E"] = "r"
    """Rank of each expert: r (MoLA/MixLoRA) or r / num_experts (parameter-matched, MOELoRA)."""
    gate_input: Literal["token", "task"] = "token"
    """Route on each token's hidden state (MoLA/MixLoRA) or on a task embedding (MOELoRA, model-level)."""
    task_embedding_dim: int = 64
    """Task-embedding width of the ``task`` gate (MOELoRA ``te_dim 64``)."""
    router_init_std: float = 0.02
    """Std of the normal init of the token routers (MixLoRA ``router_init_range 0.02``)."""
    balance_loss_coef: float = 0.01
    """Weight of the Switch/Mixtral load-balancing loss (MixLoRA README: 0.01); 0 disables it."""
    balance_scope: Literal["global", "router"] = "global"
    """``global``: one loss over the concatenated logits of all routers (Mixtral/MoE-PEFT);
    ``router``: mean of one loss per router (ours; balances each router's own experts)."""
    router_z_loss_coef: float = 0.0
    """Weight of the router z-loss mean(logsumexp(logits)^2) (ours: off; MixLoRA switch config: 0.01)."""
    expert_init: Literal["kaiming", "normal"] = "kaiming"
    """Init of the experts' A matrices: Kaiming-uniform (LoRA, MixLoRA, LoRAMoE) or N(0, 0.01) (MOELoRA)."""
    dispatch: Literal["auto", "sparse", "dense"] = "auto"
    """How the chosen experts run (the same sum; results agree to rounding): ``sparse``, each expert on its
    own tokens (cost ~ k, plus sorting and gather/scatter); ``dense``, every expert on every token with zero
    gates for the unchosen ones (cost ~ E, in two large products); ``auto`` (ours): dense when
    E·r_e <= 64, the crossover measured on CPU with the tiny model, else sparse. ``top_k = E`` is always dense."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dispatch not in ("auto", "sparse", "dense"):
            raise ValueError(f"method.dispatch must be auto, sparse or dense, got {self.dispatch!r}")
        if self.num_experts < 1:
            raise ValueError(f"method.num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"method.top_k must be in [1, method.num_experts={self.num_experts}], got {self.top_k}"
            )
        if self.expert_rank == "r/E" and self.r % self.num_experts:
            raise ValueError(
                f"method.expert_rank='r/E' needs method.r={self.r} divisible by "
                f"method.num_experts={self.num_experts}"
            )
        if self.task_embedding_dim < 1:
            raise ValueError(f"method.task_embedding_dim must be >= 1, got {self.task_embedding_dim}")
        for name in ("router_init_std", "balance_loss_coef", "router_z_loss_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"method.{name} must be >= 0, got {getattr(self, name)}")
        if self.gate_input == "task" and not self.is_moelora:
            log.warning(
                "moe_lora with gate_input=task, top_k=%d, expert_rank=%s, expert_init=%s is a MOELoRA-style "
                "variant, not MOELoRA (dense gate top_k=num_experts=%d, expert_rank=r/E, expert_init=normal): "
                "use method=moe_lora/moelora for MOELoRA itself",
                self.top_k,
                self.expert_rank,
                self.expert_init,
                self.num_experts,
            )

    @property
    def is_moelora(self) -> bool:
        """Whether this is exactly MOELoRA: task gate, dense, rank split, A ~ N(0, 0.01)."""
        return (
            self.gate_input == "task"
            and self.top_k == self.num_experts
            and self.expert_rank == "r/E"
            and self.expert_init == "normal"
        )

    @property
    def dense_dispatch(self) -> bool:
        """Whether every expert runs on every token (``dispatch``; always for ``top_k = num_experts``)."""
        if self.top_k == self.num_experts or self.dispatch == "dense":
            return True
        return self.dispatch == "auto" and self.num_experts * self.rank_per_expert <= AUTO_DENSE_MAX_RANK

    @property
    def rank_per_expert(self) -> int:
        return self.r if self.expert_rank == "r" else self.r // self.num_experts


class TaskGate(nn.Module):
    """MOELoRA's model-level gate ``softmax(W_G Emb(t))``, shared by every adapted linear."""

    def __init__(self, num_tasks: int, dim: int, num_experts: int, device: torch.device) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_tasks + 1, dim, device=device)  # T + 1 rows, N(0, 1), as MOELoRA
        self.proj = nn.Linear(dim, num_experts, bias=False, device=device)  # nn.Linear default, as MOELoRA

    def forward(self, task_ids: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.proj(self.embedding(task_ids)).float(), dim=-1)


class MoELoRALinear(LowRankLinear):
    """E LoRA experts on one frozen linear, mixed by a token router or by the shared task gate."""

    def __init__(self, base_layer: nn.Linear, config: MoELoRAConfig, gate: TaskGate | None) -> None:
        # scale alpha / r with r the configured (total) rank, also for expert_rank=r/E (MOELoRA code)
        super().__init__(base_layer, config.r, config.alpha, config.dropout)
        e, r_e = config.num_experts, config.rank_per_expert
        self.num_experts, self.top_k = e, config.top_k
        self.dense = config.dense_dispatch
        self.lora_A = self.new_parameter(e, r_e, self.in_features)
        self.lora_B = self.new_parameter(e, self.out_features, r_e)
        if config.expert_init == "normal":
            nn.init.normal_(self.lora_A, std=MOELORA_A_STD)
        else:
            kaiming_uniform_(self.lora_A)
        if config.init_weights:
            nn.init.zeros_(self.lora_B)
        else:
            kaiming_uniform_(self.lora_B)
        if gate is None:
            self.router = nn.Linear(
                self.in_features, e, bias=False, device=self.weight.device, dtype=torch.float32
            )
            nn.init.normal_(self.router.weight, std=config.router_init_std)
        else:
            self.router = None
            self._task_gate = (gate,)  # a tuple, so the shared gate is not registered once per layer
        self.last_logits: torch.Tensor | None = None  # fp32 router logits of the last call, [N, E]
        self.last_probs: torch.Tensor | None = None  # their softmax, [N, E]
        self.last_selected: torch.Tensor | None = None  # experts chosen in the last call, [N, k]

    def route(self, flat: torch.Tensor, task_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [N, k] fp32, renormalised over the chosen experts; expert ids [N, k])."""
        if self.router is not None:
            # logits laid out [E, N]: on CPU a softmax over a short last dim is several times slower
            logits_t = self.router.weight @ flat.float().T
            probs = logits_t.softmax(dim=0).T
            weights, selected = probs.topk(self.top_k, dim=-1)
            self.last_logits, self.last_probs, self.last_selected = logits_t.T, probs, selected
        else:
            task_ids = require_task_ids(task_ids, "moe_lora with gate_input=task")
            weights, selected = self._task_gate[0](task_ids).topk(self.top_k, dim=-1)
            per_row = flat.shape[0] // task_ids.shape[0]
            weights, selected = weights.repeat_interleave(per_row, 0), selected.repeat_interleave(per_row, 0)
        if self.top_k < self.num_experts:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, selected

    def delta(self, x: torch.Tensor, task_ids: torch.Tensor | None) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        weights, selected = self.route(flat, task_ids)
        h = self.dropout(flat.to(self.lora_A.dtype))
        if self.dense:
            out = dense_experts(h, weights, selected, self.lora_A, self.lora_B)
        else:
            out = dispatch_experts(h, weights, selected, self.lora_A, self.lora_B)
        return (out * self.scaling).reshape(*x.shape[:-1], self.out_features)


def dispatch_experts(
    h: torch.Tensor, weights: torch.Tensor, selected: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor
) -> torch.Tensor:
    """Σ_slots weight · B_e A_e h over each token's chosen experts, running each expert on its tokens only.

    ``h`` [N, d_in], ``weights``/``selected`` [N, k], ``lora_a`` [E, r, d_in], ``lora_b`` [E, d_out, r].
    The (token, slot) pairs are sorted by expert; on CPU both products are one grouped GEMM each
    (`torch.nn.functional.grouped_mm`: one matrix product per expert's slice, looped in C++, so the number
    of Python-level ops does not grow with E and no expert count is read back), elsewhere a loop over the
    experts' slices (grouped GEMMs take only bf16 on CUDA, and 16-byte aligned rows). Both give the same, bit-identical result.
    Under ``torch.compile`` the data-dependent slices would break the graph, so every expert runs on every
    token with the gates of unchosen experts zero (`dense_experts`): the same sum, up to rounding.
    """
    if torch.compiler.is_compiling():
        return dense_experts(h, weights, selected, lora_a, lora_b)
    num_experts, k = lora_a.shape[0], selected.shape[1]
    sorted_sel, order = selected.reshape(-1).sort(stable=True)  # (token, slot) pairs grouped by expert
    token_idx = order // k
    gates = weights.reshape(-1).index_select(0, order).to(h.dtype)[:, None]
    x = h.index_select(0, token_idx)
    if _grouped_gemm_ok(h, lora_a, lora_b):
        experts = torch.arange(num_experts, dtype=sorted_sel.dtype)
        ends = torch.searchsorted(sorted_sel, experts, right=True).to(torch.int32)  # end row of each expert
        # the gate scales the r-wide hidden of each slot, not its d_out-wide output (r << d_out)
        z = F.grouped_mm(x, lora_a.transpose(1, 2), offs=ends) * gates
        out = F.grouped_mm(z, lora_b.transpose(1, 2), offs=ends)
    else:
        counts = torch.bincount(sorted_sel, minlength=num_experts).tolist()
        parts = zip(x.split(counts), gates.split(counts), lora_a.unbind(0), lora_b.unbind(0), strict=True)
        out = torch.cat([((xe @ a.T) * g) @ b.T for xe, g, a, b in parts])
    return h.new_zeros(h.shape[0], lora_b.shape[1]).index_add_(0, token_idx, out)


def _grouped_gemm_ok(h: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> bool:
    """Whether `F.grouped_mm` takes these operands: on CPU, with rows of 16-byte multiples (r, d_in, d_out)."""
    sizes = (lora_a.shape[1], lora_a.shape[2], lora_b.shape[1])
    return h.device.type == "cpu" and all(size * h.element_size() % 16 == 0 for size in sizes)


def dense_experts(
    h: torch.Tensor, weights: torch.Tensor, selected: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor
) -> torch.Tensor:
    """All experts on every token, unchosen ones with gate 0: one LoRA of rank E·r with gate-scaled rank
    slices (``top_k = E``, ``dispatch: dense``, and the small E·r of ``dispatch: auto``)."""
    num_experts, r, d_in = lora_a.shape
    probs = weights.new_zeros(h.shape[0], num_experts).scatter_(1, selected, weights)  # expert order
    z = h @ lora_a.reshape(num_experts * r, d_in).T
    z = z * probs.repeat_interleave(r, dim=1).to(z.dtype)
    return z @ lora_b.permute(1, 0, 2).reshape(lora_b.shape[1], num_experts * r).T


@register_method("moe_lora")
class MoELoRA(AdaptedModel):
    """Mixture of LoRA experts on the target linears (token routers, or MOELoRA's task gate)."""

    config_class = MoELoRAConfig

    def adapt(self) -> None:
        cfg = self.config
        self.requires_task_ids = cfg.gate_input == "task"  # instance override of the ClassVar
        device = next(self.base_model.parameters()).device
        gate = None
        if cfg.gate_input == "task":
            gate = TaskGate(self.num_tasks, cfg.task_embedding_dim, cfg.num_experts, device)
        self.task_gate = gate
        self.adapted = wrap_modules(
            self.base_model, cfg.targets, lambda _, lin: MoELoRALinear(lin, cfg, gate)
        )
        self._attention_mask: torch.Tensor | None = None

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        task_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        self._attention_mask = attention_mask  # record of this forward, read with the routers' logits
        return super().forward(
            input_ids=input_ids, attention_mask=attention_mask, task_ids=task_ids, **kwargs
        )

    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._attention_mask = None  # decoding steps see one token per row: no padding to mask
        return super().generate(*args, **kwargs)

    def task_conditioned_modules(self) -> list[nn.Module]:
        return list(self.adapted.values()) if self.task_gate is not None else []

    def expected_trainable_parameters(self) -> int:
        cfg = self.config
        e, r_e = cfg.num_experts, cfg.rank_per_expert
        shapes = target_shapes(self.base_model.config, self.adapted)
        experts = sum(e * r_e * (d_in + d_out) for d_in, d_out in shapes)
        if cfg.gate_input == "task":
            return experts + (self.num_tasks + 1) * cfg.task_embedding_dim + cfg.task_embedding_dim * e
        return experts + sum(e * d_in for d_in, _ in shapes)

    # -- router bookkeeping ------------------------------------------------------------------------
    def _routed(self) -> list[tuple[str, MoELoRALinear, torch.Tensor]]:
        """(name, layer, non-padding mask [N]) of each token router that has run."""
        out = []
        for name, layer in self.adapted.items():
            if layer.router is not None and layer.last_logits is not None:
                out.append(
                    (name, layer, self._token_mask(layer.last_logits.shape[0], layer.last_logits.device))
                )
        return out

    def _expert_slots(self, selected: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Routed (token, slot) pairs per expert over non-padding tokens, [E] (deterministic on CUDA)."""
        return mask @ F.one_hot(selected, self.config.num_experts).sum(dim=1).to(mask.dtype)

    def _token_mask(self, n_tokens: int, device: torch.device) -> torch.Tensor:
        """1 for real tokens, 0 for padding, over the N = B·S tokens a router saw (last S mask columns)."""
        mask = self._attention_mask
        if mask is not None and mask.dim() == 2 and n_tokens % mask.shape[0] == 0:
            seq = n_tokens // mask.shape[0]
            if seq <= mask.shape[1]:
                return mask[:, mask.shape[1] - seq :].reshape(-1).to(device=device, dtype=torch.float32)
        return torch.ones(n_tokens, device=device)

    def aux_losses(self) -> dict[str, torch.Tensor]:
        cfg = self.config
        routed = self._routed()
        if not routed:
            return {}
        e = cfg.num_experts
        counts, probs, tokens, z_losses = [], [], [], []
        for _, layer, mask in routed:
            counts.append(self._expert_slots(layer.last_selected, mask))
            probs.append(mask @ layer.last_probs)
            tokens.append(mask.sum().clamp_min(1.0))
            if cfg.router_z_loss_coef > 0:
                z_losses.append(mask @ torch.logsumexp(layer.last_logits, dim=-1).square() / tokens[-1])
        if cfg.balance_scope == "global":
            total = torch.stack(tokens).sum()
            balance = e * (torch.stack(counts).sum(0) / total * torch.stack(probs).sum(0) / total).sum()
        else:
            balance = torch.stack(
                [e * (c / n * p / n).sum() for c, p, n in zip(counts, probs, tokens, strict=True)]
            )
            balance = balance.mean()
        losses = {}
        if cfg.balance_loss_coef > 0:
            losses["load_balance"] = cfg.balance_loss_coef * balance
        if z_losses:
            losses["router_z"] = cfg.router_z_loss_coef * torch.stack(z_losses).mean()
        return losses

    @torch.no_grad()
    def routing_stats(self) -> dict[str, float]:
        """Per decoder layer: each expert's share of routed slots and the mean router entropy.

        With the task gate: each task's expert weights and gate entropy.
        """
        e = self.config.num_experts
        if self.task_gate is not None:
            gate = self.task_gate(torch.arange(self.num_tasks, device=self.task_gate.proj.weight.device))
            stats = {
                f"task{t}/expert{i}_weight": float(gate[t, i])
                for t in range(self.num_tasks)
                for i in range(e)
            }
            entropy = -(gate * gate.clamp_min(1e-12).log()).sum(-1)
            stats.update({f"task{t}/entropy": float(entropy[t]) for t in range(self.num_tasks)})
            return stats
        by_layer: dict[str, list[torch.Tensor]] = defaultdict(list)
        for name, layer, mask in self._routed():
            n = mask.sum().clamp_min(1.0)
            load = self._expert_slots(layer.last_selected, mask) / (n * layer.top_k)
            p = layer.last_probs
            entropy = mask @ -(p * p.clamp_min(1e-12).log()).sum(-1) / n
            match = re.search(r"layers\.(\d+)\.", name)
            by_layer[f"layer{match.group(1)}" if match else name].append(torch.cat([load, entropy[None]]))
        stats = {}
        for layer, rows in by_layer.items():
            mean = torch.stack(rows).mean(0)
            stats.update({f"{layer}/expert{i}_load": float(mean[i]) for i in range(e)})
            stats[f"{layer}/entropy"] = float(mean[e])
        if by_layer:
            stats["entropy"] = sum(stats[f"{layer}/entropy"] for layer in by_layer) / len(by_layer)
        return stats
