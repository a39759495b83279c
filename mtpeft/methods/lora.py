"""LoRA (Hu et al., 2021) through peft: the shared low-rank baseline.

::

        x ──► W0 (frozen) ─────────────┐
        │                              (+)──► y = W0 x + (alpha / r) · B A dropout(x)
        └──► dropout ─► A (r×d_in) ─► B (d_out×r) ┘

``A`` is Kaiming-uniform, ``B`` is zero, so the adapted model starts as the base model. One adapter
is shared by all tasks (trained on the mixture); task ids are ignored. Defaults follow the multi-task
setups of MTL-LoRA / LLM-Adapters (q,k,v,o; r=8, alpha=16) rather than peft's (q,v; alpha=8), see
docs/methods.md section 3. Trainable parameters: ``sum_layers sum_targets r (d_in + d_out)``.

The saved adapter is a standard peft directory (``adapter_config.json`` + ``adapter_model.safetensors``
under peft's key names), so ``PeftModel.from_pretrained(base, "<run dir>/adapter")`` loads it without
mtpeft; ``mtpeft_adapter.json`` next to them lets `mtpeft.methods.load_adapter` rebuild the method.
Merged weight: ``W0 + s · B A`` (peft's ``get_delta_weight``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import nn

from mtpeft.adapters.base import ADAPTER_WEIGHTS, AdaptedModel
from mtpeft.adapters.inject import find_modules
from mtpeft.adapters.lowrank import LowRankConfig
from mtpeft.adapters.registry import register_method
from mtpeft.adapters.shapes import DecoderShape, decoder_shape
from mtpeft.utils.schema import Bool, config_dataclass


@config_dataclass
class LoraMethodConfig(LowRankConfig):
    """r, alpha, dropout, targets and init_weights as every low-rank method (`LowRankConfig`), plus:"""

    use_rslora: Bool = False
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


PEFT_PREFIX = "base_model.model."
"""Prefix of every key in a peft checkpoint (``PeftModel.base_model`` is the tuner, its ``.model`` the HF
model)."""
ADAPTER_NAME = "default"


def peft_to_module_key(key: str) -> str:
    """A peft checkpoint key (``base_model.model.<module>.lora_A.weight``) as the name of the parameter
    in the HF model with injected layers (``<module>.lora_A.default.weight``)."""
    if not key.startswith(PEFT_PREFIX):
        raise KeyError(f"{key!r} is not a peft LoRA key (expected the prefix {PEFT_PREFIX!r})")
    module, _, leaf = key.removeprefix(PEFT_PREFIX).rpartition(".")
    return f"{module}.{ADAPTER_NAME}.{leaf}"


def lora_parameter_count(shape: DecoderShape, r: int, target_names: Iterable[str]) -> int:
    """docs/methods.md 3(h): ``sum_layers sum_targets r (d_in + d_out)`` over projection names like ``q_proj``."""
    return shape.layers * sum(r * sum(shape.linear(t)) for t in target_names)


def adapted_names(peft_config: LoraConfig) -> set[str]:
    """Leaf names (``q_proj``...) of the linears a LoRA config adapted (targets may be regexes)."""
    return {name.rsplit(".", 1)[-1] for name in peft_config.target_modules}


@register_method("lora")
class LoRA(AdaptedModel):
    """Shared LoRA adapter on the target linears (peft ``LoraConfig`` + ``inject_adapter_in_model``)."""

    config_class = LoraMethodConfig
    bench_reference = True  # the shared baseline every benchmark ratio is relative to

    def adapt(self) -> None:
        self.peft_config = inject_lora(self.base_model, self.config)

    def peft_equivalent(self) -> LoraConfig:
        """The peft ``LoraConfig`` this adapter was injected with (the same targets, rank, scale, dropout)."""
        return copy.deepcopy(self.peft_config)

    def expected_trainable_parameters(self) -> int:
        shape = decoder_shape(self.base_model.config)
        return lora_parameter_count(shape, self.config.r, adapted_names(self.peft_config))

    # -- a plain peft directory -----------------------------------------------------------------
    def save_adapter_weights(self, directory: Path) -> None:
        """Write peft's ``adapter_config.json`` and ``adapter_model.safetensors`` (peft key names)."""
        state = get_peft_model_state_dict(self.base_model, adapter_name=ADAPTER_NAME)
        tensors = {PEFT_PREFIX + k: v.detach().contiguous().clone() for k, v in state.items()}
        save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        config = copy.deepcopy(self.peft_config)
        config.task_type = "CAUSAL_LM"
        config.inference_mode = True
        config.base_model_name_or_path = getattr(self.base_model, "name_or_path", None) or None
        config.target_modules = sorted(config.target_modules)
        config.save_pretrained(str(directory))

    def load_adapter_weights(self, directory: Path) -> None:
        """Read the peft checkpoint written by `save_adapter_weights` (strict: every key must match)."""
        state = load_file(str(directory / ADAPTER_WEIGHTS))
        self.load_adapter_state_dict({"base_model." + peft_to_module_key(k): v for k, v in state.items()})

    # -- merging --------------------------------------------------------------------------------
    def merged_weight_deltas(self, task_id: int) -> dict[str, torch.Tensor]:
        """``s · B A`` of every LoRA layer (the same for every task: one shared adapter)."""
        return {
            name: module.get_delta_weight(ADAPTER_NAME)
            for name, module in self.base_model.named_modules()
            if isinstance(module, LoraLayer)
        }
