"""HyCAM beyond the shared contract: the docs/methods.md section 2 equations, switches, routing and bookkeeping.

The contract itself (exact identity at init, save/load, cache, checkpointing, parameter counts, bad configs)
runs on HyCAM's variants in tests/test_method_contract.py (cases ``hycam-*``).

The reference forward below is written from the equations (explicit loop over the specialised CAMs,
dense one-hot routing, the layer's own submodules called directly, no hooks), so it checks the hook-based
implementation independently.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mtpeft.methods import build_method, parse_method_config
from mtpeft.methods.hycam import HyCAMConfig
from tests.conftest import make_tiny_base


def _build(arch: str = "llama", **options):
    return build_method("hycam", options, make_tiny_base(arch), num_tasks=3)


def _randomise(model, seed: int = 0, scale: float = 0.2) -> None:
    """Non-trivial CAM weights (shared, specialised, router) so that m != 1 and routing varies."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".hycam." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * (1.0 if "router" in name else scale))


def _batch(batch: int = 3, length: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))
    return ids, torch.ones_like(ids)


def _logits(model, ids, mask) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _reference_modulation(cam, u: torch.Tensor, cfg: HyCAMConfig) -> torch.Tensor:
    """m = [SiLU(W_sh u + b_sh) + 1] + Σ_k g_k SiLU(c (B_k (N_k (A_k u + bA_k) + bN_k) + bB_k)) (eval routing)."""
    m = F.silu(u @ cam.shared.weight.T + cam.shared.bias) + 1 if cfg.use_shared else torch.ones_like(u)
    if cfg.use_specialised:
        z = u @ cam.router.weight.T + cam.router.bias
        if cfg.routing == "hard_gumbel":
            g = F.one_hot(z.argmax(-1), cfg.num_specialised).to(u.dtype)
        else:
            g = torch.softmax(z / cfg.tau, dim=-1)
        c = cfg.alpha / cfg.rank
        for k in range(cfg.num_specialised):
            low = (u @ cam.spec_A[k].T + cam.spec_A_bias[k]) @ cam.spec_N[k].T + cam.spec_N_bias[k]
            m = m + g[..., k : k + 1] * F.silu(c * (low @ cam.spec_B[k].T + cam.spec_B_bias[k]))
    return m


def _reference_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """HyCAM per docs/methods.md 2(b) on an unpadded batch: h' = (h + a) ⊙ m or h + a ⊙ m, then the frozen MLP."""
    cfg, inner = model.config, model.base_model.model
    with torch.no_grad():
        x = inner.embed_tokens(ids)
        positions = torch.arange(ids.shape[1])[None]
        rope = inner.rotary_emb(x, positions)
        for layer in inner.layers:
            h = x
            u = layer.input_layernorm(h)
            a, _ = layer.self_attn.forward(hidden_states=u, position_embeddings=rope, attention_mask=None)
            m = _reference_modulation(layer.hycam, u, cfg)
            h2 = (h + a) * m if cfg.apply_to == "residual_sum" else h + a * m
            x = h2 + layer.mlp(layer.post_attention_layernorm(h2))
        return model.base_model.lm_head(inner.norm(x))


@pytest.mark.parametrize(
    ("arch", "options"),
    [
        ("llama", {"apply_to": "residual_sum"}),
        ("llama", {"apply_to": "attn_output"}),
        ("qwen2", {"apply_to": "residual_sum"}),
        ("mistral", {"apply_to": "attn_output"}),
        ("llama", {"routing": "softmax", "tau": 0.7}),
        ("llama", {"routing": "soft_gumbel", "apply_to": "attn_output", "num_specialised": 3, "rank": 4}),
    ],
)
def test_forward_matches_reference_equations(arch: str, options: dict) -> None:
    model = _build(arch, **options)
    _randomise(model)
    ids, mask = _batch()
    logits = _logits(model, ids, mask)
    torch.testing.assert_close(logits, _reference_logits(model, ids), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits, _logits(make_tiny_base(arch), ids, mask), atol=1e-3)
    if model.config.routing == "hard_gumbel":  # the randomised router really spreads tokens over CAMs
        assert sum(v > 0 for k, v in model.routing_stats().items() if k.startswith("layer0/cam")) >= 2


