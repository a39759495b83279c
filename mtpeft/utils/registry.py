"""A named registry: register once, look up by name with an error that lists the valid names."""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> object, filled at import time by the modules that define the objects (never at run time)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        """What is registered, for messages (``task``, ``data format``)."""
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        """Add ``item`` under ``name``; registering a name twice is an error."""
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered; choose another name")
        self._items[name] = item
        return item

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def get(self, name: str) -> T:
        """The item registered as ``name``; an unknown name raises ValueError listing the registered ones."""
        if name not in self._items:
            raise ValueError(
                f"unknown {self.kind} {name!r}; registered {self.kind}s: {', '.join(self.names())}"
            )
        return self._items[name]
