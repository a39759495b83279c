"""peft Poly / MHR behind our task-id plumbing: formula, config errors, expanded generation batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mtpeft.methods import build_method, parse_method_config
from tests.conftest import make_tiny_base, qwen2_5_0_5b_shape_on_meta

NUM_TASKS = 3
CONF = Path(__file__).resolve().parents[1] / "conf" / "method"


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def _inputs(batch: int = 3, length: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (batch, length), generator=gen), torch.arange(batch) % NUM_TASKS


@pytest.mark.parametrize(
    ("options", "num_tasks"),
    [
        ({}, 3),
        ({"r": 2, "n_skills": 3, "n_splits": 2}, 1),
        ({"r": 4, "n_skills": 2, "n_splits": 4, "targets": ["q_proj", "v_proj", "down_proj"]}, 5),
    ],
)
def test_parameter_count_matches_formula(options: dict, num_tasks: int) -> None:
    model = build_method("poly", options, make_tiny_base(), num_tasks=num_tasks)
    cfg = model.config
    # tiny shapes: q/o 32->32, k/v 32->16 (GQA), down 64->32; two layers
    sizes = {"q_proj": 64, "k_proj": 48, "v_proj": 48, "o_proj": 64, "down_proj": 96}
    by_hand = 2 * sum(
        cfg.n_skills * cfg.r * sizes[t] + num_tasks * cfg.n_splits * cfg.n_skills for t in cfg.targets
    )
    assert model.count_parameters()[0] == model.expected_trainable_parameters() == by_hand


def test_methods_md_worked_count_qwen_shape() -> None:
    """docs/methods.md section 11: Poly (K=4, H=1), r=8, T=8, q,k,v,o on a Qwen2.5-0.5B-shaped model: 4.33 M."""
    base = qwen2_5_0_5b_shape_on_meta()
    model = build_method("poly", {}, base, num_tasks=8)
    assert model.count_parameters()[0] == model.expected_trainable_parameters() == 4_328_448


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"n_splits": 3}, r"method\.n_splits=3 must divide"),
        ({"r": 0}, r"method\.r=0 is not valid: .*greater than or equal to 1"),
        ({"n_skills": 0}, r"method\.n_skills=0 is not valid"),
        ({"poly_type": "mhr"}, r"method\.poly_type='mhr' is not valid"),
        ({"targets": []}, r"method\.targets: must name at least one linear layer"),
    ],
)
def test_bad_config_names_the_field(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_method("poly", options, make_tiny_base(), num_tasks=NUM_TASKS)


def test_mhr_split_must_divide_gqa_kv_width() -> None:
    # d = 32 is divisible by 32, but k_proj/v_proj output d_kv = 16 is not
    with pytest.raises(ValueError, match=r"method\.n_splits=32.*k_proj has d_in=32, d_out=16"):
        build_method("poly", {"n_splits": 32}, make_tiny_base(), num_tasks=NUM_TASKS)


def test_task_ids_select_the_task_allocation() -> None:
    model = build_method("poly", {"r": 4, "n_splits": 2}, make_tiny_base(), num_tasks=NUM_TASKS)
    _randomise(model)
    model.eval()
    ids, _ = _inputs(batch=1)
    with torch.no_grad():
        logits = [model(input_ids=ids, task_ids=torch.tensor([t])).logits for t in range(NUM_TASKS)]
    assert not torch.allclose(logits[0], logits[1], atol=1e-4)
    assert not torch.allclose(logits[1], logits[2], atol=1e-4)


def test_beam_search_repeats_task_ids() -> None:
    """peft's PolyModel would feed B task ids to a B·num_beams batch; our scope repeats them."""
    model = build_method("poly", {"r": 4, "n_splits": 2}, make_tiny_base(), num_tasks=NUM_TASKS)
    _randomise(model)
    model.eval()
    ids, task_ids = _inputs()
    kwargs = dict(max_new_tokens=4, num_beams=2, do_sample=False, pad_token_id=0, eos_token_id=2)
    batched = model.generate(ids, task_ids=task_ids, **kwargs)
    for row in range(ids.shape[0]):
        single = model.generate(ids[row : row + 1], task_ids=task_ids[row : row + 1], **kwargs)
        assert torch.equal(batched[row : row + 1, : single.shape[1]], single)


def test_yaml_defaults_are_the_config_defaults() -> None:
    values = OmegaConf.to_container(OmegaConf.load(CONF / "poly.yaml"))
    assert values.pop("name") == "poly"
    assert parse_method_config("poly", values) == parse_method_config("poly", {})
