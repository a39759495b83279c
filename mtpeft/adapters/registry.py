"""Method registry: one name -> one `AdaptedModel` subclass, registered once.

A method module calls ``@register_method("name")`` on its class; ``build_method`` validates the
user's config (unknown keys, wrong types) against the method's config dataclass and wraps a base model,
and `load_adapter` rebuilds a saved adapter. The registry finds the methods itself: every module or
package on ``mtpeft.methods.__path__`` is a method (a directory appended to that path is searched too), so
adding a method needs no edit here. Nothing outside a method's own file ever branches on a method name.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf
from pydantic.dataclasses import is_pydantic_dataclass

from mtpeft.adapters.base import AdaptedModel, MethodConfig, read_adapter_meta
from mtpeft.utils.registry import Registry
from mtpeft.utils.schema import parse

if TYPE_CHECKING:
    import torch
    from torch import nn

METHOD_PACKAGE = "mtpeft.methods"
"""The package whose modules (on its ``__path__``) are the methods; imported by name, so the framework in
`mtpeft.adapters` never imports a method module statically."""


def _import_builtin_methods() -> None:
    """Import every module and package on ``mtpeft.methods.__path__`` so that the methods register themselves.

    The path is read at each call, so a directory appended to it later (a plug-in, a test's temp
    method) is found too; modules already imported are not re-run.
    """
    package = importlib.import_module(METHOD_PACKAGE)
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{METHOD_PACKAGE}.{info.name}")


METHODS: Registry[type[AdaptedModel]] = Registry("method", discover=_import_builtin_methods)
"""Method name -> `AdaptedModel` subclass; looking a name up first imports the method modules."""


def register_method(name: str) -> Callable[[type[AdaptedModel]], type[AdaptedModel]]:
    """Class decorator registering an `AdaptedModel` subclass under ``name``."""

    def decorate(cls: type[AdaptedModel]) -> type[AdaptedModel]:
        if not name.isidentifier():
            raise ValueError(f"method name {name!r} must be a Python identifier")
        if not is_pydantic_dataclass(getattr(cls, "config_class", None)):
            raise TypeError(
                f"{cls.__qualname__}.config_class must be a @config_dataclass (mtpeft.utils.schema), so that "
                "its options are validated"
            )
        METHODS.register(name, cls)
        cls.method_name = name
        return cls

    return decorate


def available_methods() -> list[str]:
    """Names of all registered methods, sorted."""
    return METHODS.names()


def get_method(name: str) -> type[AdaptedModel]:
    """The class registered under ``name``; an unknown name raises `UnknownNameError` listing the valid ones."""
    return METHODS.get(name)


def parse_method_config(name: str, values: Mapping[str, Any]) -> MethodConfig:
    """Build the typed config of method ``name`` from a mapping or a Hydra node.

    The method's ``@config_dataclass`` is the schema (`mtpeft.utils.schema`): unknown keys, wrong types
    and out-of-range values are `ConfigError` (a ValueError) naming the dotted key
    (``method.prompt.encoder.hidden``), ``conf/method/<name>.yaml`` and the valid keys or values; the
    config's ``__post_init__`` adds the cross-field checks.
    """
    return parse(get_method(name).config_class, values, "method", f"conf/method/{name}.yaml")


def method_options(cfg: Any) -> tuple[str, dict[str, Any]]:
    """Split a run config's ``method`` node into the registry name and the options of its config dataclass
    (interpolations resolved); a node without ``name`` is an error naming the fix."""
    options = OmegaConf.to_container(cfg.method, resolve=True)
    if "name" not in options:
        raise ValueError(
            "the method config needs a 'name' key naming a registered method (conf/method/*.yaml)"
        )
    return options.pop("name"), options


def build_method(name: str, values: Mapping[str, Any], base_model: nn.Module, num_tasks: int) -> AdaptedModel:
    """Wrap ``base_model`` (frozen) with method ``name`` configured by ``values``."""
    config = parse_method_config(name, values)
    return get_method(name)(base_model, config, num_tasks=num_tasks)


def load_adapter(
    directory: str | Path, base_model: nn.Module, adapter_dtype: torch.dtype | None = None
) -> AdaptedModel:
    """Rebuild the adapted model saved by `AdaptedModel.save_adapter` on top of ``base_model``.

    Reads ``mtpeft_adapter.json``; directories of earlier mtpeft versions (meta in ``adapter_config.json``,
    weights under mtpeft's parameter names) load too. ``adapter_dtype`` stores the adapter parameters in
    that dtype before the weights are read, as the training run did (``model.adapter_dtype``; fp32 adapters
    on a bf16 base), so they are not rounded to the base's dtype on the way.
    """
    directory = Path(directory)
    meta, legacy = read_adapter_meta(directory)
    model = build_method(meta["method"], meta["config"], base_model, num_tasks=meta["num_tasks"])
    if adapter_dtype is not None:
        model.upcast_trainable(adapter_dtype)
    if legacy:
        AdaptedModel.load_adapter_weights(model, directory)
    else:
        model.load_adapter_weights(directory)
    return model
