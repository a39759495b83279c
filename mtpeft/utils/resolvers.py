"""OmegaConf resolvers used by conf/ (registered once, on import of the entry points)."""

from __future__ import annotations

import secrets

from omegaconf import OmegaConf


def register_resolvers() -> None:
    """Register ``mtpeft_uid`` (short random suffix) and ``mtpeft_run_name`` (fallback for empty names)."""
    if not OmegaConf.has_resolver("mtpeft_uid"):
        OmegaConf.register_new_resolver("mtpeft_uid", lambda: secrets.token_hex(3), use_cache=True)
    if not OmegaConf.has_resolver("mtpeft_run_name"):
        OmegaConf.register_new_resolver("mtpeft_run_name", lambda overrides="": overrides or "defaults")
