"""Closed-form shapes of Llama/Qwen2/Mistral projections, for the parameter-count formulas.

The formulas of docs/methods.md are written in terms of d, d_ff, d_kv and L; these helpers read them off a
Hugging Face config (not off the instantiated modules), so the contract tests compare two independent
computations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DecoderShape:
    hidden: int  # d
    intermediate: int  # d_ff
    layers: int  # L
    q_width: int  # n_heads * head_dim
    kv_width: int  # d_kv = n_kv_heads * head_dim

    def linear(self, name: str) -> tuple[int, int]:
        """(d_in, d_out) of a projection named like its Hugging Face module."""
        shapes = {
            "q_proj": (self.hidden, self.q_width),
            "k_proj": (self.hidden, self.kv_width),
            "v_proj": (self.hidden, self.kv_width),
            "o_proj": (self.q_width, self.hidden),
            "gate_proj": (self.hidden, self.intermediate),
            "up_proj": (self.hidden, self.intermediate),
            "down_proj": (self.intermediate, self.hidden),
        }
        if name not in shapes:
            raise KeyError(f"no closed-form shape for {name!r}; known: {', '.join(shapes)}")
        return shapes[name]


def decoder_shape(config: Any) -> DecoderShape:
    """Shape summary of a decoder-only Hugging Face config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return DecoderShape(
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        layers=config.num_hidden_layers,
        q_width=heads * head_dim,
        kv_width=kv_heads * head_dim,
    )
