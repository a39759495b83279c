"""The `HyCAM` adapted model: CAM layers attached to every decoder layer, balance loss, routing stats."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from mtpeft.adapters.base import AdaptedModel
from mtpeft.adapters.registry import register_method
from mtpeft.adapters.routing import RouterRecord, layer_stats, pool, switch_balance_loss, token_mask
from mtpeft.adapters.shapes import decoder_shape
from mtpeft.methods.hycam.config import HyCAMConfig
from mtpeft.methods.hycam.layer import CallContext, CAMLayer


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The pre-norm decoder layers (modules with ``self_attn`` and ``input_layernorm``), in order."""
    layers = [m for m in model.modules() if hasattr(m, "self_attn") and hasattr(m, "input_layernorm")]
    if not layers:
        raise ValueError(
            f"HyCAM found no decoder layer with `self_attn` and `input_layernorm` in {type(model).__name__}; "
            "supported: Llama / Qwen2 / Mistral-style pre-norm decoders"
        )
    return layers


@register_method("hycam")
class HyCAM(AdaptedModel):
    """Hybrid Contextual Attention Modulation (Pan et al., CIKM 2025), see the package docstring."""

    config_class = HyCAMConfig
    #: Benchmark: the default (sparse) dispatch and the reference code's dense one.
    bench_variants = {"": (), "dispatch=dense": ("method.dispatch=dense",)}

    def adapt(self) -> None:
        cfg: HyCAMConfig = self.config
        self._context = CallContext()
        cams, self._hooked = [], []
        for layer in decoder_layers(self.base_model):
            ref = layer.input_layernorm.weight
            with torch.device(ref.device):  # built in place (also on "meta" for shape-only models)
                cam = CAMLayer(self.base_model.config.hidden_size, cfg, self._context)
            cam.to(dtype=ref.dtype)
            if cfg.use_specialised and not cfg.router_trainable:
                cam.router.requires_grad_(False)
            layer.hycam = cam  # a submodule of the decoder layer: moves/shards with it
            self._hooked.append((cam, layer, cam.attach(layer)))
            if cfg.train_layernorms:
                layer.input_layernorm.weight.requires_grad_(True)
                layer.post_attention_layernorm.weight.requires_grad_(True)
            cams.append(cam)
        self._cams: tuple[CAMLayer, ...] = tuple(cams)  # plain tuple: parameters stay under base_model

    @contextmanager
    def detach_hooks(self) -> Iterator[None]:
        """Take the CAM hooks off the decoder layers for the block (`disable_adapter`), then put them back."""
        for _, _, handles in self._hooked:
            for handle in handles:
                handle.remove()
        try:
            yield
        finally:
            self._hooked = [(cam, layer, cam.attach(layer)) for cam, layer, _ in self._hooked]

    def expected_trainable_parameters(self) -> int:
        """docs/methods.md 2(h): L·[(d² + d) + N_s(2dr + r² + 2r + d) + (dN_s + N_s) + 2d], terms per the switches."""
        cfg: HyCAMConfig = self.config
        shape = decoder_shape(self.base_model.config)
        d, n, r, b = shape.hidden, cfg.num_specialised, cfg.rank, int(cfg.bias)
        per_layer = 0
        if cfg.use_shared:
            per_layer += d * d + b * d
        if cfg.use_specialised:
            per_layer += n * (2 * d * r + r * r + b * (2 * r + d))
            if cfg.router_trainable:
                per_layer += d * n + n
        if cfg.train_layernorms:
            per_layer += 2 * d
        return shape.layers * per_layer

    def parameter_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Biases and RMSNorm weights without weight decay (reference code, DeepSpeed-Chat grouping)."""
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if param.requires_grad:
                skip = name.endswith("bias") or "layernorm" in name
                (no_decay if skip else decay).append(param)
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    # -- running: the non-padding mask of each base-model call, scoped to forward/generate ---------
    @contextmanager
    def _token_mask_scope(self) -> Iterator[None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._context.token_mask = _token_mask(args, kwargs)

        handle = self.base_model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
            self._context.token_mask = None

    def forward(self, input_ids=None, attention_mask=None, task_ids=None, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():  # a hook added per call breaks the graph: set the one call's mask
            call = dict(kwargs, input_ids=input_ids, attention_mask=attention_mask)
            self._context.token_mask = _token_mask((), call)
            try:
                return super().forward(
                    input_ids=input_ids, attention_mask=attention_mask, task_ids=task_ids, **kwargs
                )
            finally:
                self._context.token_mask = None
        with self._token_mask_scope():
            return super().forward(
                input_ids=input_ids, attention_mask=attention_mask, task_ids=task_ids, **kwargs
            )

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, task_ids=None, **kwargs: Any) -> torch.Tensor:
        with self._token_mask_scope():
            return super().generate(input_ids, attention_mask=attention_mask, task_ids=task_ids, **kwargs)

    # -- load balancing and statistics (records of the last forward) -------------------------------
    def _records(self) -> list[tuple[int, RouterRecord]]:
        return [(i, cam.record) for i, cam in enumerate(self._cams) if cam.record is not None]

    def balance_loss(self) -> torch.Tensor | None:
        """Unweighted L_bal = Σ_k mean(p_k)·mean(softmax(z)_k), means over the non-padding tokens of all
        layers: the Switch loss without the E factor (`switch_balance_loss`)."""
        records = self._records()
        if not records:
            return None
        return switch_balance_loss(pool([rec.usage() for _, rec in records]).clamped())

    def aux_losses(self) -> dict[str, torch.Tensor]:
        if self.config.balance_coef == 0:
            return {}
        balance = self.balance_loss()
        return {} if balance is None else {"load_balance": self.config.balance_coef * balance}

    @torch.no_grad()
    def routing_stats(self) -> dict[str, float]:
        """Per layer: each specialised CAM's share of the non-padding tokens (mean gate for soft routing) and
        the router entropy; plus their means over layers and the unweighted balance loss."""
        records = self._records()
        if not records:
            return {}
        n = self.config.num_specialised
        table = torch.stack([rec.stats_row() for _, rec in records])
        stats = layer_stats(
            {f"layer{i}": row for (i, _), row in zip(records, table, strict=True)}, "cam{}_share"
        )
        means = table.mean(0).tolist()
        stats.update({f"cam{k}_share": means[k] for k in range(n)})
        stats["entropy"] = means[n]
        stats["balance"] = float(self.balance_loss())
        return stats


def _token_mask(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """1.0 for real tokens, 0.0 for padding, flattened over the B·S tokens of this call (last S mask columns)."""
    tokens = kwargs.get("input_ids", args[0] if args else None)
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    if tokens is None:
        return None
    batch, seq = tokens.shape[:2]
    return token_mask(kwargs.get("attention_mask"), batch * seq, batch=batch)
