"""PEML-style prompts + LoRA: virtual-token bookkeeping, generation, reparam, the formula over the search
space, config.

The contract (task ids, mixed-task batches, save/load of nested configs, checkpointing of deep prefixes,
parameter counts by hand, bad configs naming the nested key) runs on the variants ``peml-*`` of
tests/test_method_contract.py: input and deep mode, shared, per_task, shared+per_task and mpt seeds.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser

from mtpeft.methods import build_method, parse_method_config
from tests.conftest import ARCHS, CONF_DIR, make_tiny_base

NUM_TASKS = 3
MODES = ("input", "deep")
ENCODERS = ("identity", "mlp", "lstm", "transformer", "residual_mlp")


def _build(arch: str = "llama", mode: str = "input", seed: int = 0, lora: dict | None = None, **prompt):
    """A peml model with a random (non-identity) LoRA and perturbed seeds, so every part matters."""
    options = {"prompt": {"mode": mode, **prompt}, "lora": {"r": 4, "init_weights": False, **(lora or {})}}
    model = build_method("peml", options, make_tiny_base(arch, seed=seed), num_tasks=NUM_TASKS)
    with torch.no_grad():
        for p in model.prompt.seeds.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _inputs(
    batch: int = 3, length: int = 7, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :2], ids[0, :2] = 0, 0  # one left-padded row
    return ids, mask, torch.arange(batch) % NUM_TASKS


@pytest.mark.parametrize("mode", MODES)
def test_logits_align_with_original_positions_and_loss_skips_virtual_tokens(mode: str) -> None:
    model = _build(mode=mode)
    ids, mask, task_ids = _inputs()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100  # answer-only loss
    out = model(
        input_ids=ids, attention_mask=mask, task_ids=task_ids, labels=labels, output_hidden_states=True
    )
    with torch.no_grad():
        base = make_tiny_base()(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert out.logits.shape == base.logits.shape
    assert [h.shape for h in out.hidden_states] == [h.shape for h in base.hidden_states]
    expected = F.cross_entropy(
        out.logits[:, :-1].reshape(-1, 128), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", MODES)
def test_prompt_equals_prepending_its_init_tokens(arch: str, mode: str) -> None:
    """init=vocab + identity encoder + LoRA B = 0: exactly the base model on [tokens ; padded input]."""
    options = {
        "prompt": {"mode": mode, "sharing": "per_task", "init": "vocab", "encoder": {"type": "identity"}}
    }
    model = build_method("peml", options, make_tiny_base(arch), num_tasks=NUM_TASKS).eval()
    tokens = model.prompt.seeds.init_token_ids[0]  # [T, m]: the sampled init tokens of each task
    ids, mask, _ = _inputs()
    task_ids = torch.tensor([2, 0, 1])
    full_ids = torch.cat([tokens[task_ids], ids], dim=1)
    full_mask = torch.cat([torch.ones_like(tokens[task_ids]), mask], dim=1)
    positions = (full_mask.cumsum(-1) - 1).masked_fill(full_mask == 0, 0)
    with torch.no_grad():
        reference = make_tiny_base(arch)(input_ids=full_ids, attention_mask=full_mask, position_ids=positions)
        logits = model(input_ids=ids, attention_mask=mask, task_ids=task_ids).logits
    torch.testing.assert_close(logits, reference.logits[:, tokens.shape[1] :], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_left_padded_row_equals_unpadded_row(mode: str) -> None:
    model = _build(mode=mode)
    ids, mask, task_ids = _inputs()
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask, task_ids=task_ids).logits[0, 2:]
        alone = model(input_ids=ids[:1, 2:], task_ids=task_ids[:1]).logits[0]
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", MODES)
def test_generate_with_and_without_cache(arch: str, mode: str) -> None:
    model = _build(arch, mode)
    ids, mask, task_ids = _inputs()
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=-1)
    kwargs.update(return_dict_in_generate=True, output_logits=True)
    cached = model.generate(ids, attention_mask=mask, task_ids=task_ids, use_cache=True, **kwargs)
    uncached = model.generate(ids, attention_mask=mask, task_ids=task_ids, use_cache=False, **kwargs)
    assert cached.sequences.shape == (3, 7 + 4)
    assert torch.equal(cached.sequences[:, :7], ids), "output must start with the original ids"
    assert torch.equal(cached.sequences, uncached.sequences)
    for step_cached, step_uncached in zip(cached.logits, uncached.logits, strict=True):
        torch.testing.assert_close(step_cached, step_uncached, rtol=1e-5, atol=1e-5)
    # every generation step equals a plain forward over the generated sequence
    full_mask = torch.cat([mask, torch.ones(3, 4, dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        logits = model(input_ids=cached.sequences, attention_mask=full_mask, task_ids=task_ids).logits
    torch.testing.assert_close(torch.stack(cached.logits, 1), logits[:, 6:-1], rtol=1e-5, atol=1e-5)


def test_generate_expands_task_prompts_for_beams_and_returns() -> None:
    model = _build(sharing="per_task")
    ids, mask, task_ids = _inputs()
    out = model.generate(
        ids, attention_mask=mask, task_ids=task_ids, max_new_tokens=3, num_beams=2, num_return_sequences=2
    )
    assert out.shape == (6, 10) and torch.equal(out[::2, :7], ids)


@pytest.mark.parametrize(("mode", "encoder"), [("input", "lstm"), ("deep", "transformer")])
def test_reparam_at_inference_caches_prompts_with_identical_outputs(mode: str, encoder: str) -> None:
    plain = _build(mode=mode, encoder={"type": encoder, "hidden": 16})
    cached = _build(mode=mode, encoder={"type": encoder, "hidden": 16})
    cached.config.reparam_at_inference = True
    cached.load_adapter_state_dict(plain.adapter_state_dict())
    calls = []
    cached.prompt.encoder.register_forward_hook(lambda *args: calls.append(1))
    ids, mask, task_ids = _inputs()
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(
                cached(input_ids=ids, attention_mask=mask, task_ids=task_ids).logits,
                plain(input_ids=ids, attention_mask=mask, task_ids=task_ids).logits,
                rtol=0,
                atol=0,
            )
    kwargs = dict(attention_mask=mask, task_ids=task_ids, max_new_tokens=3, do_sample=False)
    assert torch.equal(cached.generate(ids, **kwargs), plain.generate(ids, **kwargs))
    assert len(calls) == 1, "the encoder must run once, then the cached prompts are used"
    # a parameter update invalidates the cache
    with torch.no_grad():
        for model in (cached, plain):
            next(model.prompt.seeds.parameters()).add_(0.1)
        torch.testing.assert_close(
            cached(input_ids=ids, attention_mask=mask, task_ids=task_ids).logits,
            plain(input_ids=ids, attention_mask=mask, task_ids=task_ids).logits,
            rtol=0,
            atol=0,
        )
    assert len(calls) == 2


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("sharing", ["shared", "per_task", "shared+per_task", "mpt"])
def test_parameter_count_matches_formula(mode: str, encoder: str, sharing: str) -> None:
    options = {
        "prompt": {"mode": mode, "sharing": sharing, "length": 5, "encoder": {"type": encoder, "layers": 2}},
        "lora": {"r": 4},
    }
    model = build_method("peml", options, make_tiny_base(), num_tasks=NUM_TASKS)
    assert model.count_parameters()[0] == model.expected_trainable_parameters()


def test_parameter_groups_carry_their_learning_rates() -> None:
    options = {"prompt": {}, "lora": {"r": 4}, "lr_prompt": 3e-2}
    model = build_method("peml", options, make_tiny_base(), num_tasks=NUM_TASKS)
    groups = {g["name"]: g for g in model.parameter_groups(0.01)}
    assert groups["prompt"]["lr"] == 3e-2 and "lr" not in groups["lora"]  # null: the optimiser's lr
    prompt_ids = {id(p) for p in model.prompt.parameters()}
    assert {id(p) for p in groups["prompt"]["params"]} == prompt_ids
    assert all(
        "lora_" in n for n, p in model.named_parameters() if p.requires_grad and id(p) not in prompt_ids
    )
    trainable = sum(p.numel() for g in groups.values() for p in g["params"])
    assert trainable == model.count_parameters()[0]
    model.config.lr_lora = 2e-4
    optimizer = torch.optim.AdamW(model.parameter_groups(0.0), lr=1e-3)
    assert [g["lr"] for g in optimizer.param_groups] == [3e-2, 2e-4]


def test_method_yaml_and_optuna_search_space_are_valid() -> None:
    """conf/method/peml.yaml parses; every swept key exists there and every choice is a valid value."""
    defaults = yaml.safe_load((CONF_DIR / "method" / "peml.yaml").read_text())
    defaults.pop("name")
    parse_method_config("peml", defaults)
    search = yaml.safe_load((CONF_DIR / "hparams_search" / "peml_optuna.yaml").read_text())
    assert search["optimized_metric"] == "val/avg/score"
    parser = OverridesParser.create()
    for key, sweep in search["hydra"]["sweeper"]["params"].items():
        override = parser.parse_overrides([f"{key}={sweep}"])[0]
        path = key.split(".")[1:]
        node = defaults
        for part in path[:-1]:
            node = node[part]
        assert path[-1] in node, f"{key} is not a key of conf/method/peml.yaml"
        sweep = override.value()
        values = getattr(sweep, "list", None) or [sweep.start, sweep.end]
        for value in values:
            options = yaml.safe_load(yaml.safe_dump(defaults))
            target = options
            for part in path[:-1]:
                target = target[part]
            target[path[-1]] = value
            parse_method_config("peml", options)
