"""The methods: one module (or package) per method, each registering itself with `register_method`.

Every module or package in this folder is a method and nothing else: the framework they build on (the
`AdaptedModel` contract, the registry, injection, task-id scopes, low-rank layers, routing) lives in
`mtpeft.adapters`. The registry imports each module found on ``__path__``, so a new method is its file (or
folder) here plus its ``conf/method/<name>.yaml``. The names below are re-exported for convenience.
"""

from mtpeft.adapters.base import AdaptedModel, MethodConfig
from mtpeft.adapters.registry import (
    available_methods,
    build_method,
    get_method,
    load_adapter,
    method_options,
    parse_method_config,
    register_method,
)

__all__ = [
    "AdaptedModel",
    "MethodConfig",
    "available_methods",
    "build_method",
    "get_method",
    "load_adapter",
    "method_options",
    "parse_method_config",
    "register_method",
]
