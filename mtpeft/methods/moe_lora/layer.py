"""One adapted linear of MoE-LoRA: E LoRA experts mixed by a token router or by the shared task gate,
and the two ways of running the chosen experts (`dispatch_experts`, `dense_experts`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtpeft.adapters.lowrank import LowRankLinear, kaiming_uniform_, require_task_ids
from mtpeft.adapters.routing import RouterRecord
from mtpeft.methods.moe_lora.config import MoELoRAConfig

#: Std of MOELoRA's normal init of the expert A matrices (``expert_init: normal``).
MOELORA_A_STD = 0.01


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
        self.record: RouterRecord | None = None  # the token router's last call: fp32 logits, probs, experts

    def route(self, flat: torch.Tensor, task_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [N, k] fp32, renormalised over the chosen experts; expert ids [N, k])."""
        if self.router is not None:
            # logits laid out [E, N]: on CPU a softmax over a short last dim is several times slower
            logits_t = self.router.weight @ flat.float().T
            probs = logits_t.softmax(dim=0).T
            weights, selected = probs.topk(self.top_k, dim=-1)
            self.record = RouterRecord(logits_t.T, selected=selected, probs=probs)
            if self.top_k < self.num_experts:
                weights = weights / weights.sum(dim=-1, keepdim=True)
            return weights, selected
        task_ids = require_task_ids(task_ids, "moe_lora with gate_input=task")
        weights, selected = self.task_weights(task_ids)
        per_row = flat.shape[0] // task_ids.shape[0]
        return weights.repeat_interleave(per_row, 0), selected.repeat_interleave(per_row, 0)

    def task_weights(self, task_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The task gate's (weights [B, k] fp32, renormalised over the chosen experts; expert ids [B, k])
        for ``task_ids`` [B]: they depend on the task alone."""
        weights, selected = self._task_gate[0](task_ids).topk(self.top_k, dim=-1)
        if self.top_k < self.num_experts:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, selected

    def delta_weight(self, task_id: int) -> torch.Tensor:
        """``ΔW_t = (alpha / r) Σ_{e∈S(t)} g_e B_e A_e`` [d_out, d_in] for task ``task_id`` (task gate only):
        the matrix the forward applies to every token of that task, so ``W0 + ΔW_t`` is the merged linear."""
        if self.router is not None:
            raise TypeError("a token-routed MoE-LoRA linear has no per-task weight delta (gate_input=token)")
        gate = self._task_gate[0]
        weights, selected = self.task_weights(torch.tensor([task_id], device=gate.proj.weight.device))
        probs = weights.new_zeros(self.num_experts).scatter_(0, selected[0], weights[0])  # expert order
        e, r, d_in = self.lora_A.shape
        a = self.lora_A.reshape(e * r, d_in)
        b = self.lora_B.permute(1, 0, 2).reshape(self.out_features, e * r)
        return (b * probs.repeat_interleave(r).to(b.device, b.dtype)) @ a * self.scaling

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