@pytest.mark.parametrize(
    ("router_trainable", "train_layernorms"), [(True, False), (False, True)], ids=["default", "reference"]
)
def test_switches_choose_the_trainable_parameters(router_trainable: bool, train_layernorms: bool) -> None:
    """CAMs always train; the router only with router_trainable (but is saved either way); the RMSNorm
    weights only with train_layernorms. That training changes exactly these is the contract's check."""
    model = _build(router_trainable=router_trainable, train_layernorms=train_layernorms, num_specialised=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    norms = {n for n in dict(model.named_parameters()) if n.endswith("layernorm.weight")}
    routers = {n for n in dict(model.named_parameters()) if ".hycam.router." in n}
    expected = {n for n in dict(model.named_parameters()) if ".hycam." in n}
    expected = (expected if router_trainable else expected - routers) | (norms if train_layernorms else set())
    assert trainable == expected
    assert routers <= set(model.adapter_state_dict()), "a frozen router is still adapter state"


def test_eval_routing_is_deterministic_unless_eval_noise() -> None:
    model = _build()
    _randomise(model, seed=5)
    ids, mask = _batch()
    assert torch.equal(_logits(model, ids, mask), _logits(model, ids, mask))
    noisy = _build(eval_noise=True)
    noisy.load_adapter_state_dict(model.adapter_state_dict())
    torch.manual_seed(0)
    first = _logits(noisy, ids, mask)
    assert not torch.equal(first, _logits(noisy, ids, mask)), "eval_noise=true draws Gumbel noise in eval"


def test_padding_is_excluded_from_balance_loss_and_stats() -> None:
    model = _build()
    _randomise(model, seed=6)
    ids, mask = _batch(length=6)
    _logits(model, ids, mask)
    balance, stats = model.aux_losses()["load_balance"], model.routing_stats()
    padded = torch.cat([ids, torch.zeros(ids.shape[0], 4, dtype=ids.dtype)], dim=1)  # right padding
    padded_mask = torch.cat([mask, torch.zeros(ids.shape[0], 4, dtype=mask.dtype)], dim=1)
    _logits(model, padded, padded_mask)
    torch.testing.assert_close(model.aux_losses()["load_balance"], balance)
    assert model.routing_stats() == pytest.approx(stats, abs=1e-6)
    _logits(model, padded, torch.ones_like(padded))  # the same pads counted as tokens do change it
    assert not torch.allclose(model.aux_losses()["load_balance"], balance)


def test_routing_stats_and_balance_loss_values() -> None:
    model = _build(num_specialised=3)
    _randomise(model, seed=7)
    _logits(model, *_batch())
    stats = model.routing_stats()
    for layer in (0, 1):
        assert sum(stats[f"layer{layer}/cam{k}_share"] for k in range(3)) == pytest.approx(1.0)
        assert 0.0 <= stats[f"layer{layer}/entropy"] <= math.log(3) + 1e-6
    balance = model.aux_losses()["load_balance"] / model.config.balance_coef
    assert balance.item() == pytest.approx(stats["balance"])
    assert 0.0 < stats["balance"] <= 1.0
    assert _build(balance_coef=0.0).aux_losses() == {}
    assert _build(use_specialised=False).routing_stats() == {}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_sparse_dispatch_equals_dense_masked_computation(training: bool) -> None:
    """Same forward; same gradients for the CAM weights of the last layer. Upstream gradients differ by the
    straight-through router term of the unselected CAMs, which only the dense computation has."""
    sparse, dense = _build(dispatch="sparse"), _build(dispatch="dense")
    _randomise(sparse, seed=8)
    dense.load_adapter_state_dict(sparse.adapter_state_dict())
    ids, mask = _batch()
    results = []
    for model in (sparse, dense):
        model.train(training)
        torch.manual_seed(0)  # the same Gumbel noise for both
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        last = model.base_model.model.layers[-1].hycam
        grads = {n: p.grad for n, p in last.named_parameters() if "router" not in n}
        results.append((out.logits.detach(), grads))
    (logits_s, grads_s), (logits_d, grads_d) = results
    torch.testing.assert_close(logits_s, logits_d)
    for name in grads_s:
        torch.testing.assert_close(grads_s[name], grads_d[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("options", "millions"),
    [
        ({}, 546.45),
        ({"train_layernorms": True}, 546.71),
        ({"router_trainable": False, "train_layernorms": True}, 546.19),
    ],
)
def test_parameter_count_of_llama2_7b_shape_matches_methods_md(options: dict, millions: float) -> None:
    """docs/methods.md 2(h): N_s=4, r=8 on d=4096, L=32 (built on the meta device: shapes only)."""
    config = transformers.LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        vocab_size=32000,
    )
    with torch.device("meta"):
        base = transformers.LlamaForCausalLM(config)
    model = build_method("hycam", {"num_specialised": 4, "rank": 8, **options}, base, num_tasks=1)
    assert model.count_parameters()[0] == model.expected_trainable_parameters()
    assert round(model.expected_trainable_parameters() / 1e6, 2) == millions


def test_adapter_state_is_only_hycam_and_base_untouched() -> None:
    base = make_tiny_base()
    reference = copy.deepcopy(base.state_dict())
    model = build_method("hycam", {}, base, num_tasks=1)
    assert all(".hycam." in name for name in model.adapter_state_dict())
    for name, value in reference.items():
        assert torch.equal(model.base_model.state_dict()[name], value)


def test_deepcopy_after_a_training_forward_is_independent() -> None:
    model = _build()
    _randomise(model, seed=10)
    ids, mask = _batch()
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=ids)  # records hold non-leaf tensors now
    clone = copy.deepcopy(model)
    hook = next(iter(clone.base_model.model.layers[0].self_attn._forward_hooks.values()))
    assert hook.__self__ is clone.base_model.model.layers[0].hycam
    assert torch.equal(_logits(clone, ids, mask), _logits(model, ids, mask))
    with torch.no_grad():
        clone.base_model.model.layers[0].hycam.shared.weight.add_(1.0)
    assert not torch.equal(_logits(clone, ids, mask), _logits(model, ids, mask))


