"""Real base-model configs (conf/model/<hub model>.yaml) on local stand-ins.

No hub access here: each config is composed as is (its hub id, dtype and switches are checked), then
loaded with ``model.name_or_path`` pointing at a tiny saved model of the same architecture, the way a
user points it at a downloaded copy. Every method trains end to end on a Qwen2-architecture stand-in,
the CLI runs on saved Llama and Qwen2 directories, and a missing hub id fails fast offline.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mtpeft.data.synthetic.primitives import tokenizer_corpus
from mtpeft.methods import available_methods, build_method
from mtpeft.models.config import HubModelSpec, parse_model
from mtpeft.models.loader import ModelNotAvailableError, describe_model, load_base_model
from mtpeft.models.tiny import TinyModelConfig, build_tiny_model
from mtpeft.models.tokenizer import train_tokenizer
from mtpeft.run import run
from tests.conftest import TINY_RUN, compose_train

REPO = Path(__file__).resolve().parent.parent
#: config name -> (hub id, architecture of its stand-in, gradient checkpointing on by default)
HUB_MODELS = {
    "qwen2_5_0_5b": ("Qwen/Qwen2.5-0.5B", "qwen2", False),
    "qwen2_5_1_5b": ("Qwen/Qwen2.5-1.5B", "qwen2", False),
    "llama3_2_1b": ("meta-llama/Llama-3.2-1B", "llama", False),
    "mistral_7b_v0_3": ("mistralai/Mistral-7B-v0.3", "mistral", True),
    "llama2_7b": ("meta-llama/Llama-2-7b-hf", "llama", True),
}
#: TINY_RUN without its tiny-model keys (a hub model node has no ``pretrain``).
TINY_DATA_RUN = [o for o in TINY_RUN if not o.startswith("model.")]


@pytest.fixture(scope="module")
def standins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A saved tiny model + tokenizer per architecture, in the layout ``save_pretrained`` writes."""
    tokenizer = train_tokenizer(tokenizer_corpus(0))
    root = tmp_path_factory.mktemp("standins")
    dirs = {}
    for arch in ("llama", "qwen2", "mistral"):
        config = TinyModelConfig(arch=arch, hidden_size=32, intermediate_size=64, num_layers=2)
        build_tiny_model(config, tokenizer).save_pretrained(root / arch)
        tokenizer.save_pretrained(root / arch)
        dirs[arch] = root / arch
    return dirs


@pytest.mark.parametrize("name", sorted(HUB_MODELS))
def test_hub_config_composes_with_its_hub_id(name: str, tmp_path: Path) -> None:
    hub_id, _, checkpointing = HUB_MODELS[name]
    cfg = compose_train([f"model={name}"], tmp_path)
    spec = parse_model(cfg.model)
    assert isinstance(spec, HubModelSpec) and spec.name_or_path == hub_id
    assert spec.dtype == "bfloat16" and spec.adapter_dtype == "float32"
    assert cfg.gradient_checkpointing is checkpointing  # the model's switch reaches the run


@pytest.mark.parametrize("name", sorted(HUB_MODELS))
def test_hub_config_loads_a_local_standin(name: str, standins: dict[str, Path], tmp_path: Path) -> None:
    arch = HUB_MODELS[name][1]
    cfg = compose_train([f"model={name}", f"model.name_or_path={standins[arch]}"], tmp_path)
    model, tokenizer = load_base_model(cfg.model)
    assert describe_model(model)["arch"] == arch and describe_model(model)["dtype"] == "bfloat16"
    assert tokenizer.pad_token_id is not None


@pytest.mark.parametrize("name", sorted(HUB_MODELS))
def test_missing_hub_id_fails_fast_offline(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_hf_cache"))
    cfg = compose_train([f"model={name}"], tmp_path)
    started = time.perf_counter()
    with pytest.raises(ModelNotAvailableError, match=f"{HUB_MODELS[name][0]}.*hf download"):
        load_base_model(cfg.model)
    assert time.perf_counter() - started < 10


@pytest.mark.parametrize("method", available_methods())
def test_every_method_trains_on_a_qwen2_standin(
    method: str, standins: dict[str, Path], tmp_path: Path
) -> None:
    overrides = [
        *TINY_DATA_RUN,
        "model=qwen2_5_0_5b",
        f"model.name_or_path={standins['qwen2']}",
        "model.dtype=float32",
        f"method={method}",
        "logger=none",
    ]
    results = run(compose_train(overrides, tmp_path), tmp_path)
    assert results["status"] == "success" and results["model"]["arch"] == "qwen2"
    assert 0.0 <= results["metrics"]["test"]["test/avg/score"] <= 1.0


@pytest.mark.parametrize("method", [m for m in available_methods() if m != "none"])
def test_bf16_base_trains_fp32_adapters(method: str, standins: dict[str, Path]) -> None:
    """A bf16 base with fp32 adapters (the hub configs' default): finite loss, gradients on adapters only."""
    base, tokenizer = load_base_model(
        {"kind": "hub", "name_or_path": str(standins["llama"]), "dtype": "bfloat16"}
    )
    model = build_method(method, {}, base, num_tasks=2)
    assert model.upcast_trainable(torch.float32) > 0
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    ids = tokenizer(["bob owns a owl .", "ann has 3 cats ."], return_tensors="pt", padding=True)
    out = model(**ids, labels=ids["input_ids"], task_ids=torch.tensor([0, 1]))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable if p.grad is not None)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    generated = model.generate(**ids, task_ids=torch.tensor([0, 1]), max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == ids["input_ids"].shape[1] + 3


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_cli_trains_hycam_on_a_saved_model_directory(
    arch: str, standins: dict[str, Path], tmp_path: Path
) -> None:
    env = {**os.environ, "MTPEFT_ROOT": str(tmp_path)}
    cmd = [
        sys.executable,
        "-m",
        "mtpeft.train",
        "model=local_dir",
        f"model.name_or_path={standins[arch]}",
        "method=hycam",
        "data=mix3",
        *TINY_DATA_RUN,
        "logger=none",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results,) = tmp_path.rglob("results.json")
    assert f'"arch": "{arch}"' in results.read_text()
