"""Which checkpoint a run resumes from (``resume=...``), and moving an interrupted run's checkpoints over.

``resume`` values:

- ``null`` (default): ``auto`` inside ``--multirun`` sweeps, off for single runs;
- ``false``: never resume (train from scratch);
- ``auto``: this run directory's ``checkpoints/last.ckpt`` if it exists (a killed run started again with
  ``hydra.run.dir=<its directory>``); otherwise the newest *interrupted* run of the same job under
  ``<paths.log_dir>/<task_name>/`` (``status: running``, same job hash, no live process holding its
  directory): its checkpoints are copied into this run's directory (paths inside them rewritten) and it is
  marked superseded; an interrupted run without a checkpoint is marked superseded and redone from scratch.
  Nothing to resume: train from scratch;
- a path: that checkpoint file, or a run directory (its ``checkpoints/last.ckpt``).

A checkpoint found by ``auto`` must carry this job's hash (`mtpeft.utils.callbacks.ResumeState` stores it);
an explicit path of another job is used after a warning (you asked for it).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from mtpeft.utils.runlock import RunDirBusy, RunDirLock
from mtpeft.utils.sweep import find_interrupted, mark_superseded

log = logging.getLogger(__name__)
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
STATE_KEY = "mtpeft"
"""Checkpoint key of `mtpeft.utils.callbacks.ResumeState` (job hash, RNG states, module progress)."""


def resume_mode(value: Any, multirun: bool) -> str | None:
    """``"auto"``, a path, or None (do not resume) from the ``resume`` setting."""
    if value is None:
        return "auto" if multirun else None
    if value is False or (isinstance(value, str) and value.lower() in ("false", "never", "none", "")):
        return None
    if isinstance(value, str):
        return value
    raise ValueError(
        f"resume={value!r}: expected null (auto in sweeps), false, auto, or the path of a checkpoint or "
        "run directory"
    )


def load_checkpoint(path: Path, mmap: bool = False) -> dict[str, Any]:
    """A checkpoint as a dict (Lightning checkpoints hold plain Python objects besides tensors).

    ``mmap=True`` maps the tensors instead of reading them: a caller that wants only the small header (the
    step, the job hash) reads a few KB of a multi-GB checkpoint."""
    return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)


def checkpoint_job(path: Path) -> str | None:
    """The job hash stored in a checkpoint, or None (not written by mtpeft, or unreadable)."""
    try:
        return (load_checkpoint(path).get(STATE_KEY) or {}).get("job_hash")
    except Exception as err:  # noqa: BLE001 - a checkpoint cut short by a kill is simply not usable
        log.warning("cannot read checkpoint %s: %s", path, err)
        return None


def find_resume_checkpoint(
    value: Any, output_dir: Path, log_root: Path, job: str, multirun: bool
) -> Path | None:
    """The checkpoint this run resumes from (see the module docstring), or None to start fresh."""
    mode = resume_mode(value, multirun)
    if mode is None:
        return None
    output_dir = Path(output_dir)
    if mode != "auto":
        return adopt(_explicit(Path(mode).expanduser(), job), output_dir)
    own = output_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
    if own.is_file():
        stored = checkpoint_job(own)
        if stored != job:
            why = (
                f"belongs to another job (hash {stored}, this run {job}): the config, data or code changed "
                "since it was written"
                if stored
                else "cannot be read, or was not written by mtpeft"
            )
            raise ValueError(
                f"resume=auto: {own} {why}. Use a new run directory, or resume=<path> to use it anyway."
            )
        log.info("resuming from %s", own)
        return adopt(own, output_dir)
    return _take_over(log_root, output_dir, job)


def _explicit(path: Path, job: str) -> Path:
    if path.is_dir():
        path = path / CHECKPOINT_DIR / LAST_CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(
            f"resume={path}: no such checkpoint; give a .ckpt file or a run directory with "
            f"{CHECKPOINT_DIR}/{LAST_CHECKPOINT} (checkpoint_every_n_steps writes it), or resume=auto"
        )
    stored = checkpoint_job(path)
    if stored != job:
        log.warning("resume=%s: the checkpoint's job hash %s differs from this run's %s", path, stored, job)
    log.info("resuming from %s", path)
    return path


def _take_over(log_root: Path, output_dir: Path, job: str) -> Path | None:
    """Continue (or redo) the newest interrupted run of this job; mark every interrupted one superseded."""
    found: Path | None = None
    for directory in find_interrupted(log_root, job, exclude=output_dir):
        try:
            with RunDirLock(directory):
                last = directory / CHECKPOINT_DIR / LAST_CHECKPOINT
                if found is None and last.is_file() and checkpoint_job(last) == job:
                    found = adopt(last, output_dir)
                    log.info("resuming the interrupted run %s from %s", directory, last)
                    mark_superseded(directory, output_dir, resumed=True)
                else:
                    log.info("redoing the interrupted run %s (no usable checkpoint)", directory)
                    mark_superseded(directory, output_dir, resumed=False)
        except RunDirBusy:
            continue  # it came back to life meanwhile: leave it alone
    return found


def _rewrite(value: Any, old: str, new: str) -> Any:
    """``value`` with the path prefix ``old`` replaced by ``new`` (strings, and keys of dicts)."""
    if isinstance(value, str) and (value == old or value.startswith(old + "/")):
        return new + value[len(old) :]
    if isinstance(value, dict):
        return {_rewrite(k, old, new): _rewrite(v, old, new) for k, v in value.items()}
    return value


def _checkpoint_states(checkpoint: dict[str, Any]) -> list[dict[str, Any]]:
    """The saved states of the ``ModelCheckpoint`` callbacks in a checkpoint."""
    callbacks = checkpoint.get("callbacks") or {}
    return [s for k, s in callbacks.items() if str(k).startswith("ModelCheckpoint") and isinstance(s, dict)]


def referenced_files(checkpoint: dict[str, Any]) -> set[str]:
    """The best / top-k checkpoint files a checkpoint's ``ModelCheckpoint`` states point to (its ``last``
    file is left out: that one is newer than the checkpoint, and the resumed run writes it again)."""
    files: set[str] = set()
    for state in _checkpoint_states(checkpoint):
        files.update(str(p) for p in (state.get("best_k_models") or {}))
        files.update(str(state[k]) for k in ("best_model_path", "kth_best_model_path") if state.get(k))
    return files


def checkpoint_run_dir(path: Path, checkpoint: dict[str, Any]) -> Path:
    """The run directory a checkpoint belongs to: the parent of its ``ModelCheckpoint`` folder."""
    for state in _checkpoint_states(checkpoint):
        dirpath = state.get("dirpath")
        if dirpath and Path(dirpath).name == CHECKPOINT_DIR:
            return Path(dirpath).parent
    return path.parent.parent


def adopt(path: Path, output_dir: Path) -> Path:
    """The checkpoint to hand to ``trainer.fit``: ``path`` itself when it belongs to this run directory
    (after `prune_orphans`), else a copy in this run's ``checkpoints/`` made by `relocate_checkpoint`."""
    source_dir = checkpoint_run_dir(path, load_checkpoint(path))
    if os.path.abspath(source_dir) == os.path.abspath(output_dir):
        prune_orphans(path)
        return path
    return relocate_checkpoint(path, source_dir, output_dir)


