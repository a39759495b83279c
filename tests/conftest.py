"""Shared fixtures: offline environment, tiny random base models, composed Hydra configs."""

from __future__ import annotations

import os

for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_EVALUATE_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_key, _value)

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

ARCHS = ("llama", "qwen2", "mistral")
_CONFIGS = {
    "llama": transformers.LlamaConfig,
    "qwen2": transformers.Qwen2Config,
    "mistral": transformers.MistralConfig,
}


def make_tiny_base(arch: str = "llama", seed: int = 0) -> transformers.PreTrainedModel:
    """A random decoder of the given family: vocab 128, d=32, 2 layers, 4 heads, 2 KV heads (GQA)."""
    torch.manual_seed(seed)
    config = _CONFIGS[arch](
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    model = _CONFIGS_MODEL[arch](config)
    return model.eval()


_CONFIGS_MODEL = {
    "llama": transformers.LlamaForCausalLM,
    "qwen2": transformers.Qwen2ForCausalLM,
    "mistral": transformers.MistralForCausalLM,
}


@pytest.fixture(params=ARCHS)
def arch(request: pytest.FixtureRequest) -> str:
    return request.param
