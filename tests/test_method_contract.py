"""The contract every registered method satisfies, for several variants of each (peft's
``test_custom_models.py``: a list of cases crossed with the common checks of ``tests/contract.py``).

A case is a method, its options, the options that switch its identity init off, invalid options with the
field their error must name, and its trainable-parameter count by hand from docs/methods.md on the tiny
Llama shape (d = 32, d_kv = 16 with GQA, d_ff = 64, L = 2). A registered method without a case runs with its
defaults (`defaults_case`); its own cases add variants that matter (another gate, dispatch, placement),
bad configs and the hand count. The first case of each method is its fast
representative: the expensive checks (loss decreases, bf16 generation) and the other architectures run on
every case only in ``make test-full`` (``slow``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from mtpeft.methods import available_methods, build_method, get_method
from tests import contract
from tests.conftest import ARCHS, CONF_DIR, make_tiny_base
from tests.contract import Case

L = 2  # decoder layers of the tiny models
QKVO = {"q_proj": (32, 32), "k_proj": (32, 16), "v_proj": (32, 16), "o_proj": (32, 32)}  # (d_in, d_out)
MLP = {"gate_proj": (32, 64), "up_proj": (32, 64), "down_proj": (64, 32)}
SHAPES = {**QKVO, **MLP}
RANDOM_INIT = {"init_weights": False}


def per_linear(formula, targets=tuple(QKVO)) -> int:
    """``L · Σ_targets formula(d_in, d_out)``: the per-adapted-linear counts of docs/methods.md."""
    return L * sum(formula(*SHAPES[t]) for t in targets)


def hycam_count(n=2, r=4, bias=True, shared=True, specialised=True, router=True, norms=False, d=32) -> int:
    """docs/methods.md 2(h): L [(d² + d) + N_s (2dr + r² + 2r + d) + (d N_s + N_s) + 2d], terms per switch."""
    b = int(bias)
    layer = (d * d + b * d) * shared
    layer += (n * (2 * d * r + r * r + b * (2 * r + d)) + (d * n + n) * router) * specialised
    return L * (layer + 2 * d * norms)


def peml_count(seeds: int, encoder: int, r: int = 4) -> int:
    """docs/methods.md 8(h): seeds + encoder + LoRA on q, k, v, o."""
    return seeds + encoder + per_linear(lambda i, o: r * (i + o))


def mlp_encoder(e: int, h: int, out: int) -> int:
    """The 3-linear P-tuning MLP e -> h -> h -> out, with biases."""
    return e * h + h + h * h + h + h * out + out


def preset(path: str) -> dict:
    """The options a method preset file sets (``conf/method/<path>.yaml`` without its defaults list)."""
    options = yaml.safe_load((CONF_DIR / "method" / f"{path}.yaml").read_text())
    options.pop("defaults", None)
    return options


LOWRANK_BAD = (({"r": 0}, "r"), ({"dropout": 1.0}, "dropout"), ({"targets": []}, "targets"))

CASES: list[Case] = [
    Case("none", parameters=0, bad_configs=(({"r": 4}, "r"),)),
    # -- LoRA (docs/methods.md 3h: r (d_in + d_out) per linear)
    Case(
        "lora",
        {"r": 4},
        non_identity=RANDOM_INIT,
        parameters=per_linear(lambda i, o: 4 * (i + o)),
        bad_configs=(
            ({"rank": 4}, "rank"),
            ({"r": "8"}, "r"),
            *LOWRANK_BAD,
            ({"use_rslora": 1}, "use_rslora"),
        ),
    ),
    Case(
        "lora",
        {"r": 2, "targets": list(MLP), "use_rslora": True},
        "mlp_rslora",
        non_identity=RANDOM_INIT,
        parameters=per_linear(lambda i, o: 2 * (i + o), MLP),
    ),
    # -- HyCAM (docs/methods.md 2h)
    Case(
        "hycam",
        {"rank": 4, "num_specialised": 2},
        non_identity=RANDOM_INIT,
        parameters=hycam_count(),
        bad_configs=(
            ({"rank": 0}, "rank"),
            ({"num_specialised": 0}, "num_specialised"),
            ({"tau": 0.0}, "tau"),
            ({"apply_to": "ffn_output"}, "apply_to"),
            ({"routing": "top2"}, "routing"),
            ({"dispatch": "grouped"}, "dispatch"),
            ({"use_shared": False, "use_specialised": False}, "use_shared"),
            ({"balance_coef": -1.0}, "balance_coef"),
        ),
    ),
    Case(
        "hycam",
        {"rank": 4, "num_specialised": 2, "dispatch": "dense"},
        "dense",
        RANDOM_INIT,
        parameters=hycam_count(),
    ),
    Case(
        "hycam",
        {"rank": 4, "num_specialised": 3, "routing": "softmax", "tau": 0.7},
        "softmax",
        RANDOM_INIT,
        parameters=hycam_count(n=3),
    ),
    Case(
        "hycam",
        {"rank": 4, "num_specialised": 2, "routing": "soft_gumbel", "apply_to": "attn_output", "bias": False},
        "attn_output",
        RANDOM_INIT,
        parameters=hycam_count(bias=False),
    ),
    Case(
        "hycam",
        {"rank": 4, "num_specialised": 2, "router_trainable": False, "train_layernorms": True},
        "reference",
        RANDOM_INIT,
        parameters=hycam_count(router=False, norms=True),
    ),
    Case(
        "hycam",
        {"use_specialised": False},
        "shared_only",
        RANDOM_INIT,
        parameters=hycam_count(specialised=False),
    ),
    Case(
        "hycam",
        {"use_shared": False, "num_specialised": 3, "rank": 2},
        "specialised_only",
        RANDOM_INIT,
        parameters=hycam_count(n=3, r=2, shared=False),
    ),
    # -- MTL-LoRA (docs/methods.md 4h: r d_in + T r² (diag: T r) + n r d_out + T n per linear)
    Case(
        "mtl_lora",
        {"r": 4},
        non_identity=RANDOM_INIT,
        parameters=per_linear(lambda i, o: 4 * i + 3 * 16 + 3 * 4 * o + 3 * 3),
        bad_configs=(
            ({"num_up": 0}, "num_up"),
            ({"tau": 0.0}, "tau"),
            ({"lambda_format": "lower"}, "lambda_format"),
            ({"init_w": "zeros"}, "init_w"),
            ({"temperature": 0.1}, "temperature"),
            *LOWRANK_BAD,
        ),
    ),
    Case(
        "mtl_lora",
        {"r": 4, "num_up": 2, "lambda_format": "diag"},
        "diag",
        RANDOM_INIT,
        parameters=per_linear(lambda i, o: 4 * i + 2 * 4 + 2 * 4 * o + 2 * 2),
        num_tasks=2,
    ),
    Case(
        "mtl_lora",
        {"r": 2, "num_up": 5, "targets": ["q_proj", "v_proj", "up_proj", "down_proj"]},
        "mlp",
        RANDOM_INIT,
        parameters=per_linear(
            lambda i, o: 2 * i + 4 * 4 + 5 * 2 * o + 4 * 5, ["q_proj", "v_proj", "up_proj", "down_proj"]
        ),
        num_tasks=4,
    ),
    # -- MultiLoRA (docs/methods.md 5h: n r (d_in + d_out) + n d_out per linear; n per linear per module)
    Case(
        "multilora",
        {"r": 4},
        non_identity=RANDOM_INIT,
        parameters=per_linear(lambda i, o: 3 * 4 * (i + o) + 3 * o),
        bad_configs=(
            ({"num_loras": 0}, "num_loras"),
            ({"scale_granularity": "row"}, "scale_granularity"),
            ({"n": 3}, "n"),
            *LOWRANK_BAD,
        ),
    ),
    Case(
        "multilora",
        {"r": 2, "num_loras": 1, "scale_granularity": "module"},
        "module",
        RANDOM_INIT,
        parameters=per_linear(lambda i, o: 2 * (i + o) + 1),
    ),
    Case(
        "multilora",
        {"r": 4, "num_loras": 4, "targets": ["k_proj", "gate_proj", "down_proj"]},
        "mlp",
        RANDOM_INIT,
        parameters=per_linear(lambda i, o: 4 * 4 * (i + o) + 4 * o, ["k_proj", "gate_proj", "down_proj"]),
    ),
    # -- MoE-LoRA (docs/methods.md 7h: token router E r_e (d_in + d_out) + E d_in per linear;
    #    task gate E r_e (d_in + d_out) per linear + (T + 1) te + te E for the model)
    Case(
        "moe_lora",
        {"r": 4},
        non_identity=RANDOM_INIT,
        parameters=per_linear(lambda i, o: 4 * 4 * (i + o) + 4 * i),
        bad_configs=(
            ({"top_k": 5}, "top_k"),
            ({"top_k": 0}, "top_k"),
            ({"num_experts": 0, "top_k": 0}, "num_experts"),
            ({"r": 6, "expert_rank": "r/E"}, "expert_rank"),
            ({"expert_rank": "r*E"}, "expert_rank"),
            ({"gate_input": "sample"}, "gate_input"),
            ({"balance_loss_coef": -0.1}, "balance_loss_coef"),
            ({"task_embedding_dim": 0}, "task_embedding_dim"),
            ({"dispatch": "grouped"}, "dispatch"),
            ({"expert_init": "xavier"}, "expert_init"),
            ({"balance_scope": "layer"}, "balance_scope"),
        ),
    ),
    Case(
        "moe_lora",
        {"r": 4, "dispatch": "sparse", "balance_scope": "router", "router_z_loss_coef": 0.01},
        "sparse",
        RANDOM_INIT,
        parameters=per_linear(lambda i, o: 4 * 4 * (i + o) + 4 * i),
    ),
    Case(
        "moe_lora",
        {"r": 4, "expert_rank": "r/E"},
        "rank_split",
        RANDOM_INIT,
        parameters=per_linear(lambda i, o: 4 * 1 * (i + o) + 4 * i),
    ),
    Case(
        "moe_lora",
        {"r": 4, "top_k": 4},
        "top_k_all",
        RANDOM_INIT,
        parameters=per_linear(lambda i, o: 4 * 4 * (i + o) + 4 * i),
    ),
    Case(
        "moe_lora",
        {"r": 4, "gate_input": "task", "task_embedding_dim": 16},
        "task_gate",
        RANDOM_INIT,
        parameters=per_linear(lambda i, o: 4 * 4 * (i + o)) + (3 + 1) * 16 + 16 * 4,
    ),
    Case(
        "moe_lora",
        preset("moe_lora/moelora"),
        "moelora",
        RANDOM_INIT,
        parameters=per_linear(lambda i, o: 4 * 2 * (i + o)) + (3 + 1) * 64 + 64 * 4,
    ),
    Case(
        "moe_lora",
        {"r": 4, "num_experts": 2, "top_k": 1, "targets": ["q_proj", "gate_proj", "up_proj", "down_proj"]},
        "top_1_mlp",
        RANDOM_INIT,
        parameters=per_linear(
            lambda i, o: 2 * 4 * (i + o) + 2 * i, ["q_proj", "gate_proj", "up_proj", "down_proj"]
        ),
    ),
    # -- Poly / MHR (docs/methods.md 6.1h: K r (d_in + d_out) + T H K per linear)
    Case(
        "poly",
        {"r": 4},
        non_identity=RANDOM_INIT,
        parameters=per_linear(lambda i, o: 4 * 4 * (i + o) + 3 * 1 * 4),
        bad_configs=(
            ({"n_splits": 3}, "n_splits"),
            ({"r": 0}, "r"),
            ({"n_skills": 0}, "n_skills"),
            ({"poly_type": "mhr"}, "poly_type"),
            ({"targets": []}, "targets"),
        ),
    ),
    Case(
        "poly",
        {"r": 2, "n_skills": 3, "n_splits": 2},
        "mhr_one_task",
        RANDOM_INIT,
        parameters=per_linear(lambda i, o: 3 * 2 * (i + o) + 1 * 2 * 3),
        num_tasks=1,
    ),
    Case(
        "poly",
        {"r": 4, "n_skills": 2, "n_splits": 4, "targets": ["q_proj", "v_proj", "down_proj"]},
        "mhr_mlp",
        RANDOM_INIT,
        parameters=per_linear(lambda i, o: 2 * 4 * (i + o) + 5 * 4 * 2, ["q_proj", "v_proj", "down_proj"]),
        num_tasks=5,
    ),
    # -- C-Poly (docs/methods.md 6.2h: (K + T B) r (d_in + d_out) + T H K per linear, + T B learned weights)
    Case(
        "cpoly",
        {"r": 4},
        non_identity=RANDOM_INIT,
        parameters=per_linear(lambda i, o: (4 + 3 * 1) * 4 * (i + o) + 3 * 1 * 4 + 3 * 1),
        bad_configs=(
            ({"n_splits": 3}, "n_splits"),
            ({"n_skills": -1}, "n_skills"),
            ({"n_skills": 0, "n_specific_skills": 0}, "n_skills"),
            ({"specific_weight": "raw"}, "specific_weight"),
            ({"specific_weight": "learned_raw", "normalize_jointly": True}, "normalize_jointly"),
            ({"r": 2.5}, "r"),
            ({"targets": []}, "targets"),
        ),
    ),
    Case(
        "cpoly",
        {"r": 4, "n_splits": 2, "n_specific_skills": 2, "specific_weight": "learned_raw"},
        "mhr_learned_raw",
        RANDOM_INIT,
        parameters=per_linear(lambda i, o: (4 + 3 * 2) * 4 * (i + o) + 3 * 2 * 4 + 3 * 2),
    ),
    Case(
        "cpoly",
        {
            "r": 2,
            "n_skills": 2,
            "n_specific_skills": 2,
            "n_splits": 2,
            "specific_weight": "fixed",
            "normalize_jointly": True,
        },
        "mhr_fixed_joint",
        RANDOM_INIT,
        parameters=per_linear(lambda i, o: (2 + 2 * 2) * 2 * (i + o) + 2 * 2 * 2),
        num_tasks=2,
    ),
    Case(
        "cpoly",
        {"r": 4, "n_skills": 0, "n_specific_skills": 1, "specific_weight": "learned_raw"},
        "specific_only",
        RANDOM_INIT,
        parameters=per_linear(lambda i, o: 4 * 1 * 4 * (i + o) + 4 * 1),
        num_tasks=4,
    ),
    Case(
        "cpoly",
        {"r": 2, "n_specific_skills": 0, "targets": ["q_proj", "down_proj"]},
        "poly_mlp",
        RANDOM_INIT,
        parameters=per_linear(lambda i, o: 4 * 2 * (i + o) + 3 * 4, ["q_proj", "down_proj"]),
    ),
    # -- PEML (docs/methods.md 8h; m = 8 virtual tokens; out = d (input) or L·2·d_kv = 64 (deep))
    Case(
        "peml",
        {"lora": {"r": 4}},
        parameters=peml_count(seeds=(1 + 3) * 8 * 32, encoder=mlp_encoder(32, 32, 32)),
        bad_configs=(
            ({"prompt": {"lenght": 4}}, "prompt.lenght"),
            ({"prompt": {"encoder": {"size": 4}}}, "prompt.encoder.size"),
            ({"prompt": {"length": 0}}, "prompt.length"),
            ({"prompt": {"encoder": {"type": "cnn"}}}, "prompt.encoder.type"),
            ({"prompt": {"mode": "deep_last_k"}}, "prompt.mode"),
            ({"prompt": {"sharing": "per_layer"}}, "prompt.sharing"),
            ({"prompt": {"encoder": {"hidden": "d"}}}, "prompt.encoder.hidden"),
            ({"prompt": {"encoder": {"dropout": 1.0}}}, "prompt.encoder.dropout"),
            ({"prompt": {"encoder": {"type": "transformer", "heads": 5}}}, "prompt.encoder.heads"),
            ({"lora": {"r": 0}}, "lora.r"),
            ({"lora": {"rank": 4}}, "lora.rank"),
            ({"lr_prompt": -1.0}, "lr_prompt"),
            ({"prompt": 3}, "prompt"),
        ),
    ),
    Case(
        "peml",
        {"prompt": {"mode": "deep"}, "lora": {"r": 4}},
        "deep",
        parameters=peml_count(seeds=(1 + 3) * 8 * 32, encoder=mlp_encoder(32, 32, 2 * 2 * 16)),
    ),
    Case(
        "peml",
        {"prompt": {"sharing": "per_task"}, "lora": {"r": 4}},
        "per_task",
        parameters=peml_count(seeds=3 * 8 * 32, encoder=mlp_encoder(32, 32, 32)),
    ),
    Case(
        "peml",
        {"prompt": {"sharing": "shared", "encoder": {"hidden": 16}}, "lora": {"r": 4}},
        "shared",
        parameters=peml_count(seeds=8 * 32, encoder=mlp_encoder(32, 16, 32)),
    ),
    Case(
        "peml",
        {
            "prompt": {
                "mode": "deep",
                "sharing": "mpt",
                "encoder": {"type": "lstm", "hidden": 8, "layers": 1},
            },
            "lora": {"r": 4},
        },
        "deep_mpt_lstm",
        # seeds m e + T R (m + e); one bi-LSTM layer 8h(e + h) + 16h, head 2h -> 2h -> out
        parameters=peml_count(
            seeds=8 * 32 + 3 * 4 * (8 + 32),
            encoder=8 * 8 * (32 + 8) + 16 * 8 + 4 * 64 + 2 * 8 + 2 * 8 * 64 + 64,
        ),
    ),
]

METHODS = available_methods()


def defaults_case(method: str) -> Case:
    """A registered method without a case above runs through every check with its defaults (no hand count,
    no bad configs): a new method is checked from its two files on; its own cases are an addition."""
    fields = {f.name for f in dataclasses.fields(get_method(method).config_class)}
    return Case(method, variant="defaults", non_identity=RANDOM_INIT if "init_weights" in fields else None)


CASES += [defaults_case(m) for m in METHODS if m not in {case.method for case in CASES}]
PRIMARY = {case.method: case for case in reversed(CASES)}  # the first case of each method
SLOW = pytest.mark.slow


KNOWN_FAILURES: dict[tuple[str, str], str] = {}
"""(check, case id): a contract violation found by the suite and not fixed yet (strict xfail: a fix makes
the test fail until its entry is removed)."""


def every_case(slow_variants: bool = False, check: str = "") -> list:
    """All cases as pytest params; with ``slow_variants``, all but each method's first are ``slow``."""
    params = []
    for case in CASES:
        marks = [SLOW] if slow_variants and PRIMARY[case.method] is not case else []
        if (check, case.id) in KNOWN_FAILURES:
            marks.append(pytest.mark.xfail(reason=KNOWN_FAILURES[check, case.id], strict=True))
        params.append(pytest.param(case, id=case.id, marks=marks))
    return params


