"""PEML-style multi-task PEFT: optimised continuous prompts + LoRA (docs/methods.md 8).

::

    seeds E_t [m×e] ──► encoder f_θ ──► P_t            (t = task id of the row; one P for sharing=shared)
                                         │
        input mode:  inputs_embeds = [P_t ; Emb(x)]                      positions 0..m-1, then m..
        deep mode:   layer ℓ attends to [P_t^{k,ℓ} ; k(x)], [P_t^{v,ℓ} ; v(x)]  (prefix K/V, no RoPE on it)
                                         │
                   frozen LLM with LoRA on the target linears (peft, as ``method=lora``)

The attention mask gets m leading ones. Real tokens take positions m, m+1, ... counted over the mask
(cumsum), so a left-padded row is computed exactly like the unpadded row. ``forward`` returns logits
(and hidden states) for the original positions only, and computes ``loss`` from those logits and the
caller's ``labels``: no label ever falls on a virtual position (so, unlike peft, which pads labels with
-100, the last virtual position is never trained to predict the first real token, matching the loss the
LightningModule computes from the returned logits).

Generation prepends m placeholder ids (the pad id) and m mask ones, and lets a forward pre-hook on the
base model swap the placeholders for the prompt whenever a forward starts at position 0 (the prefill with
a cache, every step without one): input mode replaces their embeddings; deep mode drops them and puts the
prefix into the cache (the generate-owned ``DynamicCache`` grows normally afterwards; without a cache a
fresh read-only prefix cache is passed at each step). The placeholders are cut from the output, so
``generate`` returns the original ids + new tokens; ``max_length`` / ``min_length`` are shifted by m
(``max_new_tokens`` needs nothing). Logits processors that look at the history (repetition penalty) see
the m pad-id placeholders.

In deep mode ``forward`` passes the prefix as a read-only cache (``prefix.PrefixLayer``: concatenates,
never stores), which is safe to replay, so gradient checkpointing keeps the prefix (huggingface/peft#869).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer

from mtpeft.adapters.base import AdaptedModel
from mtpeft.adapters.registry import register_method
from mtpeft.adapters.shapes import decoder_shape
from mtpeft.adapters.task_context import expand_task_ids
from mtpeft.methods.lora import inject_lora, lora_parameter_count
from mtpeft.methods.peml.config import PemlConfig
from mtpeft.methods.peml.encoders import PromptModule
from mtpeft.methods.peml.prefix import PrefixCache, prefix_cache, split_prefix, token_prefix


@register_method("peml")
class PEML(AdaptedModel):
    """LoRA via peft plus a prompt module that edits ``inputs_embeds`` (input) or the KV cache (deep)."""

    config_class = PemlConfig
    identity_at_init = False  # virtual tokens change the output from step 0 (docs/methods.md 1.2)

    def adapt(self) -> None:
        cfg: PemlConfig = self.config
        self.requires_task_ids = cfg.prompt.sharing != "shared"
        hf = self.base_model.config
        shape = decoder_shape(hf)
        self.length = cfg.prompt.length
        self.kv_heads = getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
        self.head_dim = shape.kv_width // self.kv_heads
        out, width, hidden = _widths(cfg, hf)
        embeddings = self.base_model.get_input_embeddings()
        seed_init = {}
        if cfg.prompt.init == "vocab":
            raw_prefix = cfg.prompt.mode == "deep" and cfg.prompt.encoder.type == "identity"
            from_tokens = partial(token_prefix, self.base_model) if raw_prefix else embeddings
            seed_init = {"from_tokens": from_tokens, "vocab_size": embeddings.weight.shape[0]}
        self.prompt = PromptModule(cfg.prompt, self.num_tasks, width, out, hidden, **seed_init)
        self.prompt.to(embeddings.weight.device)
        inject_lora(self.base_model, cfg.lora)  # after the vocab init, which runs the plain base model
        self._reparam: tuple[tuple, torch.Tensor] | None = None

    def expected_trainable_parameters(self) -> int:
        return expected_parameters(self.config, self.base_model.config, self.num_tasks)

    def parameter_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Two groups: prompt (seeds + encoder, ``lr_prompt``) and LoRA (``lr_lora``); null = optimiser lr."""
        prompt = [p for p in self.prompt.parameters() if p.requires_grad]
        prompt_ids = {id(p) for p in prompt}
        lora = [p for p in self.parameters() if p.requires_grad and id(p) not in prompt_ids]
        groups = []
        for name, params, lr in (
            ("prompt", prompt, self.config.lr_prompt),
            ("lora", lora, self.config.lr_lora),
        ):
            group: dict[str, Any] = {"name": name, "params": params, "weight_decay": weight_decay}
            if lr is not None:
                group["lr"] = lr
            groups.append(group)
        return groups

    def gradient_checkpointing_enable(self) -> None:
        super().gradient_checkpointing_enable()
        if self.config.prompt.mode == "deep":
            # forward passes the prefix as a read-only cache, which the checkpointed replay may read again
            for module in self.base_model.modules():
                if isinstance(module, GradientCheckpointingLayer):
                    module._can_checkpoint_with_cache = True

    # -- prompts --------------------------------------------------------------------------------
    def prompt_table(self) -> torch.Tensor:
        """Encoded prompts [T_p, m, out]; with ``reparam_at_inference``, cached in eval mode."""
        if self.training or not self.config.reparam_at_inference:
            return self.prompt()
        key = tuple((p.data_ptr(), p._version) for p in self.prompt.parameters())
        if self._reparam is None or self._reparam[0] != key:
            with torch.no_grad():
                self._reparam = (key, self.prompt().detach())
        return self._reparam[1]

    def prompts_for(self, task_ids: torch.Tensor | None, batch: int) -> torch.Tensor:
        """Each row's prompt [batch, m, out] (task ids repeated as generate expands the batch)."""
        table = self.prompt_table()
        if table.shape[0] == 1:
            return table.expand(batch, -1, -1)
        return table[expand_task_ids(task_ids.to(table.device), batch)]

    def _prefix(self, prompts: torch.Tensor, cache: Cache | None = None) -> Cache:
        """Deep mode: the rows' prompts as per-layer key/value prefixes, in ``cache`` or a read-only one."""
        dtype = self.base_model.get_input_embeddings().weight.dtype
        return prefix_cache(split_prefix(prompts.to(dtype), self.kv_heads, self.head_dim), cache)

    # -- running --------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        task_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        if not self.adapter_enabled:  # disable_adapter: the base model, no virtual tokens
            return super().forward(input_ids, attention_mask, task_ids, **kwargs)
        embeds = kwargs.pop("inputs_embeds", None)
        tokens = input_ids if input_ids is not None else embeds
        if tokens is None:
            raise ValueError("forward() needs input_ids or inputs_embeds")
        batch, seq, m = tokens.shape[0], tokens.shape[1], self.length
        task_ids = self.check_task_ids(task_ids, batch)
        labels = kwargs.pop("labels", None)
        cache = kwargs.pop("cache", None)
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        if cache is not None and cache.get_seq_length() > 0:
            raise NotImplementedError(
                "peml: continuing from a filled cache is done by generate(), not forward()"
            )
        device = tokens.device
        if attention_mask is None:
            attention_mask = torch.ones(batch, seq, dtype=torch.long, device=device)
        mask = torch.cat([attention_mask.new_ones(batch, m), attention_mask], dim=1)
        positions = kwargs.pop("position_ids", None)
        if positions is None:
            positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        else:
            virtual = torch.arange(m, device=device).expand(batch, m)
            positions = torch.cat([virtual, positions.expand(batch, -1) + m], dim=1)
        prompts = self.prompts_for(task_ids, batch)
        if self.config.prompt.mode == "input":
            if embeds is None:
                embeds = self.base_model.get_input_embeddings()(input_ids)
            embeds = torch.cat([prompts.to(embeds.dtype), embeds], dim=1)
            if cache is not None:
                kwargs["cache"] = cache
            out = self.base_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, **kwargs)
            _strip_virtual(out, m, seq)
        else:
            if not (kwargs.get("use_cache") and not self.training):
                cache, kwargs["use_cache"] = None, False  # read-only prefix: safe under checkpointing
            elif cache is None:
                cache = DynamicCache(config=self.base_model.config)
            out = self.base_model(
                input_ids=input_ids,
                inputs_embeds=embeds,
                attention_mask=mask,
                position_ids=positions[:, m:],
                cache=self._prefix(prompts, cache),
                **kwargs,
            )
        if labels is not None:
            vocab = out.logits.shape[-1]
            logits = out.logits.contiguous()
            out["loss"] = self.base_model.loss_function(logits=logits, labels=labels, vocab_size=vocab)
        return out

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        task_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        if not self.adapter_enabled:  # disable_adapter: the base model, no virtual tokens
            return super().generate(input_ids, attention_mask, task_ids, **kwargs)
        if kwargs.get("inputs_embeds") is not None:
            raise NotImplementedError("peml.generate takes input_ids, not inputs_embeds")
        batch, m = input_ids.shape[0], self.length
        task_ids = self.check_task_ids(task_ids, batch)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        placeholder = kwargs.get("pad_token_id")
        if placeholder is None:
            placeholder = getattr(self.base_model.config, "pad_token_id", None) or 0
        ids = torch.cat([input_ids.new_full((batch, m), placeholder), input_ids], dim=1)
        mask = torch.cat([attention_mask.new_ones(batch, m), attention_mask], dim=1)
        for key in ("max_length", "min_length"):  # they count the virtual tokens too
            if kwargs.get(key) is not None:
                kwargs[key] += m
        if kwargs.get("position_ids") is not None:
            virtual = torch.arange(m, device=ids.device).expand(batch, m)
            kwargs["position_ids"] = torch.cat([virtual, kwargs["position_ids"].expand(batch, -1) + m], dim=1)
        hook = partial(self._inject_prompt, task_ids=task_ids)
        handle = self.base_model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            out = self.base_model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        finally:
            handle.remove()
        if isinstance(out, torch.Tensor):
            return out[:, m:]
        out["sequences"] = out.sequences[:, m:]
        return out

    def _inject_prompt(
        self, module: nn.Module, args: tuple, kwargs: dict[str, Any], task_ids: torch.Tensor | None
    ) -> tuple[tuple, dict[str, Any]]:
        """Generation pre-hook: when a forward starts at position 0, swap the m placeholders for the prompt."""
        m = self.length
        cache = kwargs.get("cache")
        if isinstance(cache, PrefixCache):  # handed back by the previous step without a cache: rebuild
            cache = None
        past = cache.get_seq_length() if cache is not None else 0
        if past >= m:
            return args, kwargs  # the prompt is already in the cache
        if past > 0:
            raise RuntimeError(f"peml: a cache holding {past} positions cuts through the {m} virtual tokens")
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        tokens = ids if ids is not None else embeds
        prompts = self.prompts_for(task_ids, tokens.shape[0])
        if self.config.prompt.mode == "input":
            if embeds is None:
                embeds = self.base_model.get_input_embeddings()(ids)
            kwargs["inputs_embeds"] = torch.cat([prompts.to(embeds.dtype), embeds[:, m:]], dim=1)
            kwargs["input_ids"] = None
            return args, kwargs
        for key in ("input_ids", "inputs_embeds"):
            if kwargs.get(key) is not None:
                kwargs[key] = kwargs[key][:, m:]
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"][..., m:]
        kwargs["cache"] = self._prefix(prompts, cache)
        return args, kwargs


