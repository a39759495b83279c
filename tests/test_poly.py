"""peft Poly / MHR behind our task-id plumbing: the worked count, the MHR split check, the yaml defaults.

The contract (task ids select the allocation, beam search rows, parameter counts by hand, bad configs) runs
on the variants ``poly-*`` of tests/test_method_contract.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mtpeft.methods import build_method, parse_method_config
from tests.conftest import make_tiny_base, qwen2_5_0_5b_shape_on_meta

NUM_TASKS = 3
CONF = Path(__file__).resolve().parents[1] / "conf" / "method"


def test_methods_md_worked_count_qwen_shape() -> None:
    """docs/methods.md section 11: Poly (K=4, H=1), r=8, T=8, q,k,v,o on a Qwen2.5-0.5B-shaped model: 4.33 M."""
    base = qwen2_5_0_5b_shape_on_meta()
    model = build_method("poly", {}, base, num_tasks=8)
    assert model.count_parameters()[0] == model.expected_trainable_parameters() == 4_328_448


def test_mhr_split_must_divide_gqa_kv_width() -> None:
    # d = 32 is divisible by 32, but k_proj/v_proj output d_kv = 16 is not
    with pytest.raises(ValueError, match=r"method\.n_splits=32.*k_proj has d_in=32, d_out=16"):
        build_method("poly", {"n_splits": 32}, make_tiny_base(), num_tasks=NUM_TASKS)


def test_yaml_defaults_are_the_config_defaults() -> None:
    values = OmegaConf.to_container(OmegaConf.load(CONF / "poly.yaml"))
    assert values.pop("name") == "poly"
    assert parse_method_config("poly", values) == parse_method_config("poly", {})
