"""MoE-LoRA specifics: routing and dispatch vs a dense reference, the reduction to LoRA, the load-balancing
loss (padding, scopes, z-loss), the task gate, routing stats, the MOELoRA preset.

The contract (identity at init, only adapter params change, save/load, generation, mixed-task batches,
checkpointing, parameter counts by hand, bad configs) runs on the variants ``moe_lora-*`` of
tests/test_method_contract.py: token router dense/sparse, r/E, top_k = E, task gate, the MOELoRA preset.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mtpeft.methods import build_method
from tests.conftest import ARCHS, lora_twin, make_tiny_base

T = 3  # tasks
K0 = "model.layers.0.self_attn.k_proj"


def moe(arch: str = "llama", **cfg) -> torch.nn.Module:
    return build_method("moe_lora", {"dropout": 0.0, **cfg}, make_tiny_base(arch), num_tasks=T).eval()


def randomize(model: torch.nn.Module, std: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def dense_reference(layer, x: torch.Tensor, probs: torch.Tensor, k: int, scale: float) -> torch.Tensor:
    """W0 x + s Σ_{i∈top-k} g_i B_i A_i x, every expert run on every token and masked by the gate."""
    flat = x.reshape(-1, layer.in_features)
    top, idx = probs.topk(k, dim=-1)
    gates = torch.zeros_like(probs).scatter(1, idx, top / top.sum(-1, keepdim=True))
    experts = torch.stack([flat @ layer.lora_A[e].T @ layer.lora_B[e].T for e in range(probs.shape[1])], 1)
    out = layer.base_layer(flat) + scale * (gates[..., None] * experts).sum(1)
    return out.reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize(
    "cfg",
    [
        {"num_experts": 4, "top_k": 2},
        {"num_experts": 8, "top_k": 2, "expert_rank": "r/E"},
        {"num_experts": 3, "top_k": 1, "r": 4},
        {"num_experts": 4, "top_k": 4},  # dense, LoRAMoE-style
    ],
)
@pytest.mark.parametrize("dispatch", ["sparse", "dense"])
def test_token_routing_matches_dense_masked_reference(cfg, dispatch):
    model = moe(dispatch=dispatch, **cfg)
    randomize(model)
    layer = model.base_model.get_submodule(K0)
    x = torch.randn(3, 7, layer.in_features)
    probs = F.softmax(x.reshape(-1, layer.in_features) @ layer.router.weight.T, dim=-1)
    assert probs.argmax(-1).unique().numel() > 1  # the routing is not trivial
    torch.testing.assert_close(
        layer(x), dense_reference(layer, x, probs, cfg["top_k"], 16.0 / cfg.get("r", 8)), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("top_k", [2, 4])
def test_task_gate_matches_reference(top_k):
    model = moe(gate_input="task", top_k=top_k, expert_rank="r/E")
    randomize(model)
    layer = model.base_model.get_submodule(K0)
    x = torch.randn(3, 5, layer.in_features)
    task_ids = torch.tensor([2, 0, 2])
    gate = F.softmax(model.task_gate.embedding.weight @ model.task_gate.proj.weight.T, dim=-1)  # [T, E]
    probs = gate[task_ids].repeat_interleave(5, 0)
    want = dense_reference(layer, x, probs, top_k, 16.0 / 8)  # alpha / total rank, also for r/E (MOELoRA)
    torch.testing.assert_close(layer(x, task_ids=task_ids), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_one_expert_top_one_is_lora(arch):
    model = moe(arch, num_experts=1, top_k=1, init_weights=False)
    lora = lora_twin(model.adapted, arch, T)
    ids = torch.randint(0, 128, (2, 6))
    torch.testing.assert_close(model(ids).logits, lora(ids).logits)


def test_task_ids_needed_only_with_task_gate():
    """A property computed from the config (the contract checks the ids themselves)."""
    token = moe()
    assert not token.requires_task_ids and "requires_task_ids" not in vars(token)
    assert moe(gate_input="task").requires_task_ids


def manual_balance(model, mask: torch.Tensor) -> torch.Tensor:
    """E Σ_i f_i P_i over the concatenated non-padding tokens of all routers (Mixtral form)."""
    e = model.config.num_experts
    real = mask.reshape(-1).bool()
    logits = torch.cat([layer.record.logits[real] for layer in model.adapted.values()])
    selected = torch.cat([layer.record.selected[real] for layer in model.adapted.values()])
    f = F.one_hot(selected, e).float().mean(0).sum(0)  # slots counted separately, summed over slots
    return e * (f * logits.softmax(-1).mean(0)).sum()


def test_balance_loss_ignores_padding():
    model = moe(init_weights=False)
    randomize(model)
    ids = torch.randint(0, 128, (3, 8))
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 3:] = 0  # right padding: real tokens never see the padding (causal)
    model(ids, attention_mask=mask)
    loss = model.aux_losses()["load_balance"]
    torch.testing.assert_close(loss, 0.01 * manual_balance(model, mask))
    other = torch.where(mask.bool(), ids, torch.randint(0, 128, ids.shape))
    model(other, attention_mask=mask)
    torch.testing.assert_close(model.aux_losses()["load_balance"], loss)
    model(ids)  # without the mask the padding counts, and the loss changes
    assert not torch.allclose(model.aux_losses()["load_balance"], loss)


def test_balance_loss_scopes_and_z_loss():
    model = moe(balance_scope="router", router_z_loss_coef=0.5, balance_loss_coef=1.0)
    randomize(model)
    ids = torch.randint(0, 128, (2, 6))
    model(ids)
    losses = model.aux_losses()
    per_router, z = [], []
    for layer in model.adapted.values():
        f = F.one_hot(layer.record.selected, 4).float().mean(0).sum(0)
        per_router.append(4 * (f * layer.record.logits.softmax(-1).mean(0)).sum())
        z.append(torch.logsumexp(layer.record.logits, -1).square().mean())
    torch.testing.assert_close(losses["load_balance"], torch.stack(per_router).mean())
    torch.testing.assert_close(losses["router_z"], 0.5 * torch.stack(z).mean())
    # a uniform router gives k at any balance (P_i = 1/E): the Mixtral normalisation
    with torch.no_grad():
        for layer in model.adapted.values():
            layer.router.weight.zero_()
    model(ids)
    torch.testing.assert_close(model.aux_losses()["load_balance"], torch.tensor(2.0))
    assert moe(gate_input="task").aux_losses() == {}


def test_experts_without_tokens_get_zero_gradient():
    model = moe(num_experts=8, top_k=1, init_weights=False, dispatch="sparse").train()
    randomize(model)
    ids = torch.randint(0, 128, (1, 2))
    model(ids, labels=ids).loss.backward()
    layer = model.base_model.get_submodule(K0)
    assert layer.record.selected.unique().numel() < 8  # some experts saw no token
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None


def test_routing_stats():
    model = moe(num_experts=4, top_k=2)
    randomize(model)
    model(torch.randint(0, 128, (2, 6)))
    stats = model.routing_stats()
    for layer in ("layer0", "layer1"):
        assert math.isclose(sum(stats[f"{layer}/expert{i}_load"] for i in range(4)), 1.0, rel_tol=1e-5)
        assert 0 <= stats[f"{layer}/entropy"] <= math.log(4)
    task = moe(gate_input="task").routing_stats()
    assert math.isclose(sum(task[f"task2/expert{i}_weight"] for i in range(4)), 1.0, rel_tol=1e-5)


def _looped_dispatch_reference(h, weights, selected, lora_a, lora_b):
    """The per-expert Python loop `dispatch_experts` used before grouped GEMMs (kept here as the reference)."""
    num_experts, k = lora_a.shape[0], selected.shape[1]
    flat_sel = selected.reshape(-1)
    order = flat_sel.argsort(stable=True)
    counts = torch.bincount(flat_sel, minlength=num_experts).tolist()
    token_idx = order // k
    gates = weights.reshape(-1).index_select(0, order).to(h.dtype)[:, None].split(counts)
    chunks = h.index_select(0, token_idx).split(counts)
    outs = [
        ((x @ a.T) * g) @ b.T
        for x, g, a, b in zip(chunks, gates, lora_a.unbind(0), lora_b.unbind(0), strict=True)
    ]
    return h.new_zeros(h.shape[0], lora_b.shape[1]).index_add_(0, token_idx, torch.cat(outs))


@pytest.mark.parametrize("cfg", [{"num_experts": 8, "top_k": 2}, {"num_experts": 3, "top_k": 1}])
def test_dispatch_is_bit_identical_to_the_expert_loop(monkeypatch, cfg):
    """Outputs, loss, aux losses and every gradient on a fixed padded batch equal the looped reference."""
    from mtpeft.methods.moe_lora import layer as moe_layer

    ids = torch.randint(3, 128, (4, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    results = []
    for dispatch in (moe_layer.dispatch_experts, _looped_dispatch_reference):
        monkeypatch.setattr(moe_layer, "dispatch_experts", dispatch)
        model = moe(init_weights=False, dispatch="sparse", **cfg).train()
        randomize(model)
        out = model(ids, attention_mask=mask, labels=ids)
        total = out.loss + sum(model.aux_losses().values())
        total.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results.append((out.logits.detach(), total.detach(), grads))
    (logits, total, grads), (ref_logits, ref_total, ref_grads) = results
    assert torch.equal(logits, ref_logits) and torch.equal(total, ref_total)
    assert all(torch.equal(g, r) for g, r in zip(grads, ref_grads, strict=True))


def test_dense_formulation_matches_dispatch():
    """What ``torch.compile`` runs (all experts, zero gates for unchosen ones) is the same sum."""
    from mtpeft.methods.moe_lora import dense_experts, dispatch_experts

    gen = torch.Generator().manual_seed(0)
    h, a, b = (
        torch.randn(40, 16, generator=gen),
        torch.randn(6, 4, 16, generator=gen),
        torch.randn(6, 8, 4, generator=gen),
    )
    weights, selected = torch.randn(40, 6, generator=gen).softmax(-1).topk(2, dim=-1)
    torch.testing.assert_close(
        dense_experts(h, weights, selected, a, b), dispatch_experts(h, weights, selected, a, b)
    )


@pytest.mark.parametrize(
    ("experts", "rank", "dense"), [(8, 8, True), (4, 8, True), (16, 8, False), (8, 16, False)]
)
def test_auto_dispatch_is_dense_for_small_total_rank(experts, rank, dense):
    model = moe(num_experts=experts, r=rank)
    assert model.base_model.get_submodule(K0).dense is dense


def test_dense_and_sparse_dispatch_train_alike():
    """Same logits, loss (aux included) and gradients on a fixed padded batch, up to rounding."""
    ids = torch.randint(3, 128, (4, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    results = []
    for dispatch in ("sparse", "dense"):
        model = moe(num_experts=8, top_k=2, init_weights=False, dispatch=dispatch).train()
        randomize(model)
        out = model(ids, attention_mask=mask, labels=ids)
        total = out.loss + sum(model.aux_losses().values())
        total.backward()
        results.append((out.logits, total, [p.grad for p in model.parameters() if p.requires_grad]))
    (logits, total, grads), (ref_logits, ref_total, ref_grads) = results
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(total, ref_total)
    for grad, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-6)


def test_moelora_preset_is_exactly_moelora(tmp_path, caplog):
    """method=moe_lora/moelora: task gate over T + 1 embedding rows, dense, rank r/E, A ~ N(0, 0.01)."""
    from omegaconf import OmegaConf

    from tests.conftest import compose_train

    options = OmegaConf.to_container(compose_train(["method=moe_lora/moelora"], tmp_path).method)
    assert options.pop("name") == "moe_lora"
    with caplog.at_level("WARNING", logger="mtpeft.methods.moe_lora"):
        model = moe(**options)
    assert model.config.is_moelora and not caplog.records
    assert model.task_gate.embedding.num_embeddings == T + 1
    layer = model.base_model.get_submodule(K0)
    assert layer.lora_A.shape[1] == 8 // 4 and abs(float(layer.lora_A.detach().std()) - 0.01) < 0.003
    with caplog.at_level("WARNING", logger="mtpeft.methods.moe_lora"):
        moe(gate_input="task")  # top-2 of 4 with rank r: a MOELoRA-style variant, said so
    assert "not MOELoRA" in caplog.text and "method=moe_lora/moelora" in caplog.text
