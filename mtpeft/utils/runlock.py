"""Exclusive use of a run directory: one live run per directory, enforced by the kernel.

A run takes ``flock(LOCK_EX | LOCK_NB)`` on ``<run dir>/.run.lock`` and writes its pid, host and start time
into the file. A second run in the same directory (two launches with the same ``hydra.run.dir``, two sweeps
with the same ``hydra.sweep.dir``) fails at once with `RunDirBusy`, naming the directory and the holder, so
it never overwrites the first one's ``results.json``, ``.hydra/config.yaml``, logs or checkpoints. The
kernel drops the lock when the holding process dies (even by SIGKILL), so the lock of a killed run is stale
by construction and the next run simply takes it over; the leftover pid in the file is only information.

Locks are re-entrant within a process (the Hydra callback, the entry point and `mtpeft.run.run` may all
ask for the same directory) and released when the outermost holder exits. On a file system without
``flock`` support the run goes on unlocked after a warning that says so.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)
LOCK_FILE = ".run.lock"

_HELD: dict[Path, tuple[int, int]] = {}
"""Directories this process holds: resolved path -> (file descriptor, nesting depth)."""


class RunDirBusy(RuntimeError):
    """Another live process holds the run directory."""


def holder_info(directory: Path) -> dict[str, Any]:
    """What the lock file says about its (last) holder: pid, host, started; empty if unreadable."""
    try:
        data = json.loads((Path(directory) / LOCK_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def is_locked(directory: str | Path) -> bool:
    """Whether a live process (this one included) holds ``directory``'s lock right now."""
    directory = Path(directory).resolve()
    if directory in _HELD:
        return True
    path = directory / LOCK_FILE
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        return err.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
    finally:
        os.close(fd)  # closing drops a lock taken just for the test
    return False


PROBE_RETRIES = 10
"""Tries to take a lock before calling it busy, 20 ms apart: `is_locked` (``--status``, a stopping study, a
study runner counting a sweep's ended jobs every few seconds) takes a free lock for an instant to test it,
which must not look like a live holder."""


def _flock_soon(fd: int) -> None:
    """``flock(LOCK_EX | LOCK_NB)``, retried briefly while it is busy (see `PROBE_RETRIES`)."""
    for attempt in range(PROBE_RETRIES):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN) or attempt == PROBE_RETRIES - 1:
                raise
            time.sleep(0.02)


class RunDirLock:
    """``with RunDirLock(run_dir):`` hold the directory exclusively (re-entrant within a process)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, or raise `RunDirBusy` naming the directory and the live holder's pid."""
        self.directory.mkdir(parents=True, exist_ok=True)
        key = self.directory.resolve()
        if key in _HELD:
            fd, depth = _HELD[key]
            _HELD[key] = (fd, depth + 1)
            return
        fd = os.open(key / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _flock_soon(fd)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                log.warning("cannot lock %s (%s): this file system has no flock; running unlocked", key, err)
                _HELD[key] = (fd, 1)
                return
            os.close(fd)
            raise RunDirBusy(_busy_message(key)) from None
        _write_holder(fd)
        _HELD[key] = (fd, 1)

    def release(self) -> None:
        """Drop one level of the lock; the outermost release unlocks the directory."""
        key = self.directory.resolve()
        if key not in _HELD:
            return
        fd, depth = _HELD[key]
        if depth > 1:
            _HELD[key] = (fd, depth - 1)
            return
        del _HELD[key]
        os.close(fd)  # closing the descriptor drops the flock


def _write_holder(fd: int) -> None:
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)


def _busy_message(directory: Path) -> str:
    info = holder_info(directory)
    holder = f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {info.get('started', '?')}"
    return (
        f"run directory {directory} is in use by another live run ({holder}); two runs in one directory "
        "would overwrite each other's results.json, config and checkpoints. Wait for it to finish, or "
        "give this run its own directory (drop the hydra.run.dir / hydra.sweep.dir override)."
    )
