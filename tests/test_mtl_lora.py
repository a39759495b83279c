"""MTL-LoRA specifics: the equations, the reduction to LoRA, a layer called without task ids, the init.

The contract (missing / out-of-range task ids in forward and generate, mixed-task rows, identity at init,
save/load, generation, parameter counts by hand, bad configs) runs on the variants ``mtl_lora-*`` of
tests/test_method_contract.py.
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
