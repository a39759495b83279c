"""Tiny decoder-only models (Llama / Qwen2 / Mistral) built locally from transformers configs.

The tiny model is the offline default base model: ~0.9 M parameters with the default shapes, small enough
to pre-train in a few minutes on 2 CPU cores (docs/data.md section 4.1: ~100 GFLOP/s, 0.5-1 M parameters
recommended), yet built from the real transformers classes so that every PEFT method is exercised on the
same module names (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``gate_proj``, ``up_proj``,
``down_proj``) and code paths (GQA, RoPE, KV cache) as on hub models.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Literal

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from mtpeft.utils.schema import Bool, Int, PositiveFloat, PositiveInt, config_dataclass

#: arch name -> (config class, model class). Qwen2 differs by q/k/v biases, Mistral by its sliding window.
ARCHITECTURES: dict[str, tuple[type[PreTrainedConfig], type[PreTrainedModel]]] = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}


Arch = Literal[tuple(ARCHITECTURES)]  # type: ignore[valid-type]
"""A key of ``ARCHITECTURES``."""


@config_dataclass(frozen=True)
class TinyModelConfig:
    """Shapes of the tiny model (defaults: ours, sized for the 2-core CPU budget)."""

    arch: Arch = "llama"
    """One of ``llama``, ``qwen2``, ``mistral``."""
    hidden_size: PositiveInt = 128
    """Model width; 128 keeps the model near 0.9 M parameters (docs/data.md 4.1)."""
    num_layers: PositiveInt = 4
    """Decoder layers; 4 gives per-layer methods (routers, CAMs) several layers to differ across."""
    num_heads: PositiveInt = 4
    """Attention heads (head_dim 32)."""
    num_kv_heads: PositiveInt = 2
    """Key/value heads; fewer than ``num_heads`` so grouped-query attention is covered."""
    intermediate_size: PositiveInt = 344
    """SwiGLU width, about 8/3 * hidden_size as in Llama."""
    max_position_embeddings: PositiveInt = 256
    """Longest sequence; the offline tasks need <= 64 tokens, pre-training uses 128."""
    tie_word_embeddings: Bool = True
    """Share input and output embeddings (saves vocab_size * hidden_size parameters)."""
    vocab_size: PositiveInt | None = None
    """Model vocabulary; ``None`` = ``len(tokenizer)``."""
    rope_theta: PositiveFloat = 10000.0
    """RoPE base; the classic value is plenty for 256 positions."""
    seed: Int = 0
    """Seed of the random initialisation."""
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    """``sdpa`` (fastest on CPU at these sizes, see report) or ``eager``."""

    def __post_init__(self) -> None:
        """Head counts must divide (types and ranges are checked by the config layer)."""
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for hashing and metadata)."""
        return asdict(self)


def _hf_config(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerFast) -> PreTrainedConfig:
    """Translate ``cfg`` into the transformers config of its architecture, with the tokenizer's ids."""
    config_cls, _ = ARCHITECTURES[cfg.arch]
    kwargs: dict[str, Any] = {
        "vocab_size": cfg.vocab_size or len(tokenizer),
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "attn_implementation": cfg.attn_implementation,
    }
    if cfg.arch == "mistral":
        kwargs["sliding_window"] = cfg.max_position_embeddings  # present (code path covered) but inert
    return config_cls(**kwargs)


def build_tiny_model(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    """Build a randomly initialised tiny causal LM of ``cfg.arch`` (reproducible from ``cfg.seed``).

    The global torch RNG is left untouched (the seed is applied inside ``torch.random.fork_rng``).
    """
    if cfg.vocab_size is not None and cfg.vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size={cfg.vocab_size} < len(tokenizer)={len(tokenizer)}: use null or more.")
    config = _hf_config(cfg, tokenizer)
    _, model_cls = ARCHITECTURES[cfg.arch]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = model_cls(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())
