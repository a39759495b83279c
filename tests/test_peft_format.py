"""``method=lora`` saves a standard peft directory: plain transformers + peft load it (in a process that
never imports mtpeft) to the same logits; mtpeft reloads it, and still reloads the earlier layout."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file

from mtpeft.adapters.base import ADAPTER_CONFIG, ADAPTER_WEIGHTS, METHOD_META
from mtpeft.methods import build_method, load_adapter
from tests.conftest import make_tiny_base

#: Loads ``base/`` and ``adapter/`` with plain transformers + peft and writes the logits of ``inputs.pt``.
PLAIN_PEFT = textwrap.dedent(
    """
    import sys
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    root = sys.argv[1]
    base = AutoModelForCausalLM.from_pretrained(f"{root}/base", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, f"{root}/adapter").eval()
    with torch.no_grad():
        logits = model(input_ids=torch.load(f"{root}/inputs.pt")).logits
    torch.save(logits, f"{root}/peft_logits.pt")
    assert not [m for m in sys.modules if m.split(".")[0] == "mtpeft"], "mtpeft was imported"
    print(type(model).__name__)
    """
)

LORA_CONFIGS = {
    "attention": {"r": 4, "alpha": 8.0, "dropout": 0.1},
    "mlp_rslora": {
        "r": 2,
        "alpha": 4.0,
        "targets": ["gate_proj", "up_proj", "down_proj"],
        "use_rslora": True,
    },
}


def _lora(options: dict, seed: int = 0):
    """A LoRA model with a random (non-identity) update, in eval mode."""
    return build_method("lora", {**options, "init_weights": False}, make_tiny_base(seed=seed), 2).eval()


def _logits(model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=inputs).logits


@pytest.mark.parametrize("name", sorted(LORA_CONFIGS))
def test_plain_peft_loads_the_adapter_to_the_same_logits(name: str, tmp_path: Path) -> None:
    model = _lora(LORA_CONFIGS[name])
    model.save_adapter(tmp_path / "adapter")
    make_tiny_base().save_pretrained(tmp_path / "base")
    inputs = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    torch.save(inputs, tmp_path / "inputs.pt")
    expected = _logits(model, inputs)
    assert not torch.allclose(expected, _logits(make_tiny_base(), inputs))  # the adapter does something
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_PEFT, str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PeftModelForCausalLM" in proc.stdout
    got = torch.load(tmp_path / "peft_logits.pt")
    torch.testing.assert_close(got, expected, rtol=0.0, atol=1e-6)


def test_files_match_what_peft_itself_saves(tmp_path: Path) -> None:
    """Same key names and config type as ``get_peft_model(...).save_pretrained`` with the same config."""
    model = _lora(LORA_CONFIGS["attention"])
    model.save_adapter(tmp_path / "ours")
    peft_model = get_peft_model(make_tiny_base(), LoraConfig(**_peft_kwargs(model.peft_config)))
    peft_model.save_pretrained(tmp_path / "theirs")
    keys = {}
    for side in ("ours", "theirs"):
        with safe_open(tmp_path / side / ADAPTER_WEIGHTS, "pt") as f:
            keys[side] = set(f.keys())
    assert keys["ours"] == keys["theirs"]
    ours = json.loads((tmp_path / "ours" / ADAPTER_CONFIG).read_text())
    theirs = json.loads((tmp_path / "theirs" / ADAPTER_CONFIG).read_text())
    for key in ("peft_type", "r", "lora_alpha", "use_rslora", "bias"):
        assert ours[key] == theirs[key], key
    assert sorted(ours["target_modules"]) == sorted(theirs["target_modules"])
    assert ours["task_type"] == "CAUSAL_LM"


def _peft_kwargs(config: LoraConfig) -> dict:
    keys = ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "bias")
    return {k: getattr(config, k) for k in keys}


def test_mtpeft_reloads_the_peft_directory(tmp_path: Path) -> None:
    model = _lora(LORA_CONFIGS["mlp_rslora"])
    model.save_adapter(tmp_path / "adapter")
    assert (tmp_path / "adapter" / METHOD_META).is_file()
    reloaded = load_adapter(tmp_path / "adapter", make_tiny_base()).eval()
    inputs = torch.randint(3, 128, (2, 6))
    assert torch.equal(_logits(reloaded, inputs), _logits(model, inputs))
    assert reloaded.config == model.config


def test_earlier_layout_still_loads(tmp_path: Path) -> None:
    """Adapters written before the peft format: meta in adapter_config.json, mtpeft parameter names."""
    model = _lora(LORA_CONFIGS["attention"])
    old = tmp_path / "old"
    old.mkdir()
    save_file({n: t.contiguous() for n, t in model.adapter_state_dict().items()}, str(old / ADAPTER_WEIGHTS))
    meta = {"method": "lora", "num_tasks": 2, "config": dataclasses.asdict(model.config)}
    (old / ADAPTER_CONFIG).write_text(json.dumps(meta))
    reloaded = load_adapter(old, make_tiny_base()).eval()
    inputs = torch.randint(3, 128, (1, 5))
    assert torch.equal(_logits(reloaded, inputs), _logits(model, inputs))


def test_not_an_adapter_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=METHOD_META):
        load_adapter(tmp_path, make_tiny_base())
