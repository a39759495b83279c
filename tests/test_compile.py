"""``compile: true``: the compiled training step (`mtpeft.module.compile_training_step`) gives the eager
losses and gradients on fixed batches, for every method, in one graph where the method allows it.

The default suite checks one task-conditioned method with the ``aot_eager`` backend (Dynamo tracing with
``fullgraph=True`` and AOT autograd, no code generation: seconds). The slow suite compiles every method with
inductor (the backend ``compile: true`` uses), ``fullgraph=True``: no method has a graph break.
"""

from __future__ import annotations

import copy

import pytest
import torch

from mtpeft.methods import build_method
from mtpeft.module import compile_training_step, forward_losses
from tests.conftest import TINY_RUN, make_tiny_base

T = 3
METHODS = ("lora", "hycam", "mtl_lora", "multilora", "poly", "cpoly", "moe_lora", "peml")


def _batches() -> list[tuple[torch.Tensor, ...]]:
    """Three batches with different lengths, padding and task mixes (ids, mask, task ids, labels)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for length, tasks in ((9, [0, 1, 2, 0]), (10, [2, 2, 1, 0]), (12, [1, 0, 0, 2])):
        ids = torch.randint(3, 128, (4, length), generator=gen)
        mask = torch.ones_like(ids)
        mask[0, length - 2 :] = 0
        labels = ids.masked_fill(mask == 0, -100)
        out.append((ids, mask, torch.tensor(tasks), labels))
    return out


def _perturbed(name: str) -> torch.nn.Module:
    """``name`` on the tiny base with every trainable parameter moved off its (often identity) init."""
    model = build_method(name, {}, make_tiny_base(), num_tasks=T).train()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def _step(losses, model, batch, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss incl. aux losses, all gradients) of one step; the same RNG seed for both (dropout, noise)."""
    torch.manual_seed(seed)
    loss = losses(*batch, T)[0]
    for value in model.aux_losses().values():
        loss = loss + value
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def check_compiled_matches_eager(name: str, **options) -> None:
    eager = _perturbed(name)
    compiled = copy.deepcopy(eager)
    step = compile_training_step(compiled, **options)
    for seed, batch in enumerate(_batches()):
        want = _step(lambda *a: forward_losses(eager, *a), eager, batch, seed)
        got = _step(step, compiled, batch, seed)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-5)


def test_compiled_step_matches_eager_in_one_graph():
    """mtl_lora: task ids reach the layers of the compiled graph, per batch (not the first batch's)."""
    torch._dynamo.reset()
    check_compiled_matches_eager("mtl_lora", backend="aot_eager", fullgraph=True)


def test_static_task_hooks_keep_eager_outputs():
    model = _perturbed("mtl_lora").eval()
    ids, mask, tasks, _ = _batches()[0]
    want = model(input_ids=ids, attention_mask=mask, task_ids=tasks).logits
    model.use_static_task_hooks()
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, task_ids=tasks).logits, want)
    with pytest.raises(ValueError, match="out of range"):  # still checked eagerly
        model(input_ids=ids, attention_mask=mask, task_ids=torch.tensor([0, 1, 2, 3]))


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_every_method_compiles_with_inductor(name):
    torch._dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True):  # eager RNG: the same dropout and noise
        check_compiled_matches_eager(name, fullgraph=True)


@pytest.mark.slow
def test_compile_true_trains_through_lightning(tmp_path):
    """``compile=true`` in the run config: the Lightning loop trains with the compiled step."""
    from mtpeft.bench.config import RunParts, compose_run
    from mtpeft.bench.loop import lightning_loop, loop_config_overrides

    tiny = [o for o in TINY_RUN if not o.startswith("trainer.max_steps")]
    cfg = compose_run([*tiny, "method=lora", "compile=true", *loop_config_overrides(3)], tmp_path)
    clock = lightning_loop(RunParts.build(cfg), 3, tmp_path / "fit")
    assert len(clock.ends) == 3
