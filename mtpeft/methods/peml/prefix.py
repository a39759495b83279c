"""Deep-mode plumbing: per-layer key/value prefixes as a transformers ``Cache``.

The prompt of width L·2·d_kv is laid out ``[layer, key|value, kv_head, head_dim]`` (peft's prefix-tuning
layout). Keys are used as they are, without RoPE: the virtual tokens occupy positions 0..m-1 only through
the real tokens' positions starting at m. Two ways to hand a prefix to the model:

* ``prefix_cache(states)``: a read-only cache whose layers return prefix + new states and store nothing,
  so a checkpointed layer may replay its forward (``forward`` and generation without a cache);
* ``prefix_cache(states, cache)``: writes the prefix into an empty generation cache, which then grows
  normally as tokens are decoded.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer


class PrefixCache(Cache):
    """Read-only prefix cache of one forward (deep mode without a generation cache)."""


class PrefixLayer(DynamicLayer):
    """A cache layer holding a fixed prefix: ``update`` returns prefix + new states and stores nothing."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values, self.device, self.is_initialized = keys, values, keys.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


def split_prefix(
    prompts: torch.Tensor, kv_heads: int, head_dim: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[B, m, L·2·d_kv] → per layer (keys, values), each [B, n_kv, m, head_dim]."""
    batch, m, _ = prompts.shape
    states = prompts.view(batch, m, -1, 2, kv_heads, head_dim).permute(
        2, 3, 0, 4, 1, 5
    )  # [L, 2, B, n_kv, m, hd]
    return [(layer[0], layer[1]) for layer in states]


def prefix_cache(states: list[tuple[torch.Tensor, torch.Tensor]], cache: Cache | None = None) -> Cache:
    """Write ``states`` into the empty ``cache``, or wrap them in a read-only `PrefixCache`."""
    if cache is None:
        return PrefixCache(layers=[PrefixLayer(keys, values) for keys, values in states])
    for layer_idx, (keys, values) in enumerate(states):
        cache.update(keys, values, layer_idx)
    return cache


@torch.no_grad()
def token_prefix(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The model's own keys/values of tokens ``ids`` [rows, m] (positions 0..m-1) as raw prefixes.

    Returns [rows, m, L·2·d_kv], the inverse layout of `split_prefix`.
    """
    cache = DynamicCache(config=model.config)
    was_training = model.training
    model.eval()
    model(input_ids=ids.to(model.get_input_embeddings().weight.device), cache=cache, use_cache=True)
    model.train(was_training)
    states = torch.stack([torch.stack([layer.keys, layer.values]) for layer in cache.layers])
    return states.permute(2, 4, 0, 1, 3, 5).reshape(ids.shape[0], ids.shape[1], -1)
