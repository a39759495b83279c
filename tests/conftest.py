"""Shared fixtures: offline environment, tiny random base models, composed Hydra configs."""

from __future__ import annotations

import contextlib
import os

for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_EVALUATE_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "TOKENIZERS_PARALLELISM": "false",
    # tiny models: one thread is faster than two fighting over 2 cores (and subprocesses inherit it)
    "OMP_NUM_THREADS": "1",
}.items():
    os.environ.setdefault(_key, _value)

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import yaml  # noqa: E402

ARCHS = ("llama", "qwen2", "mistral")
_CONFIGS = {
    "llama": transformers.LlamaConfig,
    "qwen2": transformers.Qwen2Config,
    "mistral": transformers.MistralConfig,
}


_CONFIGS_MODEL = {
    "llama": transformers.LlamaForCausalLM,
    "qwen2": transformers.Qwen2ForCausalLM,
    "mistral": transformers.MistralForCausalLM,
}
TINY_SHAPE = {
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": True,
}
"""The unit tests' decoder: vocab 128, d=32, 2 layers, 4 heads, 2 KV heads (GQA)."""
QWEN2_5_0_5B_SHAPE = {
    "vocab_size": 1024,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
}
"""Qwen2.5-0.5B's layer shapes (a small vocabulary: counts of adapter parameters do not depend on it)."""
TINY_YAML_KEYS = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads"}
TINY_YAML_KEYS |= {"num_kv_heads": "num_key_value_heads"}
"""conf/model/tiny_*.yaml keys that transformers names otherwise."""
TINY_YAML_SHAPE = ("hidden_size", "intermediate_size", "max_position_embeddings", "vocab_size")


def decoder(
    arch: str, seed: int = 0, device: str | None = None, **shape: object
) -> transformers.PreTrainedModel:
    """A random decoder of family ``arch`` with config values ``shape``, in eval mode; ``device="meta"``
    builds shapes only (no memory, no initialisation)."""
    torch.manual_seed(seed)
    config = _CONFIGS[arch](**shape)
    with torch.device(device) if device else contextlib.nullcontext():
        return _CONFIGS_MODEL[arch](config).eval()


def make_tiny_base(arch: str = "llama", seed: int = 0) -> transformers.PreTrainedModel:
    """The unit tests' random decoder of the given family (`TINY_SHAPE`)."""
    return decoder(arch, seed, **TINY_SHAPE)


def tiny_preset_shape(preset: str = "tiny_llama", seed: int = 0) -> transformers.PreTrainedModel:
    """A random decoder with the shape of ``conf/model/<preset>.yaml`` (read from it, so never stale), for
    parameter counts without pre-training it or building its tokenizer."""
    values = yaml.safe_load((CONF_DIR / "model" / f"{preset}.yaml").read_text())
    shape = {TINY_YAML_KEYS.get(key, key): value for key, value in values.items()}
    keys = (*TINY_YAML_SHAPE, *TINY_YAML_KEYS.values())
    return decoder(values["arch"], seed, **{key: shape[key] for key in keys})


@pytest.fixture(params=ARCHS)
def arch(request: pytest.FixtureRequest) -> str:
    return request.param


# -- composed Hydra configs ------------------------------------------------------------------------
from pathlib import Path  # noqa: E402

from omegaconf import DictConfig  # noqa: E402

from mtpeft.bench.config import compose_run  # noqa: E402

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

#: Overrides that shrink the real default config to a few seconds of work (data, steps, eval).
TINY_RUN = [
    "model.pretrain.steps=20",
    "model.pretrain.corpus_lines=500",
    "data.tasks.qa.train=48",
    "data.tasks.qa.val=6",
    "data.tasks.qa.test=6",
    "data.tasks.code.train=48",
    "data.tasks.code.val=6",
    "data.tasks.code.test=6",
    "data.tasks.reasoning.train=48",
    "data.tasks.reasoning.val=6",
    "data.tasks.reasoning.test=6",
    "data.batch_size=8",
    "evaluation.batch_size=9",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.log_every_n_steps=1",
    "logger=csv",
]


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test run builds its tiny base models into a temporary cache (never the user's)."""
    path = tmp_path_factory.mktemp("mtpeft_cache")
    os.environ["MTPEFT_CACHE_DIR"] = str(path)
    return path


def compose_train(overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose conf/train.yaml as ``python -m mtpeft.train`` would, writing under ``output_dir``."""
    return compose_run(overrides, output_dir)


# -- shared builders for method-specific tests -----------------------------------------------------
def lora_twin(adapted: dict, arch: str, num_tasks: int, a_index: int | None = 0, b_index: int = 0):
    """A ``method=lora`` model (r=8, alpha=16, no dropout) whose A/B are copied from ``adapted`` layers.

    ``adapted`` maps module names to layers with stacked ``lora_A`` / ``lora_B`` tensors; ``a_index=None``
    takes ``lora_A`` as is (a single shared A). Used by the reduction-to-LoRA tests.
    """
    from mtpeft.methods import build_method

    lora = build_method(
        "lora", {"r": 8, "alpha": 16.0, "dropout": 0.0}, make_tiny_base(arch), num_tasks=num_tasks
    ).eval()
    with torch.no_grad():
        for name, layer in adapted.items():
            peft_layer = lora.base_model.get_submodule(name)
            a = layer.lora_A if a_index is None else layer.lora_A[a_index]
            peft_layer.lora_A["default"].weight.copy_(a)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B[b_index])
    return lora


def qwen2_5_0_5b_shape_on_meta() -> transformers.PreTrainedModel:
    """A Qwen2.5-0.5B-shaped model on the meta device (shapes only), for docs/methods.md section 11 counts."""
    return decoder("qwen2", device="meta", **QWEN2_5_0_5B_SHAPE)


def bare_trainer(root: Path, **kwargs: object) -> object:
    """A Lightning ``Trainer`` that only trains: no logger, checkpoints, progress bar, summary or validation
    (``kwargs``: the budget, e.g. ``max_steps``)."""
    import lightning

    settings = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_val_batches": 0,
        "default_root_dir": root,
    }
    return lightning.Trainer(**{**settings, **kwargs})
