"""The shared routing bookkeeping (`mtpeft.adapters.routing`): each function on hand-made tensors with known
answers, and HyCAM / MoE-LoRA against a frozen copy of the formulas they computed before they shared it
(aux losses, their gradients and routing statistics equal bit for bit, ``rtol=0, atol=0``)."""

from __future__ import annotations

import math
import re
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F

from mtpeft.adapters.routing import (
    RouterRecord,
    RouterUsage,
    entropy,
    expert_slots,
    layer_stats,
    masked_sum,
    pool,
    router_z_loss,
    switch_balance_loss,
    token_mask,
)
from mtpeft.methods import build_method
from tests.conftest import make_tiny_base

EXACT = {"rtol": 0, "atol": 0}


# -- the building blocks on hand-made tensors ---------------------------------------------------------
def test_token_mask_takes_the_last_columns_and_refuses_what_does_not_fit():
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])
    full = token_mask(mask, 6)
    assert full.dtype == torch.float32 and full.tolist() == [0, 1, 1, 1, 1, 0]
    assert token_mask(mask, 2).tolist() == [1, 0]  # one new token per row after a KV cache: last column
    assert token_mask(mask, 6, batch=2).tolist() == full.tolist()
    for bad in (token_mask(mask, 6, batch=3), token_mask(mask, 5), token_mask(mask, 8), token_mask(None, 6)):
        assert bad is None
    assert token_mask(mask[0], 3) is None  # not [B, S]


def test_masked_sum_and_expert_slots():
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    assert masked_sum(values, torch.tensor([1.0, 0.0, 1.0])).tolist() == [6.0, 8.0]
    assert masked_sum(values, None).tolist() == [9.0, 12.0]
    slots = expert_slots(torch.tensor([[0, 2], [1, 2]]), 3)
    assert slots.tolist() == [[1, 0, 1], [0, 1, 1]]


def test_entropy_of_uniform_one_hot_and_from_logits():
    uniform = torch.full((2, 4), 0.25)
    torch.testing.assert_close(entropy(uniform), torch.full((2,), math.log(4)))
    assert entropy(torch.tensor([[1.0, 0.0, 0.0]])).tolist() == [0.0]  # 0 · log 0 counts as 0, not NaN
    logits = torch.tensor([[0.3, -1.2, 2.0]])
    torch.testing.assert_close(
        entropy(logits.softmax(-1), logits.log_softmax(-1)), entropy(logits.softmax(-1))
    )


def test_record_usage_with_gates_and_with_selected_experts():
    logits = torch.tensor([[0.0, 0.0], [0.0, 0.0], [5.0, 1.0]])
    gates = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    usage = RouterRecord(logits, gates=gates, mask=torch.tensor([1.0, 1.0, 0.0])).usage()
    assert usage.assigned.tolist() == [1.0, 1.0] and usage.probs.tolist() == [1.0, 1.0]
    assert usage.tokens.item() == 2.0
    top2 = RouterRecord(logits, selected=torch.tensor([[0, 1], [1, 0], [0, 1]]))
    assert top2.slots_per_token == 2 and top2.usage().assigned.tolist() == [3.0, 3.0]
    assert top2.usage().tokens.item() == 3.0
    with pytest.raises(ValueError, match="exactly one of gates and selected"):
        RouterRecord(logits)


def test_switch_balance_loss_known_values():
    # 2 tokens, both routed to expert 0, router probabilities (0.75, 0.25): f = (1, 0), P = (0.75, 0.25)
    usage = RouterUsage(torch.tensor([2.0, 0.0]), torch.tensor([1.5, 0.5]), torch.tensor(2.0))
    assert switch_balance_loss(usage).item() == 0.75  # HyCAM: Σ f_i P_i
    assert switch_balance_loss(usage, num_experts=2).item() == 1.5  # Switch/Mixtral: E Σ f_i P_i
    # perfect balance of top-2 over 4 experts with a uniform router: k with the E factor, k / E without
    record = RouterRecord(torch.zeros(4, 4), selected=torch.tensor([[0, 1], [2, 3], [0, 2], [1, 3]]))
    assert switch_balance_loss(record.usage(), num_experts=4).item() == 2.0
    assert switch_balance_loss(record.usage()).item() == 0.5


def test_pool_and_an_all_padding_call():
    a = RouterUsage(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5]), torch.tensor(1.0))
    b = RouterUsage(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 1.0]), torch.tensor(2.0))
    both = pool([a, b])
    assert both.assigned.tolist() == [1.0, 2.0] and both.probs.tolist() == [1.5, 1.5]
    assert both.tokens.item() == 3.0
    padding = RouterRecord(torch.randn(3, 2), gates=torch.eye(2)[[0, 1, 0]], mask=torch.zeros(3)).usage()
    assert padding.tokens.item() == 0.0 and padding.clamped().tokens.item() == 1.0
    assert switch_balance_loss(padding.clamped()).item() == 0.0  # 0, not NaN


