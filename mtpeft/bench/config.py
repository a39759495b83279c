"""Run configs for the benchmarks: ``conf/train.yaml`` composed with overrides, as ``python -m mtpeft.train``.

The benchmarks build what a real run builds from the same composed config (base model of ``model=``,
datamodule of ``data=``, method of ``method=``, optimiser, scheduler, trainer, callbacks, loggers), so
``model=<any model config>`` measures that model. Outputs go to a temporary directory.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from mtpeft.methods import AdaptedModel, build_method
from mtpeft.models.loader import adapter_dtype, load_base_model
from mtpeft.run import method_options
from mtpeft.utils.resolvers import register_resolvers

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def compose_run(overrides: Sequence[str], output_dir: str | Path, config_name: str = "train") -> DictConfig:
    """``conf/<config_name>.yaml`` (``train``, or ``eval``) composed with ``overrides`` (Hydra syntax), as its
    entry point would, to write under ``output_dir``."""
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(
            config_name=config_name,
            return_hydra_config=True,
            overrides=[*overrides, f"hydra.run.dir={output_dir}", f"paths.log_dir={output_dir}/logs"],
        )
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        del cfg.hydra
    GlobalHydra.instance().clear()
    return cfg


@dataclass
class RunParts:
    """What a run builds before training: the config, the base model, its tokenizer and the datamodule.

    The base model and the datamodule are kept pristine; `fresh_method` and `fresh_datamodule` hand out
    copies, so every timed loop starts from the same state.
    """

    cfg: DictConfig
    base_model: Any
    tokenizer: Any
    datamodule: Any

    @classmethod
    def build(cls, cfg: DictConfig) -> RunParts:
        base_model, tokenizer = load_base_model(cfg.model)
        datamodule = instantiate(
            cfg.data, tokenizer=tokenizer, chat_template=bool(cfg.model.get("chat_template"))
        )
        datamodule.setup("fit")
        return cls(cfg, base_model, tokenizer, datamodule)

    @property
    def num_tasks(self) -> int:
        return len(self.datamodule.task_names)

    def fresh_method(self, cfg: DictConfig | None = None) -> AdaptedModel:
        """The method of ``cfg`` (default: the run's) on a copy of the base model, as ``mtpeft.run`` builds it
        (with gradient checkpointing when the config asks for it, as `mtpeft.module.MultiTaskModule` does)."""
        cfg = self.cfg if cfg is None else cfg
        name, options = method_options(cfg)
        model = build_method(name, options, copy.deepcopy(self.base_model), num_tasks=self.num_tasks)
        model.upcast_trainable(adapter_dtype(cfg.model))
        if cfg.get("gradient_checkpointing"):
            model.gradient_checkpointing_enable()
        return model.train()

    def fresh_datamodule(self) -> Any:
        """A copy of the set-up datamodule whose training sampler starts from the beginning."""
        return copy.deepcopy(self.datamodule)

    def train_batches(self, count: int) -> list[dict[str, Any]]:
        """The first ``count`` training batches of a fresh datamodule (what every loop trains on)."""
        batches = []
        for batch in self.fresh_datamodule().train_dataloader():
            if len(batches) == count:
                break
            batches.append(batch)
        return batches
