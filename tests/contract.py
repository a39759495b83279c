"""The method contract as reusable checks, one function per property (peft's ``tests/testing_common.py``).

A `Case` is one method with one set of options (a variant) plus what the contract needs to know about it:
the options that switch its identity init off, the invalid options and the config field each must name,
and its trainable-parameter count written out by hand from docs/methods.md. Every ``check_*`` function
takes a case and asserts one property of the contract on tiny random Llama / Qwen2 / Mistral models; a
check that does not apply to the case (no aux loss, nothing to train) calls ``pytest.skip``.

``tests/test_method_contract.py`` crosses its ``CASES`` list with these checks (peft's
``test_custom_models.py``); `run_contract` runs every check on one case, so any test can push a single
``(method, options)`` through the whole contract (the toy method of ``tests/test_add_method.py`` does).
"""

from __future__ import annotations

import copy
import dataclasses
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from mtpeft.methods import build_method, get_method, load_adapter, parse_method_config
from tests.conftest import ARCHS, make_tiny_base

Options = dict[str, Any]


@dataclass(frozen=True)
class Case:
    """One method variant and what the contract checks need to know about it."""

    method: str
    """Registered method name."""
    options: Options = field(default_factory=dict)
    """Method options (as in ``conf/method/<method>.yaml``; nested sections as nested dicts)."""
    variant: str = "default"
    """Short name of the variant, used in test ids (``moe_lora-task_gate``)."""
    non_identity: Options | None = None
    """Options that make an identity-initialised method start away from the base (None: not applicable)."""
    bad_configs: tuple[tuple[Options, str], ...] = ()
    """``(options, field)``: building the method with ``options`` alone must fail with an error naming
    ``method.<field>`` (for an unknown key: the key, where it was found and the valid keys)."""
    parameters: int | None = None
    """Trainable parameters on the tiny Llama shape with ``num_tasks`` tasks, by hand from docs/methods.md."""
    num_tasks: int = 3
    """Tasks the adapter is built for (the batches cycle through all of them)."""

    @property
    def id(self) -> str:
        return f"{self.method}-{self.variant}"


# -- building blocks --------------------------------------------------------------------------------
def merged(options: Mapping[str, Any], extra: Mapping[str, Any]) -> Options:
    """``options`` updated by ``extra``, nested sections merged key by key (``{"lora": {"r": 4}}``)."""
    out = copy.deepcopy(dict(options))
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def build(
    case: Case, arch: str = "llama", seed: int = 0, dtype: torch.dtype | None = None, **extra: Any
) -> torch.nn.Module:
    """The case's method on a fresh tiny base of family ``arch`` (``dtype``: the base's dtype)."""
    base = make_tiny_base(arch, seed=seed)
    if dtype is not None:
        base = base.to(dtype)
    return build_method(case.method, merged(case.options, extra), base, num_tasks=case.num_tasks)


