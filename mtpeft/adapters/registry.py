"""Method registry: one name -> one `AdaptedModel` subclass, registered once.

A method module calls ``@register_method("name")`` on its class; ``build_method`` validates the
user's config (unknown keys, wrong types) against the method's config dataclass and wraps a base model,
and `load_adapter` rebuilds a saved adapter. The registry finds the methods itself: every module or
package on ``mtpeft.methods.__path__`` is a method (a directory appended to that path is searched too), so
adding a method needs no edit here. Nothing outside a method's own file ever branches on a method name.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtpeft.adapters.base import AdaptedModel, MethodConfig, read_adapter_meta
from mtpeft.utils.registry import Registry

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
        if not dataclasses.is_dataclass(getattr(cls, "config_class", None)):
            raise TypeError(f"{cls.__qualname__}.config_class must be a dataclass")
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
    """Build the typed config of method ``name`` from a plain mapping (e.g. a Hydra node).

    Unknown keys and values of the wrong type are errors that name the key and the valid keys; each
    config's ``__post_init__`` then checks ranges and cross-field constraints.
    """
    return parse_dataclass(get_method(name).config_class, values, "method", f"conf/method/{name}.yaml")


def parse_dataclass(cls: type, values: Any, where: str, source: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping; nested dataclass fields are parsed recursively.

    Errors name the dotted key (``method.prompt.encoder.hidden``) and list the valid keys.
    """
    if isinstance(values, cls):
        return values
    if not isinstance(values, Mapping):
        raise TypeError(f"{where} must be a mapping of options, got {values!r}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        place = f" ({source})" if source else ""
        raise ValueError(
            f"unknown key(s) {unknown} in {where}{place}; valid keys: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {key: _coerce(value, hints[key], f"{where}.{key}") for key, value in values.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        message = str(err)
        if where == "method" or not message.startswith("method.") or message.startswith(where):
            raise
        # a reused top-level config (e.g. LoraMethodConfig nested as method.lora) names "method.<key>"
        raise type(err)(where + message[len("method") :]) from err


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


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against a simple type hint (int/float/bool/str/list/Literal/Optional)."""
    if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
        return parse_dataclass(hint, value, where)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"{where}={value!r} is not valid; choose one of {list(args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except (TypeError, ValueError) as err:
                errors.append(str(err))
        raise TypeError(f"{where}={value!r} matches none of {hint}: {'; '.join(errors)}")
    if origin in (list, tuple) or hint in (list, tuple):
        if isinstance(value, str) or not hasattr(value, "__iter__"):
            raise TypeError(f"{where} must be a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or hint is tuple) else items
    if hint is bool:
        if not isinstance(value, bool):
            raise TypeError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{where} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise TypeError(f"{where} must be a string, got {value!r}")
        return value
    return value
