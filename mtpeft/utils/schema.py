"""One typed config layer: pydantic models for every config node, errors that name the dotted key.

Every node a run reads (``method``, ``model``, ``data`` and its sources, ``evaluation``, run settings) is
declared once as a pydantic model or dataclass with ``CONFIG`` (unknown keys rejected) and the strict
scalar types below, then parsed with ``parse(cls, values, where, source)``. The types encode the rules the
YAML files need and nothing more:

* ``Int``/``PositiveInt``/``NonNegativeInt``: integers only, ``true``/``false`` and ``1.5`` rejected;
* ``Float`` (and the ranged variants): any number, an integer included (``lr: 1`` reads as 1.0),
  never a boolean;
* ``Bool``/``Str``: exactly ``true``/``false`` and strings (YAML's ``"yes"`` is not a boolean);
* ``Literal[...]`` for closed sets; lists become tuples where a field says ``tuple[...]``.

A failure raises ``ConfigError`` (a ValueError) whose message names every bad key by its full path
(``method.prompt.encoder.hidden``), the config file when one is given (``conf/method/peml.yaml``), and
for an unknown key the valid keys of its node (with a "did you mean"). OmegaConf containers are turned
into plain dicts and lists (interpolations resolved) before validation, so a Hydra node and a dict parse
alike.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StrictStr,
    TypeAdapter,
    ValidationError,
    create_model,
    validate_call,
)
from pydantic.dataclasses import dataclass as pydantic_dataclass

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

CONFIG = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)
"""Model config of every config node: unknown keys are errors, parsed configs are immutable, and the
attribute docstrings become the fields' descriptions."""

Bool = StrictBool
"""``true`` or ``false`` only."""
Str = StrictStr
"""A string only (a number is not silently turned into one)."""
Int = Annotated[int, Strict()]
"""An integer; booleans and floats are rejected."""
PositiveInt = Annotated[int, Strict(), Field(ge=1)]
"""An integer >= 1."""
NonNegativeInt = Annotated[int, Strict(), Field(ge=0)]
"""An integer >= 0."""
Float = Annotated[float, Strict()]
"""A number: an integer is accepted (and becomes a float), a boolean is not."""
PositiveFloat = Annotated[float, Strict(), Field(gt=0)]
"""A number > 0."""
NonNegativeFloat = Annotated[float, Strict(), Field(ge=0)]
"""A number >= 0."""
UnitFloat = Annotated[float, Strict(), Field(ge=0, le=1)]
"""A number in [0, 1] (a probability or a share)."""
Dropout = Annotated[float, Strict(), Field(ge=0, lt=1)]
"""A dropout probability in [0, 1)."""

METHOD_CONFIG = ConfigDict(extra="forbid", use_attribute_docstrings=True)
"""Model config of method configs: unknown keys are errors; the instances stay mutable dataclasses."""


def config_dataclass(cls: type[T] | None = None, *, frozen: bool = False) -> Any:
    """Class decorator for a config dataclass (a method's options, the model node): a pydantic dataclass
    (``METHOD_CONFIG``) whose annotations (the strict types above, ``Literal``, nested config dataclasses)
    are checked whenever it is built, from a YAML node through ``parse`` or directly in Python;
    ``__post_init__`` keeps the cross-field checks, raising ValueError with the fields' names (the key
    path is prefixed by the layer). ``@config_dataclass(frozen=True)`` for immutable ones."""
    if cls is None:
        return functools.partial(config_dataclass, frozen=frozen)
    return pydantic_dataclass(cls, config=METHOD_CONFIG, frozen=frozen)


class ConfigError(ValueError):
    """A config node does not parse; the message names each bad key by its dotted path and the fix."""


# -- parsing -------------------------------------------------------------------------------------
def parse(
    cls: type[T], values: Any, where: str, source: str | None = None, extra_keys: Iterable[str] = ()
) -> T:
    """Validate ``values`` (a mapping or an OmegaConf node) into ``cls``.

    ``where`` is the node's dotted key (``method``, ``data.sources.gsm8k``) that prefixes every error,
    ``source`` the config file the node comes from, ``extra_keys`` keys the caller handles itself (listed
    as valid in an unknown-key error of the top node).
    """
    if isinstance(cls, type) and isinstance(values, cls):
        return values
    plain = to_plain(values)
    if not isinstance(plain, Mapping):
        place = f" ({source})" if source else ""
        raise ConfigError(f"{where} must be a mapping of options{place}, got {plain!r}")
    try:
        return adapter(cls).validate_python(plain)
    except ValidationError as err:
        raise ConfigError(describe(err, cls, where, source, extra_keys)) from None