def relocate_checkpoint(path: Path, source_dir: Path, target_dir: Path) -> Path:
    """Copy checkpoint ``path`` of the run in ``source_dir`` to ``target_dir/checkpoints/last.ckpt``, with
    the checkpoints it refers to (best, top-k), rewriting the paths inside them, so the resumed run keeps
    its best-checkpoint bookkeeping (Lightning drops it when the folder changes); returns the copy."""
    old, new = os.path.abspath(source_dir), os.path.abspath(target_dir)
    target = Path(new) / CHECKPOINT_DIR / LAST_CHECKPOINT
    copies = {os.path.abspath(path): target}
    for name in referenced_files(load_checkpoint(path)):
        if name.startswith(old + "/") and Path(name).is_file() and Path(name).name != LAST_CHECKPOINT:
            copies.setdefault(os.path.abspath(name), Path(_rewrite(os.path.abspath(name), old, new)))
    target.parent.mkdir(parents=True, exist_ok=True)
    for src, dst in copies.items():
        checkpoint = load_checkpoint(Path(src))
        checkpoint["callbacks"] = _rewrite(checkpoint.get("callbacks") or {}, old, new)
        tmp = dst.with_name(dst.name + ".tmp")
        torch.save(checkpoint, tmp)
        shutil.move(tmp, dst)
    log.info("copied %d checkpoint(s) of %s into %s", len(copies), source_dir, target.parent)
    return target


def prune_orphans(last: Path) -> None:
    """Delete checkpoints in ``last``'s folder that ``last`` does not refer to: written by the killed run
    after ``last`` (e.g. a best checkpoint of a later validation), they would clash with the ones the
    resumed run writes again."""
    keep = {os.path.abspath(p) for p in referenced_files(load_checkpoint(last))} | {os.path.abspath(last)}
    for path in last.parent.glob("*.ckpt"):
        if os.path.abspath(path) not in keep:
            log.info("removing %s (written after the checkpoint this run resumes from)", path)
            path.unlink()
