"""Write a directory whole or not at all: build it in a temporary sibling, then put it in place.

An export killed half-way must not leave a directory that loads as something else, and writing into an
existing one must not mix old files with new ones (a LoRA ``adapter_config.json`` beside another method's
weights loads, with a warning, as the plain base model). `staged_dir` gives both.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_dir(destination: str | Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``destination`` to write into; when the block ends without an
    error it replaces ``destination`` (whatever was there before is removed), otherwise it is deleted."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = destination.with_name(f".{destination.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if destination.is_dir() and not destination.is_symlink():
        shutil.rmtree(destination)
    elif destination.exists() or destination.is_symlink():
        destination.unlink()
    staging.rename(destination)