@functools.cache
def adapter(cls: Any) -> TypeAdapter[Any]:
    """The (cached) pydantic validator of a type."""
    return TypeAdapter(cls)


def to_plain(value: Any) -> Any:
    """OmegaConf containers and other mappings/sequences as plain dicts (str keys) and lists, resolved."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return [to_plain(v) for v in value]
    return value


def field_names(cls: Any) -> list[str]:
    """The keys a config class (pydantic model or dataclass) or a function accepts, in declaration order."""
    if hasattr(cls, "model_fields"):
        return list(cls.model_fields)
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls) if f.init]
    if inspect.isfunction(cls):
        return [p for p in inspect.signature(cls).parameters if p not in ("self", "cls")]
    return []


def checked_arguments(where: str) -> Callable[[F], F]:
    """Decorator: validate a function's arguments against its own annotations (``pydantic.validate_call``),
    the signature being the config's schema; failures raise ``ConfigError`` naming ``<where>.<argument>``.

    Used for constructors that Hydra instantiates from a node (``data`` -> ``MultiTaskDataModule``):
    OmegaConf containers among the arguments are made plain first, other objects pass through.
    """

    def decorate(fn: F) -> F:
        validated = validate_call(fn, config=ConfigDict(arbitrary_types_allowed=True))

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            args = tuple(_plain_omegaconf(a) for a in args)
            kwargs = {k: _plain_omegaconf(v) for k, v in kwargs.items()}
            try:
                return validated(*args, **kwargs)
            except ValidationError as err:
                raise ConfigError(describe(err, fn, where)) from None

        return wrapper  # type: ignore[return-value]

    return decorate


def arguments_model(*functions: Callable[..., Any], skip: Iterable[str] = ()) -> type[BaseModel]:
    """A model of the named parameters of ``functions`` (their annotations and defaults; the first
    function wins a name), without ``skip``: checks the arguments a config node will be called with
    before the call can happen (e.g. ``data`` before the tokenizer it needs exists)."""
    fields: dict[str, Any] = {}
    for fn in functions:
        fn = inspect.unwrap(fn)
        hints = typing.get_type_hints(fn, include_extras=True)
        for name, param in inspect.signature(fn).parameters.items():
            kind = param.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
            if kind or name in ("self", "cls") or name in skip or name in fields:
                continue
            default = ... if param.default is inspect.Parameter.empty else param.default
            fields[name] = (hints.get(name, Any), default)
    config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    return create_model(f"{functions[0].__qualname__}.arguments", __config__=config, **fields)


def _plain_omegaconf(value: Any) -> Any:
    """An OmegaConf container as plain containers; anything else unchanged."""
    from omegaconf import DictConfig, ListConfig

    return to_plain(value) if isinstance(value, DictConfig | ListConfig) else value


def defaults(cls: Any) -> dict[str, Any]:
    """Field -> default value (fields without a default left out)."""
    if hasattr(cls, "model_fields"):
        return {
            k: f.get_default(call_default_factory=True)
            for k, f in cls.model_fields.items()
            if not f.is_required()
        }
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


# -- messages ------------------------------------------------------------------------------------
def describe(
    err: ValidationError, cls: Any, where: str, source: str | None = None, extra_keys: Iterable[str] = ()
) -> str:
    """One message for all of ``err``'s problems: dotted keys, the file, valid keys or values."""
    problems = [_problem(e, cls, where, tuple(extra_keys)) for e in err.errors(include_url=False)]
    place = f" ({source})" if source else ""
    if len(problems) == 1:
        return problems[0] + place
    return f"{len(problems)} invalid settings{place}: " + "; ".join(problems)