def every_case_and_arch() -> list:
    """Each case on Llama; each method's first case also on Qwen2 and Mistral (the rest: ``slow``)."""
    params = []
    for case in CASES:
        for arch in ARCHS:
            slow = arch != "llama" and PRIMARY[case.method] is not case
            params.append(pytest.param(case, arch, id=f"{case.id}-{arch}", marks=[SLOW] if slow else []))
    return params


def test_cases_cover_the_registry() -> None:
    assert sorted(PRIMARY) == METHODS, "a case names a method that is not registered"
    contract.case_ids(CASES)


@pytest.mark.parametrize(("case", "arch"), every_case_and_arch())
def test_identity_at_init(case: Case, arch: str) -> None:
    contract.check_identity_at_init(case, arch)


@pytest.mark.parametrize("case", every_case())
def test_non_identity_init_changes_output(case: Case) -> None:
    contract.check_non_identity_init_changes_output(case)


@pytest.mark.parametrize("case", every_case())
def test_only_adapter_parameters_train_and_change(case: Case) -> None:
    contract.check_only_adapter_parameters_train_and_change(case)


@pytest.mark.parametrize("case", every_case())
def test_parameter_count(case: Case) -> None:
    contract.check_parameter_count(case)


@pytest.mark.parametrize("case", every_case())
def test_bad_configs(case: Case) -> None:
    contract.check_bad_configs(case)