def test_router_z_loss_and_stats_row():
    logits = torch.zeros(3, 4)
    z = router_z_loss(logits, torch.tensor([1.0, 1.0, 0.0]), torch.tensor(2.0))
    torch.testing.assert_close(z, torch.tensor(math.log(4) ** 2))
    record = RouterRecord(
        logits, selected=torch.tensor([[0, 1], [0, 2], [3, 3]]), mask=torch.tensor([1.0, 1.0, 0.0])
    )
    row = record.stats_row()  # shares of the 4 real slots, then the mean entropy of a uniform router
    torch.testing.assert_close(row, torch.tensor([0.5, 0.25, 0.25, 0.0, math.log(4)]))
    stats = layer_stats({"layer3": row}, "expert{}_load")
    assert list(stats) == [*(f"layer3/expert{i}_load" for i in range(4)), "layer3/entropy"]
    assert stats["layer3/expert0_load"] == 0.5


# -- frozen copies of the formulas before the shared module (reference for bit-identical results) -----
def frozen_hycam_reduced(rec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    probs = rec.logits.softmax(dim=-1)
    if rec.mask is None:
        return rec.gates.sum(0), probs.sum(0), rec.logits.new_tensor(float(rec.logits.shape[0]))
    mask = rec.mask.to(device=rec.logits.device, dtype=rec.logits.dtype)
    return mask @ rec.gates, mask @ probs, mask.sum()


def frozen_hycam_balance(records) -> torch.Tensor:
    reduced = [frozen_hycam_reduced(rec) for rec in records]
    gates = torch.stack([g for g, _, _ in reduced]).sum(0)
    probs = torch.stack([p for _, p, _ in reduced]).sum(0)
    tokens = torch.stack([n for _, _, n in reduced]).sum().clamp_min(1.0)
    return (gates / tokens * probs / tokens).sum()


@torch.no_grad()
def frozen_hycam_stats(records, n: int) -> dict[str, float]:
    rows = []
    for rec in records:
        gates, _, tokens = frozen_hycam_reduced(rec)
        ent = -(rec.logits.softmax(dim=-1) * rec.logits.log_softmax(dim=-1)).sum(-1)
        ent_sum = ent.sum() if rec.mask is None else rec.mask.to(ent) @ ent
        rows.append(torch.cat([gates, ent_sum[None]]) / tokens.clamp_min(1.0))
    table = torch.stack(rows)
    stats = {}
    for layer, row in enumerate(table.tolist()):
        stats.update({f"layer{layer}/cam{k}_share": row[k] for k in range(n)})
        stats[f"layer{layer}/entropy"] = row[n]
    means = table.mean(0).tolist()
    stats.update({f"cam{k}_share": means[k] for k in range(n)})
    stats["entropy"] = means[n]
    stats["balance"] = float(frozen_hycam_balance(records))
    return stats


def frozen_hycam_token_mask(ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    if mask is None or mask.dim() != 2 or mask.shape[0] != ids.shape[0] or ids.shape[1] > mask.shape[1]:
        return None
    return mask[:, mask.shape[1] - ids.shape[1] :].reshape(-1).float()


def frozen_moe_routed(model):
    out = []
    for name, layer in model.adapted.items():
        rec = layer.record
        if layer.router is None or rec is None:
            continue
        n, mask = rec.logits.shape[0], model._attention_mask
        flat = torch.ones(n, device=rec.logits.device)
        if mask is not None and mask.dim() == 2 and n % mask.shape[0] == 0:
            seq = n // mask.shape[0]
            if seq <= mask.shape[1]:
                flat = (
                    mask[:, mask.shape[1] - seq :]
                    .reshape(-1)
                    .to(device=rec.logits.device, dtype=torch.float32)
                )
        out.append((name, rec.logits, rec.probs, rec.selected, flat))
    return out


def frozen_moe_aux(model) -> dict[str, torch.Tensor]:
    cfg, e = model.config, model.config.num_experts
    counts, probs, tokens, z_losses = [], [], [], []
    for _, logits, p, selected, mask in frozen_moe_routed(model):
        counts.append(mask @ F.one_hot(selected, e).sum(dim=1).to(mask.dtype))
        probs.append(mask @ p)
        tokens.append(mask.sum().clamp_min(1.0))
        if cfg.router_z_loss_coef > 0:
            z_losses.append(mask @ torch.logsumexp(logits, dim=-1).square() / tokens[-1])
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
def frozen_moe_stats(model) -> dict[str, float]:
    e = model.config.num_experts
    if model.task_gate is not None:
        gate = model.task_gate(torch.arange(model.num_tasks))
        stats = {
            f"task{t}/expert{i}_weight": float(gate[t, i]) for t in range(model.num_tasks) for i in range(e)
        }
        ent = -(gate * gate.clamp_min(1e-12).log()).sum(-1)
        stats.update({f"task{t}/entropy": float(ent[t]) for t in range(model.num_tasks)})
        return stats
    by_layer = defaultdict(list)
    for name, _, p, selected, mask in frozen_moe_routed(model):
        n = mask.sum().clamp_min(1.0)
        load = mask @ F.one_hot(selected, e).sum(dim=1).to(mask.dtype) / (n * selected.shape[1])
        ent = mask @ -(p * p.clamp_min(1e-12).log()).sum(-1) / n
        match = re.search(r"layers\.(\d+)\.", name)
        by_layer[f"layer{match.group(1)}" if match else name].append(torch.cat([load, ent[None]]))
    stats = {}
    for layer, rows in by_layer.items():
        mean = torch.stack(rows).mean(0)
        stats.update({f"{layer}/expert{i}_load": float(mean[i]) for i in range(e)})
        stats[f"{layer}/entropy"] = float(mean[e])
    if by_layer:
        stats["entropy"] = sum(stats[f"{layer}/entropy"] for layer in by_layer) / len(by_layer)
    return stats


# -- the methods against the frozen formulas -------------------------------------------------------------
def _randomised(method: str, options: dict):
    model = build_method(method, options, make_tiny_base(), num_tasks=3)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=gen) * (1.0 if "router" in name else 0.2))
    return model.train()


