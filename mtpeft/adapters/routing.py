"""Bookkeeping shared by routed methods (HyCAM's CAM routers, MoE-LoRA's token routers).

A router keeps what it computed in its last call (`RouterRecord`: logits, gates or chosen experts, the
probabilities it used); the model reads the records after the forward, together with the non-padding
mask of the call (`token_mask`), and reduces them over the real tokens only:

* `RouterRecord.usage` sums, per expert, the routing mass and the router probability over the real tokens
  (`RouterUsage`); `pool` adds the usages of several routers (the "global" form: one loss over all of
  them, as Mixtral's ``load_balancing_loss_func`` concatenates the logits of every layer);
* `switch_balance_loss` is the Switch Transformer / Mixtral load-balancing loss ``Σ_i f_i · P_i`` on a
  usage, with ``f_i`` the share of routing mass and ``P_i`` the mean probability of expert i, optionally
  times E (the Switch normalisation; HyCAM's README formula has no E factor, MoE-LoRA's has);
* `router_z_loss` is the ST-MoE router z-loss, `entropy` the router entropy, `stats_row` the per-expert
  usage shares and the mean entropy that routed methods log per layer (`layer_stats`).

The layers never read the mask: they keep their tensors and the model reduces them after the call, so a
gradient-checkpointing recompute runs exactly the computation of the forward. Every reduction is a
matrix product with the float mask (or a plain sum where no mask is known), so the losses stay
differentiable with respect to the router. Documented with the methods in docs/methods.md (§2, §7).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

#: Floor of the probabilities whose log `entropy` takes (a zero probability then adds 0, not NaN).
ENTROPY_EPS = 1e-12


def token_mask(
    attention_mask: torch.Tensor | None,
    n_tokens: int,
    batch: int | None = None,
    device: torch.device | None = None,
) -> torch.Tensor | None:
    """1.0 for real tokens, 0.0 for padding, flattened over the N = B·S tokens a router saw, or None.

    The B rows are the mask's (they must equal ``batch`` when given) and S = N / B is taken from the
    mask's last S columns (with a KV cache the mask also covers the earlier positions). None when the mask
    does not describe N tokens: no 2-D mask, another batch size, N not a multiple of B, or S longer than
    the mask.
    """
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    rows, columns = attention_mask.shape
    if (batch is not None and rows != batch) or rows == 0 or n_tokens % rows:
        return None
    seq = n_tokens // rows
    if seq > columns:
        return None
    return attention_mask[:, columns - seq :].reshape(-1).to(device=device, dtype=torch.float32)


def masked_sum(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Σ over the real tokens of per-token rows ``values`` [N, ...]: ``mask @ values``, or a plain sum over
    the N rows when ``mask`` is None (every token real)."""
    return values.sum(0) if mask is None else mask @ values


