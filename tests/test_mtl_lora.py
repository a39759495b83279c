"""MTL-LoRA specifics: the equations, the reduction to LoRA, task-id handling, parameter counts, configs.

The generic contract (identity at init, only adapter params change, save/load, generation) is in the
contract suite; these tests cover what only MTL-LoRA does.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtpeft.methods import build_method
from tests.conftest import ARCHS, lora_twin, make_tiny_base

T = 3  # tasks
Q0 = "model.layers.0.self_attn.q_proj"


def randomize(model: torch.nn.Module, names: tuple[str, ...] = ("",), std: float = 0.3) -> None:
    """Random values in every trainable parameter whose name ends with one of ``names``."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and name.endswith(names):
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def mtl(arch: str = "llama", **cfg) -> torch.nn.Module:
    return build_method("mtl_lora", {"dropout": 0.0, **cfg}, make_tiny_base(arch), num_tasks=T).eval()


@pytest.mark.parametrize("lambda_format", ["full", "diag"])
def test_linear_matches_equations(lambda_format):
    model = mtl(lambda_format=lambda_format, r=4, alpha=8.0, num_up=3, tau=0.5)
    randomize(model)
    layer = model.base_model.get_submodule(Q0)
    x = torch.randn(4, 5, layer.in_features)
    task_ids = torch.tensor([2, 0, 1, 2])
    out = layer(x, task_ids=task_ids)
    mix = F.softmax(layer.lora_B_w / 0.5, dim=-1)  # [T, n]
    for b, t in enumerate(task_ids.tolist()):
        b_t = sum(mix[t, i] * layer.lora_B[i] for i in range(3))
        lam = torch.diag(layer.lora_lambdas[t]) if lambda_format == "diag" else layer.lora_lambdas[t]
        want = layer.base_layer(x[b]) + (8.0 / 4) * x[b] @ (b_t @ lam @ layer.lora_A).T
        torch.testing.assert_close(out[b], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_one_up_projection_and_identity_lambda_is_lora(arch):
    model = mtl(arch, num_up=1, init_weights=False)  # Λ_t stays the identity
    randomize(model, names=("lora_A", "lora_B"))
    lora = lora_twin(model.adapted, arch, T, a_index=None)
    ids = torch.randint(0, 128, (3, 6))
    want = lora(ids).logits
    assert not torch.allclose(want, make_tiny_base(arch)(ids).logits)  # the update is not trivial
    torch.testing.assert_close(model(ids, task_ids=torch.tensor([0, 1, 2])).logits, want)


def test_mixed_task_batch_gives_each_row_its_task():
    model = mtl(init_weights=False)
    randomize(model)
    ids = torch.randint(0, 128, (3, 6))
    task_ids = torch.tensor([2, 0, 1])
    mixed = model(ids, task_ids=task_ids).logits
    for b in range(3):
        torch.testing.assert_close(
            mixed[b : b + 1], model(ids[b : b + 1], task_ids=task_ids[b : b + 1]).logits
        )
    # the task matters: the same rows under other task ids give other logits
    assert not torch.allclose(mixed, model(ids, task_ids=torch.tensor([0, 1, 2])).logits)


@pytest.mark.parametrize(
    "task_ids, match",
    [
        (None, "needs task_ids"),
        (torch.tensor([0, 3]), "out of range"),
        (torch.tensor([-1, 0]), "out of range"),
    ],
)
def test_missing_or_out_of_range_task_ids_raise(task_ids, match):
    model = mtl()
    with pytest.raises(ValueError, match=match):
        model(torch.randint(0, 128, (2, 4)), task_ids=task_ids)
    with pytest.raises(ValueError, match=match):
        model.generate(torch.randint(0, 128, (2, 4)), task_ids=task_ids, max_new_tokens=2)


def test_layer_called_without_task_ids_raises():
    layer = mtl().base_model.get_submodule(Q0)
    with pytest.raises(ValueError, match="task_ids"):
        layer(torch.randn(1, 2, layer.in_features))


def test_init_follows_reference():
    layer = mtl(r=4).base_model.get_submodule(Q0)
    assert torch.equal(layer.lora_lambdas, torch.eye(4).expand(T, 4, 4))
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / 3**0.5  # Kaiming-uniform (a=√5) on the [T, n=3] mixing logits
    assert layer.lora_B_w.abs().max() <= bound and layer.lora_B_w.std() > 0
    ones = mtl(r=4, init_w="ones", lambda_format="diag").base_model.get_submodule(Q0)
    assert torch.equal(ones.lora_B_w, torch.ones(T, 3)) and torch.equal(ones.lora_lambdas, torch.ones(T, 4))


@pytest.mark.parametrize(
    "arch, cfg",
    [
        ("llama", {}),
        ("qwen2", {"r": 4, "num_up": 1, "lambda_format": "diag"}),
        ("mistral", {"r": 2, "num_up": 5, "targets": ["q_proj", "v_proj", "up_proj", "down_proj"]}),
    ],
)
def test_parameter_count_matches_formula(arch, cfg):
    model = mtl(arch, **cfg)
    assert model.count_parameters()[0] == model.expected_trainable_parameters()


def test_parameter_count_worked_example():
    # docs/methods.md 4h per linear: r·d_in + T·r² + n·r·d_out + T·n; q,k,v,o of the tiny shape (d=32, d_kv=16)
    shapes = [(32, 32), (32, 16), (32, 16), (32, 32)]
    per_layer = sum(8 * d_in + T * 64 + 3 * 8 * d_out + T * 3 for d_in, d_out in shapes)
    assert mtl().expected_trainable_parameters() == 2 * per_layer


@pytest.mark.parametrize(
    "cfg, field",
    [
        ({"num_up": 0}, "method.num_up"),
        ({"tau": 0.0}, "method.tau"),
        ({"r": 0}, "method.r"),
        ({"lambda_format": "lower"}, "method.lambda_format"),
        ({"init_w": "zeros"}, "method.init_w"),
        ({"temperature": 0.1}, "temperature"),
    ],
)
def test_bad_config_names_the_field(cfg, field):
    with pytest.raises(ValueError, match=field):
        build_method("mtl_lora", cfg, make_tiny_base(), num_tasks=T)
