"""The adapted model of a composed run config, built as a training run builds it (for `base_dtype_speed.py`).

`build_adapted` composes ``conf/train.yaml`` with Hydra overrides, loads the base (`load_base_model`), builds
the method with three tasks, stores the adapter in ``model.adapter_dtype``, turns on gradient checkpointing
when the config does (as ``MultiTaskModule`` does) and returns the model in training mode with its base.
`random_inputs` is a seeded random batch of token and task ids; `lm_loss` the token-mean LM loss of a fully
labelled batch as training computes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
NUM_TASKS = 3


def build_adapted(overrides: list[str]) -> tuple[Any, Any]:
    """(adapted model in training mode, its base model) for the run config of ``overrides``."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from mtpeft.methods import build_method
    from mtpeft.models.loader import adapter_dtype, load_base_model
    from mtpeft.utils.resolvers import register_resolvers

    register_resolvers()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = compose(config_name="train", overrides=overrides)
    base, _ = load_base_model(cfg.model)
    options = OmegaConf.to_container(cfg.method, resolve=True)
    model = build_method(options.pop("name"), options, base, num_tasks=NUM_TASKS)
    model.upcast_trainable(adapter_dtype(cfg.model))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model.train(), base


def random_inputs(vocab_size: int, batch: int, length: int, seed: int = 0) -> tuple[Any, Any]:
    """(token ids ``[batch, length]`` avoiding the first 3 special ids, task ids ``[batch]``), seeded."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (batch, length), generator=gen)
    return ids, torch.randint(0, NUM_TASKS, (batch,), generator=gen)


def lm_loss(model: Any, ids: Any, task_ids: Any) -> Any:
    """Token-mean LM loss of ``model`` on ``ids`` (every position labelled), as training computes it
    (`mtpeft.module.chunked_losses`: no full logits)."""
    import torch

    from mtpeft.module import chunked_losses

    return chunked_losses(model, ids, torch.ones_like(ids), task_ids, ids, NUM_TASKS)[0]
