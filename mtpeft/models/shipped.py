"""Tiny base models shipped with mtpeft, so that every machine trains on the same weights.

The tiny model is pre-trained locally (`mtpeft.models.pretrain`), deterministically on one machine, but CPUs
with other kernels build other weights from the same command (base digests ``abb6a736``, ``4316e7db`` and
``95fef731`` on three VMs). A job's identity includes its base (`mtpeft.models.identity`), so without a shared
base a study started on one machine could not be finished on another. ``shipped_bases/`` holds complete cache
entries (``<name>-<key hash>/``: weights, config, tokenizer, ``manifest.json``) of the default tiny models;
when a run needs the cache entry of the same name and key, `mtpeft.models.loader.tiny_entry` copies the
shipped one into the cache instead of pre-training. Any other configuration is pre-trained as before.

Re-ship after a change of the default tiny config or of the build code (``CODE_VERSION``), which change the
entry's key (``tests/test_shipped.py`` fails while no shipped entry has the default key): build it into an
empty cache and replace the shipped entry with it::

    export MTPEFT_CACHE_DIR=$(mktemp -d)
    python -m mtpeft.train method=none train=false test=false    # pre-trains the default base (~6 min)
    rm -r mtpeft/models/shipped_bases/* && cp -r $MTPEFT_CACHE_DIR/tiny-llama-* mtpeft/models/shipped_bases/

A new shipped base is a new base: every job on it gets a new identity, and published studies made on the old
one are not extended on it (`mtpeft.study.publish.check_published_bases` says so).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from mtpeft.models.cache import MANIFEST, read_manifest

SHIPPED_DIR = Path(__file__).resolve().parent / "shipped_bases"
#: Manifest fields that belong to one build of an entry, not to its contents.
BUILD_FIELDS = ("key", "build_id", "built_at")


def shipped_entry(entry_name: str) -> Path | None:
    """The shipped cache entry named ``entry_name`` (``tiny-llama-<key hash>``), or None if none is shipped."""
    path = SHIPPED_DIR / entry_name
    return path if path.is_dir() else None


def copy_shipped(source: Path, destination: Path) -> dict[str, Any]:
    """Copy a shipped entry's files (all but its manifest) into the empty build directory ``destination``;
    return its build metadata (pre-training losses, wall time) with ``shipped_build_id`` naming the build."""
    manifest = read_manifest(source)
    if manifest is None:
        raise RuntimeError(
            f"the shipped base {source} is incomplete or corrupt (its files do not match {MANIFEST}); "
            "reinstall mtpeft"
        )
    for path in source.iterdir():
        if path.name != MANIFEST:
            shutil.copy2(path, destination / path.name)
    meta = {k: v for k, v in manifest["meta"].items() if k not in BUILD_FIELDS}
    return {**meta, "shipped_build_id": manifest["meta"].get("build_id")}