def _strip_virtual(out: Any, m: int, seq: int) -> None:
    """Drop the m virtual positions from logits and hidden states (input mode)."""
    if out.logits.shape[1] == m + seq:
        out["logits"] = out.logits[:, m:]
    if getattr(out, "hidden_states", None) is not None:
        out["hidden_states"] = tuple(h[:, m:] for h in out.hidden_states)


def _widths(cfg: PemlConfig, hf: Any) -> tuple[int, int, int]:
    """(prompt width out, seed width e, encoder width h) for this config and base model."""
    shape = decoder_shape(hf)
    out = shape.hidden if cfg.prompt.mode == "input" else shape.layers * 2 * shape.kv_width
    width = out if cfg.prompt.encoder.type == "identity" else shape.hidden
    return out, width, cfg.prompt.encoder.hidden or shape.hidden


def expected_parameters(cfg: PemlConfig, hf: Any, num_tasks: int) -> int:
    """Trainable parameters from docs/methods.md 8(h), generalised to ``layers`` and the five encoders.

    out = d (input) or L·2·d_kv (deep); e = seed width (out for identity, else d); h = encoder width;
    n = encoder layers; T = tasks. Seeds: shared m·e, per_task T·m·e, shared+per_task (1+T)·m·e,
    mpt m·e + T·R·(m + e). Encoders: mlp e·h + h + (n-1)(h² + h) + h·out + out; lstm (bi-LSTM + head)
    8h(e + h) + 16h + (n-1)(24h² + 16h) + 4h² + 2h + 2h·out + out; transformer n(4e² + 2eh + 9e + h);
    residual_mlp n(2eh + h + e); the last two plus e·out + out when out ≠ e. LoRA: Σ_L Σ_targets r(d_in + d_out).
    """
    shape = decoder_shape(hf)
    out, e, h = _widths(cfg, hf)
    m, n, T, R = cfg.prompt.length, cfg.prompt.encoder.layers, num_tasks, cfg.prompt.mpt_rank
    seeds = {
        "shared": m * e,
        "per_task": T * m * e,
        "shared+per_task": (1 + T) * m * e,
        "mpt": m * e + T * R * (m + e),
    }[cfg.prompt.sharing]
    head = e * out + out if out != e else 0
    bi_lstm = 8 * h * (e + h) + 16 * h + (n - 1) * (24 * h * h + 16 * h)
    encoder = {
        "identity": 0,
        "mlp": e * h + h + (n - 1) * (h * h + h) + h * out + out,
        "lstm": bi_lstm + 4 * h * h + 2 * h + 2 * h * out + out,  # + the 2h → 2h → out head
        "transformer": n * (4 * e * e + 2 * e * h + 9 * e + h) + head,
        "residual_mlp": n * (2 * e * h + h + e) + head,
    }[cfg.prompt.encoder.type]
    lora = lora_parameter_count(shape, cfg.lora.r, cfg.lora.targets)
    return seeds + encoder + lora