def test_bfloat16_base_trains_with_fp32_router_math() -> None:
    model = build_method("hycam", {}, make_tiny_base().to(torch.bfloat16), num_tasks=1)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}
    model.train()
    ids, mask = _batch()
    loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss + model.aux_losses()["load_balance"]
    loss.backward()
    assert model.base_model.model.layers[0].hycam.record.logits.dtype == torch.float32
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_method_yaml_and_ablation_study_compose_to_valid_configs() -> None:
    conf = Path(__file__).resolve().parents[1] / "conf"
    fields = {f.name for f in dataclasses.fields(HyCAMConfig)}
    assert set(OmegaConf.load(conf / "method" / "hycam.yaml")) == fields | {"name"}
    parts = {"hybrid": (True, True), "shared_only": (True, False), "specialised_only": (False, True)}
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        for name, (shared, specialised) in parts.items():
            cfg = compose("train", overrides=["experiment=hycam_ablation", f"ablation.parts={name}"])
            options = OmegaConf.to_container(cfg.method, resolve=True)
            assert options.pop("name") == "hycam" and list(cfg.tags) == ["hycam", "ablation"]
            config = parse_method_config("hycam", options)
            assert (config.use_shared, config.use_specialised) == (shared, specialised)
        cfg = compose("train", overrides=["experiment=hycam_ablation"], return_hydra_config=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    sweep = {key: str(value).split(",") for key, value in cfg.hydra.sweeper.params.items()}
    assert sweep["ablation.parts"] == list(parts) and sweep["seed"] == ["0", "1", "2"]
    assert sweep["method.num_specialised"] == ["2", "4", "8"] and len(sweep["method.apply_to"]) == 2
