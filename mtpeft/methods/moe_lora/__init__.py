"""MoE-LoRA: a mixture of LoRA experts behind a router on every target linear (docs/methods.md section 7).

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
the task gate are MOELoRA-style variants, and building one logs a warning saying so. With the task gate the
update depends on the task alone, so it merges per task (``merged_weight_deltas``: ``ΔW_t = (alpha / r)
Σ_{i∈S(t)} g_i(t) B_i A_i``, ``python -m mtpeft.export --merge``); the token routers cannot be merged.

Dispatch (``dispatch``, same sum either way): ``sparse`` sorts the (token, slot) pairs by expert, runs
each expert's A/B on its own tokens only (on CPU two grouped GEMMs per layer, whatever E) and scatter-adds
the gate-weighted outputs back, so the cost grows with k, not with E; ``dense`` runs every expert on every
token with zero gates for the unchosen ones (two large products, cost ~ E), which is cheaper while E·r_e is
small; ``auto`` (default) picks dense up to E·r_e = 64 (`AUTO_DENSE_MAX_RANK`), else sparse. Under
``torch.compile`` sparse runs as dense (static shapes; see `dispatch_experts`). Experts that get no token
have a zero gradient rather than a missing one.

The routers keep a `mtpeft.adapters.routing.RouterRecord` of their last call (fp32 logits, probabilities,
chosen experts); `aux_losses` and `routing_stats` combine them with the attention mask recorded by
`MoELoRA.forward` (the record of the last forward, like the logits), through the shared routing functions.
The layers themselves never read the mask, so a gradient-checkpointing recompute runs exactly the same
computation, and because the losses are built from tensors of the checkpointed forward (non-reentrant),
their gradient reaches the routers. Trainable parameters per adapted linear: ``E·r_e·(d_in + d_out) + E·d_in``
(task gate: no per-linear router, plus ``(T+1)·64 + 64·E`` once: MOELoRA's embedding table has T + 1
rows, of which task ids 0..T-1 use the first T), docs/methods.md §7(h).

Files: `config.py` (the switches and their sources), `layer.py` (the expert linear, the task gate and the
two dispatch forms), `model.py` (the registered `MoELoRA` adapted model: losses and statistics).
"""

from mtpeft.methods.moe_lora.config import AUTO_DENSE_MAX_RANK, MoELoRAConfig
from mtpeft.methods.moe_lora.layer import (
    MOELORA_A_STD,
    MoELoRALinear,
    TaskGate,
    dense_experts,
    dispatch_experts,
)
from mtpeft.methods.moe_lora.model import MoELoRA

__all__ = [
    "AUTO_DENSE_MAX_RANK",
    "MOELORA_A_STD",
    "MoELoRA",
    "MoELoRAConfig",
    "MoELoRALinear",
    "TaskGate",
    "dense_experts",
    "dispatch_experts",
]
