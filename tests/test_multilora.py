"""MultiLoRA specifics: the equations, the reduction to LoRA, init and first-step gradients.

The contract (task ids ignored, identity at init, only adapter params change, save/load, generation,
parameter counts by hand, bad configs) runs on the variants ``multilora-*`` of tests/test_method_contract.py.
"""

from __future__ import annotations

import pytest
import torch

from mtpeft.methods import build_method
from tests.conftest import ARCHS, lora_twin, make_tiny_base

V0 = "model.layers.0.self_attn.v_proj"


def multilora(arch: str = "llama", **cfg) -> torch.nn.Module:
    return build_method("multilora", {"dropout": 0.0, **cfg}, make_tiny_base(arch), num_tasks=2).eval()


def randomize(model: torch.nn.Module, std: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


@pytest.mark.parametrize("granularity", ["channel", "module"])
def test_linear_matches_equations(granularity):
    model = multilora(r=4, alpha=8.0, num_loras=3, scale_granularity=granularity)
    randomize(model)
    layer = model.base_model.get_submodule(V0)
    x = torch.randn(2, 5, layer.in_features)
    want = layer.base_layer(x) + (8.0 / 4) * sum(
        (x @ layer.lora_A[i].T @ layer.lora_B[i].T) * layer.lora_scaling[i] for i in range(3)
    )
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_one_lora_with_unit_scale_is_lora(arch):
    model = multilora(arch, num_loras=1, scale_granularity="module", init_weights=False)  # σ = 1
    lora = lora_twin(model.adapted, arch, 2)
    ids = torch.randint(0, 128, (2, 6))
    torch.testing.assert_close(model(ids).logits, lora(ids).logits)


def test_init_and_first_step_gradients_follow_reference():
    model = multilora(r=4).train()
    layer = model.base_model.get_submodule(V0)
    assert torch.count_nonzero(layer.lora_scaling) == 0
    # both projections Kaiming-uniform slice by slice: bound 1/sqrt(fan_in) of each [rows, cols] slice
    assert 0 < layer.lora_A.abs().max() <= layer.in_features**-0.5
    assert 0 < layer.lora_B.abs().max() <= 4**-0.5
    ids = torch.randint(0, 128, (2, 6))
    model(ids, labels=ids).loss.backward()
    # at step 0 only the scales get a gradient (A and B gradients are multiplied by σ = 0)
    assert layer.lora_scaling.grad.abs().sum() > 0
    assert layer.lora_A.grad.abs().sum() == 0 and layer.lora_B.grad.abs().sum() == 0