def _problem(error: Mapping[str, Any], cls: Any, where: str, extra_keys: tuple[str, ...]) -> str:
    """One pydantic error as ``<dotted key>...: what is wrong and what is valid``."""
    segments, node = _walk(cls, error["loc"])
    path = dotted(where, segments)
    kind = error["type"]
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        parent_segments, parent = _walk(cls, error["loc"][:-1])
        valid = [*field_names(parent), *(extra_keys if not parent_segments else ())]
        key, node_path = str(segments[-1]) if segments else path, dotted(where, parent_segments)
        listed = ", ".join(sorted(valid)) or "none (it takes no options)"
        return (
            f"unknown key {path}: {key!r} is not an option of {node_path}{did_you_mean(key, valid)}; "
            f"valid keys: {listed}"
        )
    if kind in ("missing", "missing_argument", "missing_keyword_only_argument"):
        return f"{path} is required"
    if kind in ("union_tag_invalid", "union_tag_not_found"):  # a discriminated union (model.kind)
        ctx = error.get("ctx") or {}
        key = str(ctx.get("discriminator", "kind")).strip("'")
        tag = f"={ctx['tag']!r} is not valid" if "tag" in ctx else " is required"
        tags = [t for member in _union_members(node) or [] for t in _literal_values(member, key)]
        return f"{dotted(path, [key])}{tag}: use one of {', '.join(map(repr, tags))}"
    message = str(error["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    if kind in ("value_error", "assertion_error"):
        first = re.match(r"[A-Za-z_]\w*", message)
        if first and first.group() in field_names(node):  # a cross-field check naming its first field
            return f"{path}.{message}"
        return f"{path}: {message}"
    value = error.get("input")
    if isinstance(value, bool) and kind in ("int_type", "float_type"):
        message += " (true/false is not a number)"
    if "[key]" in error["loc"]:
        return f"{path}: the key is not valid: {message}"
    return f"{path}={value!r} is not valid: {message}"


def dotted(where: str, segments: Sequence[str | int]) -> str:
    """``where`` followed by the path segments: ``method.prompt.encoder.hidden``, ``data.sources[0].files[2]``."""
    out = where
    for item in segments:
        out += f"[{item}]" if isinstance(item, int) else (f".{item}" if out else str(item))
    return out


def did_you_mean(key: str, valid: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest valid key, or nothing."""
    close = difflib.get_close_matches(str(key), [str(v) for v in valid], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _walk(cls: Any, loc: Sequence[str | int]) -> tuple[list[str | int], Any]:
    """Follow a pydantic error location through the types: the user-visible path segments (union tags
    and ``[key]`` markers dropped) and the type found at its end."""
    node, segments = cls, []
    for item in loc:
        node = _unwrap(node)
        if item == "[key]":
            continue
        members = _union_members(node)
        if members is not None:  # a tagged union: the location names the member, not a key
            node = _member_for_tag(members, item)
            continue
        segments.append(item)
        node = _child(node, item)
    return segments, _unwrap(node)


def _unwrap(tp: Any) -> Any:
    """``Annotated[X, ...]`` -> X and ``X | None`` -> X."""
    while True:
        if typing.get_origin(tp) is Annotated:
            tp = typing.get_args(tp)[0]
            continue
        members = _union_args(tp)
        if members is not None:
            rest = [m for m in members if m is not type(None)]
            if len(rest) == 1:
                tp = rest[0]
                continue
        return tp


def _union_args(tp: Any) -> tuple[Any, ...] | None:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return None


def _union_members(tp: Any) -> list[Any] | None:
    members = _union_args(tp)
    if members is None:
        return None
    return [m for m in members if m is not type(None)]


def _member_for_tag(members: list[Any], tag: Any) -> Any:
    """The union member whose Literal-typed field has value ``tag`` (discriminated unions), else Any."""
    for member in members:
        if any(tag in _literal_values(member, name) for name in field_names(_unwrap(member))):
            return member
    return Any


def _literal_values(cls: Any, name: str) -> tuple[Any, ...]:
    """The values of ``cls``'s ``Literal``-typed field ``name`` (none if it is not one)."""
    hint = _unwrap(_hints(_unwrap(cls)).get(name))
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else ()


def _child(node: Any, item: str | int) -> Any:
    """The type one location step below ``node``."""
    if inspect.isfunction(node):
        return Any
    if isinstance(item, str) and field_names(node):
        return _hints(node).get(item, Any)
    origin, args = typing.get_origin(node), typing.get_args(node)
    if origin in (dict, Mapping, typing.Mapping) and len(args) == 2:
        return args[1]
    if origin in (list, tuple, Sequence) and args:
        return args[0]
    return Any


def _hints(cls: Any) -> dict[str, Any]:
    """Field name -> annotation (with ``Annotated`` extras) of a model or dataclass."""
    if hasattr(cls, "model_fields"):
        return {k: f.rebuild_annotation() for k, f in cls.model_fields.items()}
    try:
        return typing.get_type_hints(cls, include_extras=True)
    except (NameError, TypeError):
        return {}
