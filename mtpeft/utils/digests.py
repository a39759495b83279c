"""SHA-256 of files, computed once per process: the digests that identify a job's inputs (data files, the
base model's weight files) are taken on every job start, of files that rarely change."""

from __future__ import annotations

import hashlib
from pathlib import Path

_FILE_DIGESTS: dict[tuple[str, int, int, int], str] = {}


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, cached by (path, size, mtime, inode): an edited file is hashed again."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if key not in _FILE_DIGESTS:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        _FILE_DIGESTS[key] = digest.hexdigest()
    return _FILE_DIGESTS[key]


def clear_digest_cache() -> None:
    """Forget cached file digests (tests; a long-lived process that wants to re-read everything)."""
    _FILE_DIGESTS.clear()
