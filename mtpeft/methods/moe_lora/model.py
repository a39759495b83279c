"""The `MoELoRA` adapted model: expert linears on the targets, the balance and z losses, routing stats."""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from typing import Any

import torch
from torch import nn

from mtpeft.adapters.base import AdaptedModel
from mtpeft.adapters.inject import wrap_modules
from mtpeft.adapters.lowrank import target_shapes
from mtpeft.adapters.registry import register_method
from mtpeft.adapters.routing import (
    RouterRecord,
    entropy,
    layer_stats,
    pool,
    router_z_loss,
    switch_balance_loss,
    token_mask,
)
from mtpeft.methods.moe_lora.config import MoELoRAConfig
from mtpeft.methods.moe_lora.layer import MoELoRALinear, TaskGate


@register_method("moe_lora")
class MoELoRA(AdaptedModel):
    """Mixture of LoRA experts on the target linears (token routers, or MOELoRA's task gate)."""

    config_class = MoELoRAConfig
    #: Benchmark: cost against the number of experts (E=2, k=2 is dense: k = E; E=4 is the default) with the
    #: default ``dispatch: auto``, and the sparse dispatch (cost ~ k, not E).
    bench_variants = {
        "E=2 k=2": ("method.num_experts=2", "method.top_k=2"),
        "E=4 k=2": ("method.num_experts=4", "method.top_k=2"),
        "E=8 k=2": ("method.num_experts=8", "method.top_k=2"),
        "E=4 k=2 sparse": ("method.num_experts=4", "method.dispatch=sparse"),
        "E=8 k=2 sparse": ("method.num_experts=8", "method.dispatch=sparse"),
    }

    @property
    def requires_task_ids(self) -> bool:
        """Only the task gate reads task ids; the token routers route on the hidden states."""
        return self.config.gate_input == "task"

    def adapt(self) -> None:
        cfg = self.config
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
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        """`AdaptedModel.forward` (``task_ids`` and the Hugging Face keywords pass through), keeping the
        attention mask as the record of this forward, read with the routers' logits."""
        self._attention_mask = attention_mask
        return super().forward(input_ids, attention_mask, *args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._attention_mask = None  # decoding steps see one token per row: no padding to mask
        return super().generate(*args, **kwargs)

    # -- merging ------------------------------------------------------------------------------------------
    @property
    def mergeable(self) -> bool:
        """Only with the task gate: its expert weights depend on the task alone (MOELoRA merges per task)."""
        return self.config.gate_input == "task"

    @property
    def not_mergeable_reason(self) -> str:
        return (
            "with gate_input=token its routers choose and weight the experts per token from the hidden "
            "state, so the update depends on the input, not only on the task (only the task gate, "
            "gate_input=task as in method=moe_lora/moelora, merges per task)"
        )

    def merged_weight_deltas(self, task_id: int) -> dict[str, torch.Tensor]:
        """Task gate: ``(alpha / r) Σ_{e∈S(t)} g_e(t) B_e A_e`` of every adapted linear; token routers raise."""
        if not self.mergeable:
            raise self._not_mergeable()
        return {name: layer.delta_weight(task_id) for name, layer in self.adapted.items()}

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
    def _routed(self) -> list[tuple[str, RouterRecord]]:
        """(name, record with the non-padding mask [N]) of each token router that has run."""
        out = []
        for name, layer in self.adapted.items():
            if layer.router is not None and layer.record is not None:
                logits = layer.record.logits
                mask = token_mask(self._attention_mask, logits.shape[0], device=logits.device)
                if mask is None:  # no mask for these N tokens (e.g. none given): every token counts
                    mask = torch.ones(logits.shape[0], device=logits.device)
                out.append((name, dataclasses.replace(layer.record, mask=mask)))
        return out

    def aux_losses(self) -> dict[str, torch.Tensor]:
        cfg = self.config
        routed = self._routed()
        if not routed:
            return {}
        # Switch normalisation E·Σ f_i P_i over each router's non-padding tokens (at least one each)
        usages = [record.usage().clamped() for _, record in routed]
        if cfg.balance_scope == "global":
            balance = switch_balance_loss(pool(usages), cfg.num_experts)
        else:
            balance = torch.stack([switch_balance_loss(u, cfg.num_experts) for u in usages]).mean()
        losses = {}
        if cfg.balance_loss_coef > 0:
            losses["load_balance"] = cfg.balance_loss_coef * balance
        if cfg.router_z_loss_coef > 0:
            z_losses = [
                router_z_loss(record.logits, record.float_mask(), usage.tokens)
                for (_, record), usage in zip(routed, usages, strict=True)
            ]
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
            gate_entropy = entropy(gate)
            stats.update({f"task{t}/entropy": float(gate_entropy[t]) for t in range(self.num_tasks)})
            return stats
        by_layer: dict[str, list[torch.Tensor]] = defaultdict(list)
        for name, record in self._routed():
            match = re.search(r"layers\.(\d+)\.", name)
            by_layer[f"layer{match.group(1)}" if match else name].append(record.stats_row())
        stats = layer_stats(
            {layer: torch.stack(rows).mean(0) for layer, rows in by_layer.items()}, "expert{}_load"
        )
        if by_layer:
            stats["entropy"] = sum(stats[f"{layer}/entropy"] for layer in by_layer) / len(by_layer)
        return stats
