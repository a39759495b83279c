"""A named registry: register once, look up by name with an error that lists the valid names.

One class serves every kind of name mtpeft resolves from a config: methods (`mtpeft.adapters.registry`),
tasks (`mtpeft.data.tasks`), data formats (`mtpeft.data.sources.formats`) and metrics (`mtpeft.metrics`).
An unknown name always raises `UnknownNameError`, whose message names the kind, the name asked for and
every valid name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError, ValueError):
    """A name no registry entry has; the message lists the valid names.

    A `KeyError` (a failed lookup) and a `ValueError` (a bad value in a config), so callers that catch
    either keep working. ``str()`` is the plain message (a bare `KeyError` would print it in quotes).
    """

    def __init__(self, kind: str, name: object, valid: Iterable[str]) -> None:
        self.kind = kind
        self.name = name
        self.valid = list(valid)
        super().__init__(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(self.valid) or '(none)'}")

    def __str__(self) -> str:
        return str(self.args[0])


class Registry(Generic[T]):
    """Name -> object, filled at import time by the modules that define the objects (never at run time).

    ``discover`` (optional) is called before every lookup; it imports the modules that register
    themselves (the methods), so a registry never has to name them. ``hints`` are names shown in the
    unknown-name message that the caller resolves itself (patterns such as ``pass@<k>``).
    """

    def __init__(
        self, kind: str, *, discover: Callable[[], None] | None = None, hints: Iterable[str] = ()
    ) -> None:
        self.kind = kind
        """What is registered, for messages (``method``, ``task``, ``data format``, ``metric``)."""
        self._discover = discover
        self._hints = tuple(hints)
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        """Add ``item`` under ``name``; the same item again is a no-op, another item under a taken name an
        error."""
        existing = self._items.get(name, item)
        if existing is not item:
            owner = f" by {existing.__qualname__}" if hasattr(existing, "__qualname__") else ""
            raise ValueError(f"{self.kind} {name!r} is already registered{owner}; choose another name")
        self._items[name] = item
        return item

    def names(self) -> list[str]:
        """Registered names, sorted."""
        self._load()
        return sorted(self._items)

    def valid_names(self) -> list[str]:
        """Registered names plus the hints (patterns the caller resolves), sorted: what an error lists."""
        return sorted([*self.names(), *self._hints])

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items

    def get(self, name: str) -> T:
        """The item registered as ``name``; an unknown name raises `UnknownNameError` listing the valid ones."""
        self._load()
        if name not in self._items:
            raise self.unknown(name)
        return self._items[name]

    def unknown(self, name: object) -> UnknownNameError:
        """The error for ``name``, for callers that resolve some names themselves before giving up."""
        return UnknownNameError(self.kind, name, self.valid_names())

    def _load(self) -> None:
        if self._discover is not None:
            self._discover()