def base_logits(arch: str, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits of the unadapted tiny base (the same seed `build` uses)."""
    with torch.no_grad():
        return make_tiny_base(arch)(input_ids=ids, attention_mask=mask).logits


def inputs(
    case: Case, batch: int = 4, length: int = 9, seed: int = 1, padded: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention mask, task ids): random tokens, row 0 left-padded by 2, task ids cycling 0..T-1."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :2], ids[0, :2] = 0, 0
    return ids, mask, torch.arange(batch) % case.num_tasks


def logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, task_ids: torch.Tensor | None):
    """Eval-mode logits without gradients."""
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, task_ids=task_ids).logits


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def loss_on(model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """LM loss on ``batch`` (labels = ids, padding ignored) plus the method's aux losses."""
    ids, mask, task_ids = batch
    labels = ids.masked_fill(mask == 0, -100)
    out = model(input_ids=ids, attention_mask=mask, task_ids=task_ids, labels=labels)
    return out.loss + sum(model.aux_losses().values(), torch.zeros((), device=out.loss.device))


def train_steps(
    model: torch.nn.Module,
    case: Case,
    steps: int = 3,
    lr: float = 0.5,
    after_backward: Callable[[], None] | None = None,
) -> None:
    """A few SGD steps on a fixed batch; ``after_backward`` runs after each backward (to read gradients)."""
    params = trainable(model)
    if not params:
        return
    optimizer = torch.optim.SGD(params, lr=lr)
    batch = inputs(case)
    model.train()
    torch.manual_seed(0)  # routing / Gumbel noise
    for _ in range(steps):
        optimizer.zero_grad()
        loss_on(model, batch).backward()
        if after_backward is not None:
            after_backward()
        optimizer.step()
    model.eval()


def perturb(model: torch.nn.Module, std: float = 0.1, seed: int = 0) -> None:
    """Add N(0, std²) noise to every trainable parameter, so that every part of the adapter matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in trainable(model):
            param.add_(torch.randn(param.shape, generator=gen).to(param.dtype) * std)


GENERATE = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0, "eos_token_id": 2}


# -- the checks ---------------------------------------------------------------------------------------
def check_identity_at_init(case: Case, arch: str = "llama") -> None:
    """An identity-initialised method gives the base model's logits exactly (padded batch)."""
    model = build(case, arch)
    if not model.identity_at_init:
        pytest.skip(f"{case.method} is not identity-initialised")
    ids, mask, task_ids = inputs(case)
    torch.testing.assert_close(
        logits(model, ids, mask, task_ids), base_logits(arch, ids, mask), rtol=0, atol=0
    )


def check_non_identity_init_changes_output(case: Case) -> None:
    """The switch that turns the identity init off really changes the output."""
    if case.non_identity is None:
        pytest.skip(f"{case.id} has no identity init to switch off")
    model = build(case, **case.non_identity)
    ids, mask, task_ids = inputs(case)
    assert not torch.allclose(logits(model, ids, mask, task_ids), base_logits("llama", ids, mask), atol=1e-4)


def check_only_adapter_parameters_train_and_change(case: Case) -> None:
    """Trainable parameters are adapter state; in a few steps every one of them gets a gradient, training
    changes them and nothing else."""
    model = build(case)
    adapter = set(model.adapter_state_dict())
    params = {n: p for n, p in model.named_parameters() if p.requires_grad and p.numel()}
    assert set(params) <= adapter, (
        f"trainable parameters outside the adapter: {sorted(set(params) - adapter)[:5]}"
    )
    assert model.count_parameters()[0] == sum(p.numel() for p in trainable(model))
    if not params:
        assert not any(t.numel() for t in model.adapter_state_dict().values()), "untrained adapter state"
        return
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    reached = dict.fromkeys(params, False)

    def record() -> None:
        for name, param in params.items():
            reached[name] |= param.grad is not None and bool(param.grad.abs().sum() > 0)

    train_steps(model, case, after_backward=record)
    dead = [n for n, ok in reached.items() if not ok]
    assert not dead, f"trainable parameters that never got a gradient: {dead[:5]}"
    after = dict(model.named_parameters())
    frozen_changed = [n for n in before if n not in params and not torch.equal(before[n], after[n])]
    assert not frozen_changed, f"frozen parameters changed: {frozen_changed[:5]}"
    assert any(not torch.equal(before[n], after[n]) for n in params), "no trainable parameter changed"


def check_parameter_count(case: Case) -> None:
    """Real trainable count == the method's formula == the hand count of the case (docs/methods.md)."""
    model = build(case)
    count = model.count_parameters()[0]
    assert count == model.expected_trainable_parameters()
    if case.parameters is not None:
        assert count == case.parameters, f"{case.id}: {count} trainable, {case.parameters} by hand"


def check_bad_configs(case: Case) -> None:
    """Every invalid option set fails before training with an error that names the field."""
    if not case.bad_configs:
        pytest.skip(f"{case.id} lists no bad configs")
    config_class = get_method(case.method).config_class
    for options, key in case.bad_configs:
        with pytest.raises((ValueError, TypeError)) as error:
            build_method(case.method, options, make_tiny_base(), num_tasks=case.num_tasks)
        assert_names_field(str(error.value), key, config_class)
        try:
            parse_method_config(case.method, options)
        except (ValueError, TypeError):  # invalid on its own (not only for this base model): so in code too
            with pytest.raises((ValueError, TypeError), match=re.escape(key.rsplit(".", 1)[-1])):
                config_class(**options)


def assert_names_field(message: str, key: str, config_class: type) -> None:
    """The error names ``method.<key>``; an unknown key is named with its section and the valid keys; an
    invalid choice lists the valid choices."""
    *section, leaf = key.split(".")
    hints = _field_hints(config_class, section)
    if leaf not in hints:  # an unknown key
        where = ".".join(["method", *section])
        assert repr(leaf) in message and where in message and "valid keys" in message, (
            f"unknown key {key!r}: the error should name {leaf!r}, {where} and the valid keys; got: {message}"
        )
        return
    assert f"method.{key}" in message, f"the error should name method.{key}; got: {message}"
    if typing.get_origin(hints[leaf]) is typing.Literal:
        choices = typing.get_args(hints[leaf])
        assert all(str(choice) in message for choice in choices), (
            f"the error should list the valid choices {list(choices)}; got: {message}"
        )


def _field_hints(config_class: type, section: list[str]) -> dict[str, Any]:
    """Type hints of the (nested) config dataclass at ``section`` (``["prompt", "encoder"]``)."""
    cls = config_class
    for part in section:
        cls = typing.get_type_hints(cls)[part]
        assert dataclasses.is_dataclass(cls), f"{part} is not a config section"
    return typing.get_type_hints(cls)


def check_save_load_round_trip(case: Case, tmp_path: Path) -> None:
    """A saved adapter rebuilds the same config and state and gives identical logits on a fresh base."""
    model = build(case)
    perturb(model)
    directory = model.save_adapter(tmp_path / "adapter")
    reloaded = load_adapter(directory, make_tiny_base())
    assert type(reloaded) is type(model)
    assert reloaded.config == model.config and reloaded.num_tasks == model.num_tasks
    state, reloaded_state = model.adapter_state_dict(), reloaded.adapter_state_dict()
    assert state.keys() == reloaded_state.keys()
    assert all(torch.equal(state[k], reloaded_state[k]) for k in state)
    ids, mask, task_ids = inputs(case)
    assert torch.equal(logits(reloaded, ids, mask, task_ids), logits(model, ids, mask, task_ids))


def check_generate_with_and_without_cache_agree(case: Case, arch: str = "llama") -> None:
    """Greedy generation with the KV cache equals generation without it (left-padded batch)."""
    model = build(case, arch)
    perturb(model, std=0.05)
    model.eval()
    ids, mask, task_ids = inputs(case)
    cached = model.generate(ids, attention_mask=mask, task_ids=task_ids, use_cache=True, **GENERATE)
    uncached = model.generate(ids, attention_mask=mask, task_ids=task_ids, use_cache=False, **GENERATE)
    assert torch.equal(cached[:, : ids.shape[1]], ids), "generate returns the prompt ids first"
    assert torch.equal(cached, uncached)


def check_mixed_task_batch(case: Case) -> None:
    """Each row of a mixed-task batch equals the row run alone; a task-conditioned method's output
    depends on the task ids."""
    model = build(case)
    perturb(model)
    ids, mask, task_ids = inputs(case, padded=False)
    batched = logits(model, ids, mask, task_ids)
    for row in range(ids.shape[0]):
        single = logits(model, ids[row : row + 1], mask[row : row + 1], task_ids[row : row + 1])
        torch.testing.assert_close(batched[row : row + 1], single, rtol=1e-4, atol=1e-5)
    if model.requires_task_ids and case.num_tasks > 1:
        other = logits(model, ids, mask, (task_ids + 1) % case.num_tasks)
        for row in range(ids.shape[0]):
            assert not torch.allclose(batched[row], other[row], atol=1e-4), f"row {row}: task ids ignored"


def check_beam_search_rows_match_single_rows(case: Case) -> None:
    """Beam search expands the batch; each row still gets its own task ids (peft Poly's pitfall)."""
    model = build(case)
    perturb(model, std=0.05)
    model.eval()
    ids, mask, task_ids = inputs(case, batch=3, length=6, padded=False)
    kwargs = {**GENERATE, "max_new_tokens": 4, "num_beams": 2}
    batched = model.generate(ids, attention_mask=mask, task_ids=task_ids, **kwargs)
    for row in range(ids.shape[0]):
        single = model.generate(
            ids[row : row + 1], attention_mask=mask[row : row + 1], task_ids=task_ids[row : row + 1], **kwargs
        )
        assert torch.equal(batched[row : row + 1, : single.shape[1]], single), f"row {row}"


def check_task_ids(case: Case) -> None:
    """Task-conditioned methods refuse missing or out-of-range task ids in forward and generate;
    task-agnostic methods give the same output with or without them."""
    model = build(case)
    perturb(model)
    ids, mask, task_ids = inputs(case)
    if not model.requires_task_ids:
        without = logits(model, ids, mask, None)
        torch.testing.assert_close(without, logits(model, ids, mask, task_ids), rtol=0, atol=0)
        generated = model.generate(ids, attention_mask=mask, **GENERATE)
        assert torch.equal(generated, model.generate(ids, attention_mask=mask, task_ids=task_ids, **GENERATE))
        return
    for call in (model, lambda **kw: model.generate(**kw, max_new_tokens=1)):
        with pytest.raises(ValueError, match="task_ids"):
            call(input_ids=ids, attention_mask=mask)
        for bad in (case.num_tasks, -1):
            with pytest.raises(ValueError, match="out of range"):
                call(input_ids=ids, attention_mask=mask, task_ids=torch.full((ids.shape[0],), bad))


def check_aux_loss_gradients_survive_gradient_checkpointing(case: Case) -> None:
    """An aux loss computed under non-reentrant checkpointing still has a gradient."""
    model = build(case)
    model.gradient_checkpointing_enable()
    model.train()
    ids, mask, task_ids = inputs(case)
    model(input_ids=ids, attention_mask=mask, task_ids=task_ids)
    aux = model.aux_losses()
    if not aux:
        pytest.skip(f"{case.id} has no auxiliary loss")
    sum(aux.values()).backward()
    grads = [p.grad for p in trainable(model) if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads), "aux loss produced no gradient"


def check_gradient_checkpointing_gives_the_same_gradients(case: Case) -> None:
    """Recomputed layers see the same task ids, routing noise and dropout as the original forward (train
    mode, one seed for both runs)."""
    grads, losses = [], []
    for checkpointing in (False, True):
        model = build(case)
        if not trainable(model):
            pytest.skip(f"{case.id} has nothing to train")
        perturb(model)  # off the identity init, so that every parameter gets a gradient
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        torch.manual_seed(0)  # the same dropout masks and routing noise in both runs
        loss = loss_on(model, inputs(case))
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[1], losses[0])
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], rtol=1e-4, atol=1e-6, msg=key)


