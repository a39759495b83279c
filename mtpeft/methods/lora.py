"""LoRA (Hu et al., 2021) through peft: the shared low-rank baseline.

::

        x ──► W0 (frozen) ─────────────┐
        │                              (+)──► y = W0 x + (alpha / r) · B A dropout(x)
        └──► dropout ─► A (r×d_in) ─► B (d_out×r) ┘

``A`` is Kaiming-uniform, ``B`` is zero, so the adapted model starts as the base model. One adapter
is shared by all tasks (trained on the mixture); task ids are ignored. Defaults follow the multi-task
setups of MTL-LoRA / LLM-Adapters (q,k,v,o; r=8, alpha=16) rather than peft's (q,v; alpha=8), see
METHODS.md section 3. Trainable parameters: ``sum_layers sum_targets r (d_in + d_out)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from mtpeft.methods.base import AdaptedModel
from mtpeft.methods.inject import find_modules
from mtpeft.methods.lowrank import LowRankConfig
from mtpeft.methods.registry import register_method
from mtpeft.methods.shapes import DecoderShape, decoder_shape


@dataclass
class LoraMethodConfig(LowRankConfig):
    """r, alpha, dropout, targets and init_weights as every low-rank method (`LowRankConfig`), plus:"""

    use_rslora: bool = False
    """Rank-stabilised scale alpha / sqrt(r) (Kalajdzievski, 2023)."""


def inject_lora(model: nn.Module, cfg: LoraMethodConfig) -> LoraConfig:
    """Add peft LoRA layers to the linears of ``model`` matching ``cfg.targets``; return peft's config."""
    peft_config = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=find_modules(model, cfg.targets),
        use_rslora=cfg.use_rslora,
        init_lora_weights=cfg.init_weights,
        bias="none",
    )
    inject_adapter_in_model(peft_config, model)
    return peft_config


def lora_parameter_count(shape: DecoderShape, r: int, target_names: Iterable[str]) -> int:
    """METHODS.md 3(h): ``sum_layers sum_targets r (d_in + d_out)`` over projection names like ``q_proj``."""
    return shape.layers * sum(r * sum(shape.linear(t)) for t in target_names)


def adapted_names(peft_config: LoraConfig) -> set[str]:
    """Leaf names (``q_proj``...) of the linears a LoRA config adapted (targets may be regexes)."""
    return {name.rsplit(".", 1)[-1] for name in peft_config.target_modules}


@register_method("lora")
class LoRA(AdaptedModel):
    """Shared LoRA adapter on the target linears (peft ``LoraConfig`` + ``inject_adapter_in_model``)."""

    config_class = LoraMethodConfig

    def adapt(self) -> None:
        self.peft_config = inject_lora(self.base_model, self.config)

    def expected_trainable_parameters(self) -> int:
        shape = decoder_shape(self.base_model.config)
        return lora_parameter_count(shape, self.config.r, adapted_names(self.peft_config))
