"""Derived seeds: one independent, reproducible integer seed per (seed, purpose...) tuple.

Python's ``hash`` of a string changes between processes, so seeds are derived from a SHA-256 of the
parts instead; the same parts give the same seed on every machine and run.
"""

from __future__ import annotations

import hashlib


def derive_seed(*parts: object) -> int:
    """A 63-bit seed determined only by ``parts`` (e.g. ``derive_seed(0, "qa", "val", 1)``)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
