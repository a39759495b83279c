"""C-Poly: the equations by hand, exclusivity of task skills, reduction to peft Poly, the worked count.

The contract (mixed-task rows, beam search, parameter counts by hand for several T, H, B and weightings, bad
configs) runs on the variants ``cpoly-*`` of tests/test_method_contract.py.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from mtpeft.methods import build_method, parse_method_config
from mtpeft.methods.cpoly import CPolyConfig, CPolyLinear
from tests.conftest import make_tiny_base, qwen2_5_0_5b_shape_on_meta

NUM_TASKS = 3
CONF = Path(__file__).resolve().parents[1] / "conf" / "method"
VARIANTS = [
    (weight, joint)
    for weight, joint in itertools.product(["fixed", "learned_raw", "gumbel_sigmoid"], [False, True])
    if not (weight == "learned_raw" and joint)
]


def _randomise(module: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def _inputs(batch: int = 4, length: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (batch, length), generator=gen), torch.arange(batch) % NUM_TASKS


def _reference(layer: CPolyLinear, x: torch.Tensor, task_ids: torch.Tensor, cfg: CPolyConfig) -> torch.Tensor:
    """docs/methods.md 6.2 at eval, written out row by row, head by head, skill by skill."""
    h_, k_, b_, r = cfg.n_splits, cfg.n_skills, cfg.n_specific_skills, cfg.r
    out = layer.base_layer(x)
    for n, t in enumerate(task_ids.tolist()):
        z = torch.sigmoid(layer.cpoly_logits[t]).view(h_, k_)
        if cfg.specific_weight == "fixed":
            v = torch.ones(b_)
        elif cfg.specific_weight == "learned_raw":
            v = layer.cpoly_specific_w[t]
        else:
            v = torch.sigmoid(layer.cpoly_specific_w[t])
        v = v.expand(h_, b_)  # one weight per task and skill, shared by every head
        if cfg.normalize_jointly:
            total = z.sum(-1, keepdim=True) + v.sum(-1, keepdim=True)
            w, u = z / total, v / total
        else:
            w, u = z / z.sum(-1, keepdim=True), v
        a_heads, b_heads = [], []
        for h in range(h_):
            a_h = sum(w[h, k] * layer.cpoly_A[h, k] for k in range(k_))
            b_h = sum(w[h, k] * layer.cpoly_B[h, k] for k in range(k_))
            a_h = a_h + sum(u[h, j] * layer.cpoly_specific_A[t, h, j] for j in range(b_))
            b_h = b_h + sum(u[h, j] * layer.cpoly_specific_B[t, h, j] for j in range(b_))
            a_heads.append(a_h)  # [d_in / H, r]: input features of head h
            b_heads.append(b_h)  # [r, d_out / H]: output features of head h
        a_t, b_t = torch.cat(a_heads, dim=0), torch.cat(b_heads, dim=1)
        out[n] = out[n] + x[n] @ a_t @ b_t / r
    return out


@pytest.mark.parametrize(("specific_weight", "normalize_jointly"), VARIANTS)
def test_forward_matches_the_equations(specific_weight: str, normalize_jointly: bool) -> None:
    cfg = CPolyConfig(
        r=3,
        n_skills=3,
        n_specific_skills=2,
        n_splits=2,
        specific_weight=specific_weight,
        normalize_jointly=normalize_jointly,
    )
    torch.manual_seed(0)
    layer = CPolyLinear(nn.Linear(8, 6), cfg, num_tasks=NUM_TASKS)
    _randomise(layer)
    layer.eval()
    x = torch.randn(5, 4, 8)
    task_ids = torch.tensor([2, 0, 1, 2, 1])
    with torch.no_grad():
        torch.testing.assert_close(layer(x, task_ids=task_ids), _reference(layer, x, task_ids, cfg))


def test_specific_weights_are_one_per_task_shared_by_heads() -> None:
    """docs/methods.md §6.2: a task's own skills get one weight per task (T x B), not one per MHR head."""
    cfg = CPolyConfig(r=2, n_specific_skills=2, n_splits=2, specific_weight="learned_raw")
    layer = CPolyLinear(nn.Linear(8, 6), cfg, num_tasks=NUM_TASKS)
    assert layer.cpoly_specific_w.shape == (NUM_TASKS, 2)
    with torch.no_grad():
        layer.cpoly_specific_w.copy_(torch.arange(NUM_TASKS * 2.0).view(NUM_TASKS, 2))
    _, specific = layer.mixing_weights(torch.tensor([2, 0]))
    torch.testing.assert_close(specific[:, 0], specific[:, 1])
    torch.testing.assert_close(specific[:, 0], torch.tensor([[4.0, 5.0], [0.0, 1.0]]))