def _batch(padded: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    ids = torch.randint(3, 128, (3, 7), generator=torch.Generator().manual_seed(1))
    if not padded:
        return ids, None
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    mask[2, 5:] = 0  # right padding
    return ids, mask


def _assert_same_losses_and_grads(model, loss, ours: dict, frozen: dict) -> None:
    """Equal aux losses, and equal gradients of LM loss + aux losses for every trainable parameter."""
    assert list(ours) == list(frozen)
    params = [p for p in model.parameters() if p.requires_grad]
    for key in ours:
        torch.testing.assert_close(ours[key], frozen[key], **EXACT)
    grads = torch.autograd.grad(loss + sum(ours.values()), params, retain_graph=True, allow_unused=True)
    frozen_grads = torch.autograd.grad(loss + sum(frozen.values()), params, allow_unused=True)
    for grad, frozen_grad in zip(grads, frozen_grads, strict=True):
        assert (grad is None) == (frozen_grad is None)
        if grad is not None:
            torch.testing.assert_close(grad, frozen_grad, **EXACT)


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "no_mask"])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"dispatch": "dense"},
        {"routing": "soft_gumbel", "num_specialised": 3},
        {"routing": "softmax", "apply_to": "attn_output"},
        {"use_shared": False},
    ],
)
def test_hycam_losses_grads_and_stats_equal_the_frozen_formulas(options: dict, padded: bool) -> None:
    model = _randomised("hycam", options)
    ids, mask = _batch(padded)
    torch.manual_seed(0)
    loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    records = [cam.record for cam in model._cams]
    for rec in records:
        want = frozen_hycam_token_mask(ids, mask)
        assert (rec.mask is None) == (want is None)
        if want is not None:
            torch.testing.assert_close(rec.mask, want, **EXACT)
    frozen = {"load_balance": model.config.balance_coef * frozen_hycam_balance(records)}
    _assert_same_losses_and_grads(model, loss, model.aux_losses(), frozen)
    stats = model.routing_stats()
    assert stats == frozen_hycam_stats(records, model.config.num_specialised)
    assert list(stats) == list(frozen_hycam_stats(records, model.config.num_specialised))


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "no_mask"])
@pytest.mark.parametrize(
    "options",
    [
        {},  # dispatch auto (dense here), global balance scope
        {"dispatch": "sparse", "num_experts": 8, "top_k": 2},
        {"top_k": 4},
        {"num_experts": 3, "top_k": 1, "r": 6, "router_z_loss_coef": 0.01},
        {"balance_scope": "router", "router_z_loss_coef": 0.5, "balance_loss_coef": 1.0},
    ],
)
def test_moe_lora_losses_grads_and_stats_equal_the_frozen_formulas(options: dict, padded: bool) -> None:
    model = _randomised("moe_lora", {"dropout": 0.0, **options})
    ids, mask = _batch(padded)
    loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    _assert_same_losses_and_grads(model, loss, model.aux_losses(), frozen_moe_aux(model))
    stats = model.routing_stats()
    assert stats == frozen_moe_stats(model) and list(stats) == list(frozen_moe_stats(model))
    assert 0 < stats["layer0/entropy"] < math.log(model.config.num_experts)  # routing is not trivial


def test_moe_lora_task_gate_stats_equal_the_frozen_formula() -> None:
    model = _randomised("moe_lora", {"gate_input": "task"})
    model(torch.randint(3, 128, (2, 5)), task_ids=torch.tensor([0, 2]))
    assert model.aux_losses() == {}
    assert model.routing_stats() == frozen_moe_stats(model)