@pytest.mark.parametrize("case", every_case())
def test_save_load_round_trip(case: Case, tmp_path: Path) -> None:
    contract.check_save_load_round_trip(case, tmp_path)


@pytest.mark.parametrize(("case", "arch"), every_case_and_arch())
def test_generate_with_and_without_cache_agree(case: Case, arch: str) -> None:
    contract.check_generate_with_and_without_cache_agree(case, arch)


@pytest.mark.parametrize("case", every_case())
def test_mixed_task_batch(case: Case) -> None:
    contract.check_mixed_task_batch(case)


@pytest.mark.parametrize("case", every_case())
def test_beam_search_rows_match_single_rows(case: Case) -> None:
    contract.check_beam_search_rows_match_single_rows(case)


@pytest.mark.parametrize("case", every_case())
def test_task_ids(case: Case) -> None:
    contract.check_task_ids(case)


@pytest.mark.parametrize("case", every_case())
def test_aux_loss_gradients_survive_gradient_checkpointing(case: Case) -> None:
    contract.check_aux_loss_gradients_survive_gradient_checkpointing(case)


@pytest.mark.parametrize("case", every_case())
def test_gradient_checkpointing_gives_the_same_gradients(case: Case) -> None:
    contract.check_gradient_checkpointing_gives_the_same_gradients(case)


@pytest.mark.parametrize("case", every_case())
def test_disabled_adapter_gives_base_logits(case: Case) -> None:
    contract.check_disabled_adapter_gives_base_logits(case)


@pytest.mark.parametrize("case", every_case(slow_variants=True, check="bf16_base_with_fp32_adapter"))
def test_bf16_base_with_fp32_adapter(case: Case) -> None:
    contract.check_bf16_base_with_fp32_adapter(case)


@pytest.mark.parametrize("case", every_case(slow_variants=True))
def test_loss_decreases(case: Case) -> None:
    contract.check_loss_decreases(case)


def test_unknown_method_names_the_valid_ones() -> None:
    with pytest.raises(KeyError, match="valid methods"):
        build_method("no_such_method", {}, make_tiny_base(), num_tasks=1)
