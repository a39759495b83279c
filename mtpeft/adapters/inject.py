"""Find the modules a method adapts (by name pattern) and swap them for wrappers."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from torch import nn


def find_modules(model: nn.Module, patterns: Sequence[str], kind: type[nn.Module] = nn.Linear) -> list[str]:
    """Names of modules of type ``kind`` whose last name component (or full name) matches a pattern.

    A pattern is a regular expression matched in full against the module's last name component
    (``q_proj``) or its full dotted name (``model.layers.0.self_attn.q_proj``), so ``gate`` never
    matches ``gate_proj`` by accident. No match at all is an error listing the candidates.
    """
    compiled = [re.compile(p) for p in patterns]
    names = []
    candidates = set()
    for name, module in model.named_modules():
        if not isinstance(module, kind) or name.endswith("lm_head"):
            continue
        leaf = name.rsplit(".", 1)[-1]
        candidates.add(leaf)
        if any(c.fullmatch(leaf) or c.fullmatch(name) for c in compiled):
            names.append(name)
    if not names:
        raise ValueError(
            f"target patterns {list(patterns)} match no {kind.__name__} module; "
            f"available names: {', '.join(sorted(candidates))}"
        )
    return names


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at dotted path ``name`` inside ``model``."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


def wrap_modules(
    model: nn.Module, patterns: Sequence[str], wrap: Callable[[str, nn.Linear], nn.Module]
) -> dict[str, nn.Module]:
    """Replace every linear matching ``patterns`` with ``wrap(name, linear)``; return the new modules."""
    wrapped = {}
    for name in find_modules(model, patterns):
        new = wrap(name, model.get_submodule(name))
        replace_module(model, name, new)
        wrapped[name] = new
    return wrapped