def expert_slots(selected: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Routed slots per token and expert, [N, E] (0..k), from the chosen expert ids [N, k]."""
    return F.one_hot(selected, num_experts).sum(dim=1)


def entropy(probs: torch.Tensor, log_probs: torch.Tensor | None = None) -> torch.Tensor:
    """H(p) = -Σ_i p_i log p_i over the last dim. ``log_probs`` defaults to ``log(max(p, 1e-12))``; pass
    ``logits.log_softmax(-1)`` where the logits are at hand (exact also for probabilities that underflow)."""
    if log_probs is None:
        log_probs = probs.clamp_min(ENTROPY_EPS).log()
    return -(probs * log_probs).sum(-1)


@dataclasses.dataclass
class RouterUsage:
    """A router's use of its experts over the real tokens of one call (sums, not means)."""

    assigned: torch.Tensor
    """[E] routing mass per expert: Σ_tokens g_i (gates) or the routed (token, slot) pairs (top-k)."""
    probs: torch.Tensor
    """[E] Σ_tokens softmax(z)_i."""
    tokens: torch.Tensor
    """Number of real tokens (a 0-dim tensor)."""

    def clamped(self) -> RouterUsage:
        """The same usage with at least one token, so that means over an all-padding call are 0, not NaN."""
        return dataclasses.replace(self, tokens=self.tokens.clamp_min(1.0))


def pool(usages: Sequence[RouterUsage]) -> RouterUsage:
    """The usage of several routers taken together (the tokens of all of them, each expert index summed)."""
    return RouterUsage(
        assigned=torch.stack([u.assigned for u in usages]).sum(0),
        probs=torch.stack([u.probs for u in usages]).sum(0),
        tokens=torch.stack([u.tokens for u in usages]).sum(),
    )


@dataclasses.dataclass
class RouterRecord:
    """What a router keeps from its last call, one row per token (fp32), for the losses and statistics.

    Exactly one of ``gates`` (per-expert routing weights, e.g. HyCAM's straight-through one-hot) and
    ``selected`` (the chosen expert ids of top-k routing) is set.
    """

    logits: torch.Tensor
    """Router logits z, [N, E]."""
    gates: torch.Tensor | None = None
    """Routing weight of every expert per token, [N, E]; each row sums to 1."""
    selected: torch.Tensor | None = None
    """Ids of the k experts each token was routed to, [N, k]."""
    probs: torch.Tensor | None = None
    """softmax(z) [N, E] as the router computed it; None: computed from ``logits`` when read."""
    mask: torch.Tensor | None = None
    """1.0 real token, 0.0 padding, [N]; None: every token is real (or no mask was known)."""

    def __post_init__(self) -> None:
        if (self.gates is None) == (self.selected is None):
            raise ValueError("RouterRecord needs exactly one of gates and selected")

    @property
    def slots_per_token(self) -> int:
        """Routing mass each token hands out: k for top-k routing, 1 for gates (rows summing to 1)."""
        return 1 if self.selected is None else self.selected.shape[1]

    def router_probs(self) -> torch.Tensor:
        """softmax(z), [N, E]: the router's own when it kept them, else computed from the logits."""
        return self.probs if self.probs is not None else self.logits.softmax(dim=-1)

    def assigned(self) -> torch.Tensor:
        """Routing mass per token and expert, [N, E]: the gates, or the routed slot counts (fp)."""
        if self.gates is not None:
            return self.gates
        return expert_slots(self.selected, self.logits.shape[-1]).to(self.logits.dtype)

    def float_mask(self) -> torch.Tensor | None:
        """The mask on the logits' device and in their dtype (None when every token is real)."""
        if self.mask is None:
            return None
        return self.mask.to(device=self.logits.device, dtype=self.logits.dtype)

    def usage(self) -> RouterUsage:
        """Routing mass, probability and number of tokens, summed over the real tokens (products with the
        mask: differentiable in the gates and probabilities, and deterministic on CUDA, unlike index_add)."""
        mask = self.float_mask()
        probs = self.router_probs()
        tokens = self.logits.new_tensor(float(self.logits.shape[0])) if mask is None else mask.sum()
        return RouterUsage(masked_sum(self.assigned(), mask), masked_sum(probs, mask), tokens)

    def entropy(self) -> torch.Tensor:
        """Router entropy per token, [N]: from the router's probabilities when it kept them, else from the
        logits (softmax · log_softmax)."""
        if self.probs is not None:
            return entropy(self.probs)
        return entropy(self.logits.softmax(dim=-1), self.logits.log_softmax(dim=-1))

    def stats_row(self) -> torch.Tensor:
        """[E + 1]: each expert's share of the routed slots and the mean router entropy, over real tokens."""
        usage = self.usage().clamped()
        mean_entropy = masked_sum(self.entropy(), self.float_mask()) / usage.tokens
        shares = usage.assigned / (usage.tokens * self.slots_per_token)
        return torch.cat([shares, mean_entropy[None]])


def switch_balance_loss(usage: RouterUsage, num_experts: int | None = None) -> torch.Tensor:
    """Switch/Mixtral load balancing ``Σ_i f_i · P_i`` with ``f_i`` = routing mass / tokens and ``P_i`` =
    Σ softmax(z)_i / tokens, over the real tokens of ``usage`` (pass it `RouterUsage.clamped`).

    ``num_experts``: the Switch normalisation ``E · Σ_i f_i P_i`` (MoE-LoRA; = k at perfect balance with
    k slots per token). None: no E factor (HyCAM's formula; = 1/E at perfect balance).
    """
    loss = (usage.assigned / usage.tokens * usage.probs / usage.tokens).sum()
    return loss if num_experts is None else num_experts * loss


def router_z_loss(logits: torch.Tensor, mask: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss, the mean of logsumexp(z)² over the ``tokens`` real tokens."""
    return masked_sum(torch.logsumexp(logits, dim=-1).square(), mask) / tokens


def layer_stats(rows: Mapping[str, torch.Tensor], share_name: str) -> dict[str, float]:
    """``{layer}/{share_name.format(i)}`` and ``{layer}/entropy`` from each layer's [E + 1] `stats_row`."""
    stats = {}
    for layer, row in rows.items():
        *shares, mean_entropy = row.tolist()
        stats.update({f"{layer}/{share_name.format(i)}": share for i, share in enumerate(shares)})
        stats[f"{layer}/entropy"] = mean_entropy
    return stats