def check_disabled_adapter_gives_base_logits(case: Case) -> None:
    """Inside ``disable_adapter()`` the model is its base model (logits and generation); afterwards the
    adapter is back."""
    model = build(case)
    perturb(model)
    ids, mask, task_ids = inputs(case)
    adapted = logits(model, ids, mask, task_ids)
    with model.disable_adapter():
        disabled = logits(model, ids, mask, task_ids)
        generated = model.generate(ids, attention_mask=mask, task_ids=task_ids, **GENERATE)
    torch.testing.assert_close(disabled, base_logits("llama", ids, mask), rtol=0, atol=0)
    expected = make_tiny_base().generate(ids, attention_mask=mask, **GENERATE)
    assert torch.equal(generated, expected)
    assert torch.equal(logits(model, ids, mask, task_ids), adapted), "the adapter is back after the block"
    if model.count_parameters()[0]:
        assert not torch.allclose(adapted, disabled, atol=1e-4), "the perturbed adapter changes the logits"


def check_bf16_base_with_fp32_adapter(case: Case, arch: str = "llama") -> None:
    """A bfloat16 base with the adapter stored in float32 (``model.adapter_dtype``, as training runs it):
    finite loss and gradients, the frozen base stays bf16, generation runs."""
    model = build(case, arch, dtype=torch.bfloat16)
    model.upcast_trainable(torch.float32)
    assert {p.dtype for p in trainable(model)} <= {torch.float32}
    assert {p.dtype for n, p in model.named_parameters() if not p.requires_grad} <= {torch.bfloat16}
    perturb(model, std=0.05)
    model.train()
    loss = loss_on(model, inputs(case))
    assert torch.isfinite(loss), f"loss {loss}"
    if trainable(model):
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable(model))
    model.eval()
    ids, mask, task_ids = inputs(case)
    out = model.generate(ids, attention_mask=mask, task_ids=task_ids, **GENERATE)
    assert out.shape[0] == ids.shape[0] and torch.equal(out[:, : ids.shape[1]], ids)
    assert torch.isfinite(logits(model, ids, mask, task_ids).float()).all()


