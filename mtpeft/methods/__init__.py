"""Method registry and the adapted-model contract (see `base.py`); one file per method."""

from mtpeft.methods.base import AdaptedModel, MethodConfig, load_adapter
from mtpeft.methods.registry import (
    available_methods,
    build_method,
    get_method,
    parse_dataclass,
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
    "parse_dataclass",
    "parse_method_config",
    "register_method",
]
