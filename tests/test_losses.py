"""The LM loss without full logits equals the loss from full logits, through every method's wrapper."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtpeft.eval import train_defaults
from mtpeft.losses import head_token_losses, model_token_losses, per_task_mean, token_losses
from mtpeft.methods import available_methods, build_method
from mtpeft.module import MultiTaskModule
from mtpeft.run import build_module
from tests.conftest import make_tiny_base
from tests.contract import merged
from tests.test_method_contract import PRIMARY

TOL = {"rtol": 1e-6, "atol": 1e-6}


def _batch(batch: int = 4, length: int = 10, seed: int = 1) -> dict[str, torch.Tensor]:
    """Left-padded rows with answer-only labels (prompt and padding are -100), as the datamodule builds."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ids[0, :3] = 0
    labels = ids.clone()
    labels[:, : length // 2] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "task_ids": torch.arange(batch) % 3}


def _adapted(name: str, seed: int = 0) -> nn.Module:
    case = PRIMARY[name]  # each method's first contract case, its identity init switched off
    torch.manual_seed(seed)
    options = merged(case.options, case.non_identity or {})
    model = build_method(name, options, make_tiny_base("llama"), num_tasks=case.num_tasks)
    return model.train()


def _reference(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], task_ids=batch["task_ids"]
    )
    return token_losses(out.logits, batch["labels"])


def _chunked(model: nn.Module, batch: dict[str, torch.Tensor], **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    return model_token_losses(
        lambda: model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], task_ids=batch["task_ids"]
        ),
        model.base_model.get_output_embeddings(),
        batch["labels"],
        **kwargs,
    )


def _grads(model: nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    if not loss.requires_grad:  # method=none: nothing to train
        return {}
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def test_head_losses_equal_full_logits_in_chunks() -> None:
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=False)
    hidden = torch.randn(3, 7, 16, requires_grad=True)
    labels = torch.randint(0, 50, (3, 7))
    labels[0, :4] = -100
    ref, ref_mask = token_losses(head(hidden), labels)
    ref_grad = torch.autograd.grad(ref.sum(), hidden)[0]
    loss, mask = head_token_losses(head, hidden, labels, chunk_bytes=4 * 50 * 3)  # 3 rows a chunk
    assert torch.equal(mask, ref_mask) and loss[~mask].eq(0).all()
    torch.testing.assert_close(loss, ref, **TOL)
    torch.testing.assert_close(torch.autograd.grad(loss.sum(), hidden)[0], ref_grad, **TOL)


@pytest.mark.parametrize("name", available_methods())
def test_loss_and_gradients_equal_full_logits_for_every_method(name: str) -> None:
    model, batch = _adapted(name), _batch()
    torch.manual_seed(0)  # dropout, where a method has it, draws the same masks in both passes
    ref, ref_mask = _reference(model, batch)
    ref_grads = _grads(model, ref.sum())
    torch.manual_seed(0)
    loss, mask = _chunked(model, batch, chunk_bytes=4 * 128 * 5)  # 5 rows per chunk: several chunks
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(loss, ref, **TOL)
    grads = _grads(model, loss.sum())
    assert grads.keys() == ref_grads.keys() and bool(grads) == (name != "none")
    for key, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[key], **TOL, msg=key)


def test_head_sees_only_counted_rows_in_bounded_chunks() -> None:
    model, batch = _adapted("lora"), _batch(batch=4, length=10)
    head = model.base_model.get_output_embeddings()
    calls: list[tuple[torch.Size, int]] = []  # (input shape, output's last stride: 0 for the recorder)
    handle = head.register_forward_hook(lambda m, args, out: calls.append((args[0].shape, out.stride(-1))))
    try:
        _, mask = _chunked(model, batch, chunk_bytes=4 * 128 * 4)
    finally:
        handle.remove()
    recorded, *chunks = calls
    assert recorded == (batch["input_ids"].shape + (32,), 0)  # the forward's call: a zero-memory view
    rows = [shape[0] for shape, _ in chunks]
    assert sum(rows) == int(mask.sum()) and max(rows) <= 4  # never [B, S, V] logits at once


def test_head_is_restored_after_the_loss() -> None:
    model, batch = _adapted("lora"), _batch()
    head = model.base_model.get_output_embeddings()
    _chunked(model, batch)
    assert "forward" not in vars(head)
    out = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], task_ids=batch["task_ids"]
    )
    assert out.logits.shape[-1] == 128 and out.logits.is_floating_point()


class _SoftCapped(nn.Module):
    """A wrapper that changes the logits after the head (like Gemma-2's soft-capping)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        out["logits"] = 5.0 * torch.tanh(out.logits / 5.0)
        return out


def test_models_that_change_logits_fall_back_to_full_logits() -> None:
    base, batch = make_tiny_base("llama"), _batch()
    capped = _SoftCapped(base)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    ref, _ = token_losses(capped(**inputs).logits, batch["labels"])
    loss, _ = model_token_losses(lambda: capped(**inputs), base.get_output_embeddings(), batch["labels"])
    torch.testing.assert_close(loss, ref, **TOL)


def test_module_lm_loss_matches_the_full_logits_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(MultiTaskModule, "task_names", property(lambda self: ["a", "b", "c"]))
    model, batch = _adapted("mtl_lora"), _batch()
    module = build_module(train_defaults(), model, tokenizer=None)
    torch.manual_seed(0)  # same dropout masks in both passes
    loss, task_loss, task_tokens = module._lm_loss(batch)
    torch.manual_seed(0)
    ref, mask = _reference(model, batch)
    ref_task_loss, ref_tokens = per_task_mean(ref, mask, batch["task_ids"], 3)
    torch.testing.assert_close(loss, ref.sum() / mask.sum(), **TOL)
    torch.testing.assert_close(task_loss, ref_task_loss, **TOL, equal_nan=True)
    assert torch.equal(task_tokens, ref_tokens)