def check_loss_decreases(case: Case, steps: int = 10, lr: float = 3e-2, margin: float = 0.02) -> None:
    """AdamW on one fixed batch lowers the eval-mode LM loss by ``margin`` within ``steps`` steps (the
    adapter learns; on the random tiny base the loss starts near log(vocab) = 4.85)."""
    model = build(case)
    params = trainable(model)
    if not params:
        pytest.skip(f"{case.id} has nothing to train")
    batch = inputs(case)
    ids, mask, task_ids = batch
    labels = ids.masked_fill(mask == 0, -100)

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask, task_ids=task_ids, labels=labels).loss.item()

    start = eval_loss()
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    torch.manual_seed(0)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss_on(model, batch).backward()
        optimizer.step()
    end = eval_loss()
    assert end < start - margin, f"{case.id}: loss {start:.4f} -> {end:.4f} after {steps} steps"


#: Every check by name. Besides the case, ``save_load_round_trip`` takes a ``tmp_path``, and those in
#: `ARCH_CHECKS` an optional ``arch``.
CHECKS: dict[str, Callable[..., None]] = {
    "identity_at_init": check_identity_at_init,
    "non_identity_init_changes_output": check_non_identity_init_changes_output,
    "only_adapter_parameters_train_and_change": check_only_adapter_parameters_train_and_change,
    "parameter_count": check_parameter_count,
    "bad_configs": check_bad_configs,
    "save_load_round_trip": check_save_load_round_trip,
    "generate_with_and_without_cache_agree": check_generate_with_and_without_cache_agree,
    "mixed_task_batch": check_mixed_task_batch,
    "beam_search_rows_match_single_rows": check_beam_search_rows_match_single_rows,
    "task_ids": check_task_ids,
    "aux_loss_gradients_survive_gradient_checkpointing": check_aux_loss_gradients_survive_gradient_checkpointing,
    "gradient_checkpointing_gives_the_same_gradients": check_gradient_checkpointing_gives_the_same_gradients,
    "disabled_adapter_gives_base_logits": check_disabled_adapter_gives_base_logits,
    "bf16_base_with_fp32_adapter": check_bf16_base_with_fp32_adapter,
    "loss_decreases": check_loss_decreases,
}
ARCH_CHECKS = ("identity_at_init", "generate_with_and_without_cache_agree", "bf16_base_with_fp32_adapter")
"""Checks that take an ``arch``: `run_contract` runs them on every tiny architecture."""


def run_contract(case: Case, tmp_path: Path) -> dict[str, str]:
    """Run every check on ``case``; return ``{check: "passed" | "skipped: <reason>"}``.

    A failing check raises (its assertion message names the check and the case); checks that do not
    apply are reported as skipped, so a caller can assert which ones ran.
    """
    results = {}
    for name, check in CHECKS.items():
        runs = [{"arch": arch} for arch in ARCHS] if name in ARCH_CHECKS else [{}]
        if name == "save_load_round_trip":
            runs = [{"tmp_path": tmp_path / name}]
        try:
            for kwargs in runs:
                check(case, **kwargs)
            results[name] = "passed"
        except pytest.skip.Exception as skip:
            results[name] = f"skipped: {skip.msg}"
    return results


def case_ids(cases: list[Case]) -> list[str]:
    """Unique test ids of ``cases`` (``method-variant``)."""
    ids = [case.id for case in cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    assert not duplicates, f"duplicate case ids: {duplicates}"
    return ids