def test_training_mode_samples_the_allocation() -> None:
    torch.manual_seed(0)
    layer = CPolyLinear(nn.Linear(8, 6), CPolyConfig(r=2, init_weights=False), num_tasks=NUM_TASKS)
    x, task_ids = torch.randn(2, 3, 8), torch.tensor([0, 1])
    layer.train()
    first, second = layer(x, task_ids=task_ids), layer(x, task_ids=task_ids)
    assert not torch.allclose(first, second)  # Gumbel-sigmoid noise at training
    (first.sum() + second.sum()).backward()
    assert layer.cpoly_logits.grad[:2].abs().sum() > 0 and layer.cpoly_specific_w.grad[:2].abs().sum() > 0


@pytest.mark.parametrize("specific_weight", ["fixed", "learned_raw", "gumbel_sigmoid"])
def test_task_skills_are_exclusive(specific_weight: str) -> None:
    options = {"r": 4, "n_specific_skills": 2, "n_splits": 2, "specific_weight": specific_weight}
    model = build_method("cpoly", options, make_tiny_base(), num_tasks=NUM_TASKS)
    _randomise(model)
    ids, _ = _inputs(batch=2)
    task0 = torch.zeros(2, dtype=torch.long)
    # gradients of task 0 never reach the other tasks' skills or weights
    model.train()
    model(input_ids=ids, task_ids=task0, labels=ids).loss.backward()
    specific = {n: p for n, p in model.named_parameters() if "cpoly_specific" in n}
    assert specific
    for name, p in specific.items():
        assert p.grad is not None and p.grad[0].abs().sum() > 0, name
        assert torch.count_nonzero(p.grad[1:]) == 0, name
    # changing task 1's and 2's skills leaves task 0's output as it is, changing task 0's does not
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids, task_ids=task0).logits
        for p in specific.values():
            p[1:].add_(1.0)
        torch.testing.assert_close(model(input_ids=ids, task_ids=task0).logits, before)
        for p in specific.values():
            p[0].add_(1.0)
        assert not torch.allclose(model(input_ids=ids, task_ids=task0).logits, before, atol=1e-4)


@pytest.mark.parametrize("n_splits", [1, 2])
def test_without_specific_skills_equals_peft_poly(n_splits: int) -> None:
    shared = {"r": 4, "n_skills": 3, "n_splits": n_splits}
    poly = build_method("poly", shared, make_tiny_base(), num_tasks=NUM_TASKS)
    cpoly = build_method("cpoly", {**shared, "n_specific_skills": 0}, make_tiny_base(), num_tasks=NUM_TASKS)
    _randomise(poly)
    rename = {
        ".poly_lora_A.default": ".cpoly_A",
        ".poly_lora_B.default": ".cpoly_B",
        ".poly_router.default.module_logits": ".cpoly_logits",
    }
    state = {}
    for name, value in poly.adapter_state_dict().items():
        old = next(o for o in rename if name.endswith(o))
        state[name.removesuffix(old) + rename[old]] = value
    cpoly.load_adapter_state_dict(state)  # exact key match: every C-Poly parameter has a Poly twin
    assert cpoly.count_parameters() == poly.count_parameters()
    assert cpoly.expected_trainable_parameters() == poly.expected_trainable_parameters()
    ids, task_ids = _inputs()
    poly.eval()
    cpoly.eval()
    with torch.no_grad():
        expected = poly(input_ids=ids, task_ids=task_ids).logits
        torch.testing.assert_close(cpoly(input_ids=ids, task_ids=task_ids).logits, expected)


def test_methods_md_worked_count_qwen_shape() -> None:
    """docs/methods.md section 11: masked C-Poly (K=4, B=1), r=8, T=8, q,k,v,o, Qwen2.5-0.5B shape: 12.98 M."""
    base = qwen2_5_0_5b_shape_on_meta()
    model = build_method("cpoly", {"specific_weight": "fixed"}, base, num_tasks=8)
    assert model.count_parameters()[0] == model.expected_trainable_parameters() == 12_979_200


def test_yaml_defaults_are_the_config_defaults() -> None:
    values = OmegaConf.to_container(OmegaConf.load(CONF / "cpoly.yaml"))
    assert values.pop("name") == "cpoly"
    assert parse_method_config("cpoly", values) == parse_method_config("cpoly", {})
