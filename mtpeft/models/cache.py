"""Content-addressed, process-safe build cache for locally built artefacts (tokenizers, tiny models).

An entry is a directory ``<root>/<name>-<hash>`` where the hash covers everything the artefact depends on
(configs, corpus fingerprint, ``CODE_VERSION``). Why this shape:

* **atomic**: an entry is built in a temporary directory inside the root and renamed into place, so a
  reader never sees a half-written entry (rename is atomic on one filesystem);
* **one builder**: an ``fcntl.flock`` on ``<entry>.lock`` makes a concurrent run wait for the builder and
  then load its result instead of building (pre-training) a second time;
* **resumable**: the build directory lives in ``<root>/.partial-<entry>/``, a name stable across processes;
  ``resume_dir`` next to it survives a failed or interrupted build (pre-training keeps its checkpoints
  there) and the whole ``.partial-`` directory is removed once the entry is published;
* **self-checking**: the last file written is ``manifest.json`` with the size and sha256 of every file; an
  entry whose manifest is missing or does not match (crash, disk full, manual edits) is rebuilt.

Root: explicit ``cache_dir`` argument > ``$MTPEFT_CACHE_DIR`` > ``platformdirs.user_cache_dir("mtpeft")``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import platformdirs

log = logging.getLogger(__name__)

#: Bump when a change in mtpeft's build code changes what a cached artefact contains.
CODE_VERSION = 1
CACHE_ENV = "MTPEFT_CACHE_DIR"
MANIFEST = "manifest.json"


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Resolve the cache root (argument > ``$MTPEFT_CACHE_DIR`` > user cache dir) and create it."""
    root = check_cache_dir(cache_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(
            f"cannot create the mtpeft cache directory {root} ({err.strerror}); {_setting(cache_dir)}"
        ) from err
    return root


def check_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache root ``cache_root`` would use, checked without creating anything.

    A path that exists but is not a directory (``MTPEFT_CACHE_DIR`` set to a file) is an error naming the
    setting it came from, so that it fails before a model is loaded rather than deep inside a build.
    """
    chosen = cache_dir or os.environ.get(CACHE_ENV) or platformdirs.user_cache_dir("mtpeft")
    root = Path(chosen).expanduser()
    existing = next((p for p in (root, *root.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        what = "is a file" if existing == root else f"lies under {existing}, which is a file"
        raise NotADirectoryError(f"the mtpeft cache directory {root} {what}; {_setting(cache_dir)}")
    return root


def _setting(cache_dir: str | os.PathLike[str] | None) -> str:
    """Which setting chose the cache root, and how to change it (for error messages)."""
    env = os.environ.get(CACHE_ENV)
    if cache_dir and (not env or str(cache_dir) != env):
        return "it is the cache dir argument (model.cache_dir): point it to a directory"
    if cache_dir or env:
        return (
            f"it comes from the cache dir setting ${CACHE_ENV}={env!r}: point it to a directory or unset it"
        )
    return f"it is the default user cache dir: set ${CACHE_ENV} to a writable directory"


def key_hash(parts: Mapping[str, Any], length: int = 12) -> str:
    """Short, stable hash of JSON-serialisable ``parts`` (key order does not matter)."""
    payload = json.dumps({"code_version": CODE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:length]


def fingerprint(texts: list[str]) -> str:
    """sha256 of a list of texts (line boundaries included), to key artefacts on corpus content."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _now() -> str:
    """Current UTC time, ISO 8601 (build provenance in the manifest)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def _file_digest(path: Path) -> str:
    """sha256 of one file."""
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def write_manifest(entry: Path, meta: Mapping[str, Any]) -> None:
    """Record size and sha256 of every file of ``entry`` plus ``meta``; written last, it marks completeness."""
    files = {
        str(p.relative_to(entry)): {"size": p.stat().st_size, "sha256": _file_digest(p)}
        for p in sorted(entry.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    (entry / MANIFEST).write_text(json.dumps({"meta": dict(meta), "files": files}, indent=2, default=str))


def read_manifest(entry: Path) -> dict[str, Any] | None:
    """Return the manifest of a complete, intact entry, or ``None`` if it is missing, partial or corrupt."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        files = manifest["files"]
        for rel, info in files.items():
            path = entry / rel
            if path.stat().st_size != info["size"] or _file_digest(path) != info["sha256"]:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest if files else None


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (blocks while another process holds it)."""
    with lock_path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _discard(path: Path) -> None:
    """Remove a broken entry by renaming it aside first (so the final name is free at once)."""
    if not path.exists():
        return
    trash = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".trash-{path.name}-"))
    os.replace(path, trash / "entry")
    shutil.rmtree(trash, ignore_errors=True)


def _publish(tmp: Path, entry: Path) -> None:
    """Rename ``tmp`` to ``entry``; if a valid entry appeared meanwhile, keep it and drop ours."""
    try:
        os.replace(tmp, entry)
    except OSError:
        if read_manifest(entry) is None:
            raise
        log.info("cache entry %s appeared while building; using it", entry.name)
        shutil.rmtree(tmp, ignore_errors=True)


def resume_dir(build_dir: Path) -> Path:
    """Directory for state that should outlive an interrupted build into ``build_dir`` (from ``get_or_build``).

    It is kept when a build fails, found again by the next build of the same entry (in any process), and
    removed with the build directory once the entry is published.
    """
    return build_dir.parent / "resume"


def get_or_build(
    name: str,
    parts: Mapping[str, Any],
    build: Callable[[Path], Mapping[str, Any]],
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Return ``(entry_dir, meta)`` for the artefact keyed by ``parts``, building it if needed.

    Args:
        name: readable prefix of the entry directory (e.g. ``"tiny-llama"``).
        parts: everything the artefact depends on (JSON-serialisable); hashed with ``CODE_VERSION``.
        build: writes the artefact into the empty directory it is given and returns metadata (stored in the
            manifest, e.g. pre-training losses and wall time); may keep resumable state in
            ``resume_dir(directory)``.
        cache_dir: cache root override (see ``cache_root``).
    """
    root = cache_root(cache_dir)
    entry = root / f"{name}-{key_hash(parts)}"
    manifest = read_manifest(entry)
    if manifest is not None:
        return entry, manifest["meta"]
    with _locked(root / f"{entry.name}.lock"):
        manifest = read_manifest(entry)  # another process may have built it while we waited
        if manifest is not None:
            return entry, manifest["meta"]
        if entry.exists():
            log.warning("cache entry %s is incomplete or corrupt; rebuilding it", entry)
            _discard(entry)
        partial = root / f".partial-{entry.name}"  # stable name: a later build resumes from resume_dir
        tmp = partial / "build"
        if tmp.exists():
            shutil.rmtree(tmp)  # outputs of a failed attempt; resume_dir is kept
        tmp.mkdir(parents=True)
        try:
            meta = {"key": dict(parts), "build_id": uuid.uuid4().hex, "built_at": _now(), **build(tmp)}
            write_manifest(tmp, meta)
            _publish(tmp, entry)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(partial, ignore_errors=True)
    manifest = read_manifest(entry)
    if manifest is None:
        raise RuntimeError(f"cache entry {entry} is invalid right after building it; check the disk.")
    return entry, manifest["meta"]
