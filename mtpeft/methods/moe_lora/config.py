"""`MoELoRAConfig`: every MoE-LoRA switch, with its source (MixLoRA, MoLA, LoRAMoE, MOELoRA, or ours)."""

from __future__ import annotations

import logging
from typing import Literal

from mtpeft.adapters.lowrank import LowRankConfig
from mtpeft.utils.schema import NonNegativeFloat, PositiveInt, config_dataclass

#: ``dispatch: auto`` runs the experts densely up to this total rank E·r_e (CPU, tiny model: dense E=8, r=8
#: 1.29x LoRA per training step vs sparse 1.44x; at E=16 sparse 1.47x vs dense 1.52x).
AUTO_DENSE_MAX_RANK = 64
log = logging.getLogger("mtpeft.methods.moe_lora")  # the package's name, as before it was a package


@config_dataclass
class MoELoRAConfig(LowRankConfig):
    num_experts: PositiveInt = 4
    """E, LoRA experts per adapted linear (docs/methods.md 7a recommends 4-8; ours: 4)."""
    top_k: PositiveInt = 2
    """Experts per token (MixLoRA README: top-2); ``top_k = num_experts`` is dense (LoRAMoE-style)."""
    expert_rank: Literal["r", "r/E"] = "r"
    """Rank of each expert: r (MoLA/MixLoRA) or r / num_experts (parameter-matched, MOELoRA)."""
    gate_input: Literal["token", "task"] = "token"
    """Route on each token's hidden state (MoLA/MixLoRA) or on a task embedding (MOELoRA, model-level)."""
    task_embedding_dim: PositiveInt = 64
    """Task-embedding width of the ``task`` gate (MOELoRA ``te_dim 64``)."""
    router_init_std: NonNegativeFloat = 0.02
    """Std of the normal init of the token routers (MixLoRA ``router_init_range 0.02``)."""
    balance_loss_coef: NonNegativeFloat = 0.01
    """Weight of the Switch/Mixtral load-balancing loss (MixLoRA README: 0.01); 0 disables it."""
    balance_scope: Literal["global", "router"] = "global"
    """``global``: one loss over the concatenated logits of all routers (Mixtral/MoE-PEFT);
    ``router``: mean of one loss per router (ours; balances each router's own experts)."""
    router_z_loss_coef: NonNegativeFloat = 0.0
    """Weight of the router z-loss mean(logsumexp(logits)^2) (ours: off; MixLoRA switch config: 0.01)."""
    expert_init: Literal["kaiming", "normal"] = "kaiming"
    """Init of the experts' A matrices: Kaiming-uniform (LoRA, MixLoRA, LoRAMoE) or N(0, 0.01) (MOELoRA)."""
    dispatch: Literal["auto", "sparse", "dense"] = "auto"
    """How the chosen experts run (the same sum; results agree to rounding): ``sparse``, each expert on its
    own tokens (cost ~ k, plus sorting and gather/scatter); ``dense``, every expert on every token with zero
    gates for the unchosen ones (cost ~ E, in two large products); ``auto`` (ours): dense when
    E·r_e <= 64, the crossover measured on CPU with the tiny model, else sparse. ``top_k = E`` is always dense."""

    def __post_init__(self) -> None:
        """Cross-field checks (the layer prefixes the messages with ``method``); a note for MOELoRA-style
        variants that are not MOELoRA."""
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.expert_rank == "r/E" and self.r % self.num_experts:
            raise ValueError(
                f"expert_rank='r/E' needs r={self.r} divisible by num_experts={self.num_experts}"
            )
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
