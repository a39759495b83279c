"""The contract every registered method satisfies, on tiny Llama / Qwen2 / Mistral models.

Adding a method to the suite is one line in ``CASES``: options for a small config and, for
identity-initialised methods, the options that switch the identity init off.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest
import torch

from mtpeft.methods import available_methods, build_method, load_adapter
from tests.conftest import ARCHS, make_tiny_base

NUM_TASKS = 3


@dataclass
class Case:
    options: dict = field(default_factory=dict)
    non_identity: dict | None = None  # options that make the init non-identity (None: not applicable)


CASES: dict[str, Case] = {
    "none": Case(),
    "lora": Case({"r": 4}, {"init_weights": False}),
    "hycam": Case({"rank": 4, "num_specialised": 2}, {"init_weights": False}),
    "mtl_lora": Case({"r": 4}, {"init_weights": False}),
    "multilora": Case({"r": 4}, {"init_weights": False}),
    "moe_lora": Case({"r": 4}, {"init_weights": False}),
    "poly": Case({"r": 4}, {"init_weights": False}),
    "cpoly": Case({"r": 4}, {"init_weights": False}),
    "peml": Case({"lora": {"r": 4}}),
}

METHODS = available_methods()


def _build(name: str, arch: str = "llama", seed: int = 0, **extra):
    base = make_tiny_base(arch, seed=seed)
    options = {**copy.deepcopy(CASES[name].options), **extra}
    return build_method(name, options, base, num_tasks=NUM_TASKS), base


def _inputs(
    batch: int = 4, length: int = 9, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # one left-padded row
    ids[0, :2] = 0
    task_ids = torch.arange(batch) % NUM_TASKS
    return ids, mask, task_ids


def _logits(model, ids, mask, task_ids) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, task_ids=task_ids).logits


def _train_steps(model, steps: int = 3) -> None:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return
    optimizer = torch.optim.SGD(params, lr=0.5)
    ids, mask, task_ids = _inputs()
    for _ in range(steps):
        out = model(input_ids=ids, attention_mask=mask, task_ids=task_ids, labels=ids)
        loss = out.loss + sum(model.aux_losses().values(), torch.zeros(()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def test_every_registered_method_has_a_case() -> None:
    missing = sorted(set(METHODS) - set(CASES))
    assert not missing, f"add a Case for {missing} to CASES in {__file__}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", METHODS)
def test_identity_at_init(name: str, arch: str) -> None:
    model, _ = _build(name, arch)
    if not model.identity_at_init:
        pytest.skip(f"{name} is not identity-initialised")
    base = make_tiny_base(arch)
    ids, mask, task_ids = _inputs()
    with torch.no_grad():
        reference = base(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(_logits(model, ids, mask, task_ids), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", METHODS)
def test_non_identity_init_changes_output(name: str) -> None:
    if CASES[name].non_identity is None:
        pytest.skip(f"{name} has no identity init to switch off")
    model, _ = _build(name, **CASES[name].non_identity)
    ids, mask, task_ids = _inputs()
    with torch.no_grad():
        reference = make_tiny_base("llama")(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(_logits(model, ids, mask, task_ids), reference, atol=1e-4)


@pytest.mark.parametrize("name", METHODS)
def test_only_adapter_parameters_train_and_change(name: str) -> None:
    model, _ = _build(name)
    adapter = set(model.adapter_state_dict())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable <= adapter, (
        f"trainable parameters outside the adapter: {sorted(trainable - adapter)[:5]}"
    )
    assert model.count_parameters()[0] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    if not trainable:
        return
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train_steps(model)
    after = dict(model.named_parameters())
    frozen_changed = [n for n in before if n not in trainable and not torch.equal(before[n], after[n])]
    assert not frozen_changed, f"frozen parameters changed: {frozen_changed[:5]}"
    assert any(not torch.equal(before[n], after[n]) for n in trainable), "no trainable parameter changed"


@pytest.mark.parametrize("name", METHODS)
def test_trainable_parameter_count_matches_formula(name: str) -> None:
    model, _ = _build(name)
    assert model.count_parameters()[0] == model.expected_trainable_parameters()


@pytest.mark.parametrize("name", METHODS)
def test_save_load_round_trip(name: str, tmp_path) -> None:
    model, _ = _build(name)
    _train_steps(model, steps=2)
    model.save_adapter(tmp_path / "adapter")
    reloaded = load_adapter(tmp_path / "adapter", make_tiny_base("llama"))
    ids, mask, task_ids = _inputs()
    torch.testing.assert_close(_logits(reloaded, ids, mask, task_ids), _logits(model, ids, mask, task_ids))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", METHODS)
def test_generate_with_and_without_cache_agree(name: str, arch: str) -> None:
    model, _ = _build(name, arch)
    _train_steps(model, steps=2)
    ids, mask, task_ids = _inputs()
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=2)
    with_cache = model.generate(ids, attention_mask=mask, task_ids=task_ids, use_cache=True, **kwargs)
    without = model.generate(ids, attention_mask=mask, task_ids=task_ids, use_cache=False, **kwargs)
    assert torch.equal(with_cache, without)


@pytest.mark.parametrize("name", METHODS)
def test_mixed_task_batch_rows_match_single_rows(name: str) -> None:
    model, _ = _build(name)
    _train_steps(model, steps=2)
    ids, _, task_ids = _inputs()
    mask = torch.ones_like(ids)
    batched = _logits(model, ids, mask, task_ids)
    for row in range(ids.shape[0]):
        single = _logits(model, ids[row : row + 1], mask[row : row + 1], task_ids[row : row + 1])
        torch.testing.assert_close(batched[row : row + 1], single, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", METHODS)
def test_task_ids_checked(name: str) -> None:
    model, _ = _build(name)
    ids, mask, _ = _inputs()
    if not model.requires_task_ids:
        model(input_ids=ids, attention_mask=mask)  # task-agnostic: ids optional
        return
    with pytest.raises(ValueError, match="task_ids"):
        model(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match="out of range"):
        model(input_ids=ids, attention_mask=mask, task_ids=torch.full((ids.shape[0],), NUM_TASKS))


@pytest.mark.parametrize("name", METHODS)
def test_aux_loss_gradients_survive_gradient_checkpointing(name: str) -> None:
    model, _ = _build(name)
    model.gradient_checkpointing_enable()
    model.train()
    ids, mask, task_ids = _inputs()
    model(input_ids=ids, attention_mask=mask, task_ids=task_ids)
    aux = model.aux_losses()
    if not aux:
        pytest.skip(f"{name} has no auxiliary loss")
    sum(aux.values()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads), "aux loss produced no gradient"


@pytest.mark.parametrize("name", METHODS)
def test_gradient_checkpointing_gives_the_same_gradients(name: str) -> None:
    """Recomputed layers must see the same task ids (and everything else) as the original forward."""
    grads = []
    for checkpointing in (False, True):
        model, _ = _build(name)
        if not any(p.requires_grad for p in model.parameters()):
            pytest.skip(f"{name} has nothing to train")
        _train_steps(model, steps=1)  # move off the identity init so every parameter gets a gradient
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.eval()  # no dropout / routing noise: both passes compute the same function
        ids, mask, task_ids = _inputs()
        out = model(input_ids=ids, attention_mask=mask, task_ids=task_ids, labels=ids)
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], rtol=1e-4, atol=1e-6)


def test_unknown_method_and_key_errors_name_the_problem() -> None:
    base = make_tiny_base()
    with pytest.raises(KeyError, match="valid methods"):
        build_method("no_such_method", {}, base, num_tasks=1)
    with pytest.raises(ValueError, match=r"unknown key.*'rank'.*valid keys"):
        build_method("lora", {"rank": 4}, base, num_tasks=1)
    with pytest.raises(TypeError, match="method.r must be an integer"):
        build_method("lora", {"r": "8"}, base, num_tasks=1)
    with pytest.raises(ValueError, match="method.r must be a positive"):
        build_method("lora", {"r": 0}, base, num_tasks=1)
