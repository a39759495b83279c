"""What identifies a run's results: a stable hash of its resolved config, and of everything else it reads.

Two hashes, for two questions:

- `config_hash`: the resolved config without paths and bookkeeping. Two runs with the same config hash
  asked for the same computation (it is how tables group and label runs, and it never changes when the code
  or a data file changes).
- `job_hash`: the config hash plus the *inputs* the config does not spell out (`mtpeft.inputs.run_inputs`): a content
  digest of every data file the config reads, the code version (``mtpeft.RESULTS_VERSION``, bumped by
  every commit that changes what a run computes, and the versions of the numerical libraries) and the base
  model's weights and dtype on this machine (`mtpeft.models.identity`: the tiny model is pre-trained
  locally and differs across CPUs; records before this have no ``inputs.base`` and match no job). A sweep
  skips a job only when a finished run has the same job hash, so an edited data file, a results-changing
  release or an upgraded ``torch`` never reuses a stale result, while a study started in one session can
  be finished in the next after unrelated edits. ``$MTPEFT_CODE_VERSION=digest`` keys the code part on a
  digest of every file of the installed package instead (strict: any edit, even a comment, counts);
  any other value is used as a label of your choice. The package digest is always recorded
  (``inputs.code.sources_digest`` is not part of the job hash), so a reused result can be audited.

Digests are cheap after the first look: files are hashed once per process and cached by path, size,
modification time and inode.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mtpeft.utils.digests import file_digest
from mtpeft.utils.provenance import package_versions

#: Bookkeeping that never changes what a run computes: where it writes (paths, the study's directory name
#: ``task_name``), how it reports (logger, callbacks, names, tags), where it is launched (``cluster``),
#: whether finished runs are skipped, how it recovers from interruptions (``resume``, the periodic
#: checkpoint), whether a sweep with failed jobs exits non-zero and how a study reports (``report``: its
#: study-specific plots, `mtpeft.results.plots`).
IGNORED_TOP_LEVEL = (
    "paths",
    "hydra",
    "logger",
    "callbacks",
    "run_name",
    "run_group",
    "tags",
    "task_name",
    "skip_finished",
    "cpu_threads",
    "cpu_malloc_mmap_threshold_kb",
    "optimized_metric",
    "cluster",
    "resume",
    "checkpoint_every_n_steps",
    "allow_failures",
    "report",
)
#: Nested paths (``section.key``) that hold directories.
IGNORED_NESTED = (("trainer", "default_root_dir"), ("model", "cache_dir"))

#: Libraries whose version can change the numbers a run produces (part of `code_version`).
NUMERIC_PACKAGES = ("torch", "transformers", "peft", "lightning", "tokenizers", "torchmetrics")


def hashed_part(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a resolved config that decides a run's results (what `config_hash` hashes)."""
    kept = {k: v for k, v in config.items() if k not in IGNORED_TOP_LEVEL}
    for section, key in IGNORED_NESTED:
        if isinstance(kept.get(section), dict):
            kept[section] = {k: v for k, v in kept[section].items() if k != key}
    kept.setdefault("trainer", {})
    return kept


def _digest(value: Any) -> str:
    blob = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def config_hash(config: dict[str, Any]) -> str:
    """SHA-256 (first 16 hex digits) of the config without paths, loggers and other bookkeeping."""
    return _digest(hashed_part(config))


def job_hash(config: dict[str, Any], inputs: Mapping[str, Any]) -> str:
    """The identity of a job's results: `config_hash` plus its inputs (`mtpeft.inputs.run_inputs`: data
    digests, code version, base model)."""
    return _digest({"config": config_hash(config), "inputs": job_inputs(inputs)})


def data_and_code(config: dict[str, Any]) -> dict[str, Any]:
    """The inputs of a run this layer can name: ``{"data": {file: sha256}, "code": code_version()}``
    (`mtpeft.inputs.run_inputs` adds the base model)."""
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    return {"data": data_digests(data), "code": code_version()}


def job_inputs(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a run's inputs that identifies a job: everything but the audit-only package digest."""
    code = inputs.get("code")
    if isinstance(code, dict):
        code = {k: v for k, v in code.items() if k != "sources_digest"}
    return {**inputs, "code": code}


# -- code --------------------------------------------------------------------------------------------
CODE_VERSION_ENV = "MTPEFT_CODE_VERSION"
"""Unset: the code part of a job's identity is ``mtpeft.RESULTS_VERSION``. ``digest``: a digest of every file
of the installed package (strict). Any other value: that label (e.g. to pin a sweep's identity in tests)."""


def code_version() -> dict[str, Any]:
    """The code a run executes: ``mtpeft.RESULTS_VERSION`` (or what ``$MTPEFT_CODE_VERSION`` asks for), the
    versions of `NUMERIC_PACKAGES`, and the package digest for audit (``sources_digest``, not hashed)."""
    from mtpeft import RESULTS_VERSION, __version__

    choice = os.environ.get(CODE_VERSION_ENV)
    digest = _own_package_digest()
    if choice == "digest":
        sources = digest
    elif choice:
        sources = f"pinned:{choice}"
    else:
        sources = f"results-version:{RESULTS_VERSION}"
    return {
        "mtpeft": __version__,
        "sources": sources,
        "packages": package_versions(NUMERIC_PACKAGES),
        "sources_digest": digest,
    }


@functools.cache
def _own_package_digest() -> str:
    return package_digest(Path(__file__).resolve().parent.parent)


def package_digest(root: Path) -> str:
    """Digest of every file under ``root`` (sources and packaged data; bytecode caches, hidden and
    temporary files left out), names included: computed once per process for the installed package."""
    digest = hashlib.sha256()
    for path in sorted(_package_files(root)):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(bytes.fromhex(file_digest(path)))
    return digest.hexdigest()[:16]


def _package_files(root: Path) -> Iterator[Path]:
    for path in root.rglob("*"):
        parts = path.relative_to(root).parts
        if any(p == "__pycache__" or p.startswith(".") for p in parts) or path.suffix in SKIPPED_SUFFIXES:
            continue
        if path.is_file():
            yield path


SKIPPED_SUFFIXES = (".pyc", ".pyo", ".tmp", ".swp", ".orig", ".rej", ".bak")


# -- data --------------------------------------------------------------------------------------------
def path_digest(path: Path) -> str:
    """Digest of a data file, or of every file inside a data directory (hidden entries left out);
    ``"missing"`` when there is nothing there (the run itself reports that)."""
    if path.is_file():
        return file_digest(path)
    if not path.is_dir():
        return "missing"
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        relative = file.relative_to(path)
        if any(part.startswith(".") for part in relative.parts):
            continue
        digest.update(relative.as_posix().encode() + b"\0" + bytes.fromhex(file_digest(file)))
    return digest.hexdigest()


def data_digests(data: Mapping[str, Any]) -> dict[str, str]:
    """``{where: digest}`` for every local file or directory the ``data`` config reads.

    ``where`` names the config entry and the path as written (``data.paths[0]: a.json``). Hub datasets
    without a local copy are identified by id and ``revision`` (``hub:openai/gsm8k@unpinned``): pin the
    revision to make them stale-proof too. Generator tasks read no files (their code is in `code_version`).
    """
    return {where: path_digest(path) if isinstance(path, Path) else path for where, path in _locations(data)}


def _locations(data: Mapping[str, Any]) -> Iterator[tuple[str, Path | str]]:
    from mtpeft.data.sources.files import resolve_path

    paths = data.get("paths")
    if isinstance(paths, list | tuple):
        for i, entry in enumerate(paths):
            path = entry.get("path") if isinstance(entry, Mapping) else entry
            if isinstance(path, str):
                yield f"data.paths[{i}]: {path}", resolve_path(path)
    if data.get("sources"):
        from mtpeft.data.sources.config import parse_sources

        for source in parse_sources(data["sources"]):
            yield from _source_locations(source, resolve_path)


def _source_locations(source: Any, resolve_path: Any) -> Iterator[tuple[str, Path | str]]:
    """The files of one parsed source (`mtpeft.data.sources.config.SourceConfig`)."""
    from mtpeft.data.sources.hub import BUILDERS

    for entry in source.files:
        yield f"{source.label}.files: {entry.path}", resolve_path(entry.path)
    if source.dataset is None:
        return
    if source.dataset in BUILDERS:
        for name in _file_names(source.data_files):
            yield f"{source.label}.data_files: {name}", _builder_file(source, name, resolve_path)
    elif source.local_dir and resolve_path(source.local_dir).is_dir():
        yield f"{source.label}.local_dir: {source.local_dir}", resolve_path(source.local_dir)
    elif resolve_path(source.dataset).exists():
        yield f"{source.label}.dataset: {source.dataset}", resolve_path(source.dataset)
    else:
        yield (
            f"{source.label}.dataset: {source.dataset}",
            f"hub:{source.dataset}@{source.revision or 'unpinned'}",
        )


def _file_names(data_files: Any) -> list[str]:
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, Mapping):
        return [name for value in data_files.values() for name in _file_names(value)]
    return [str(name) for name in data_files or []]


def _builder_file(source: Any, name: str, resolve_path: Any) -> Path | str:
    """A builder's data file as `mtpeft.data.sources.hub` finds it: local first, then the hub cache."""
    local = resolve_path(Path(source.local_dir) / name if source.local_dir else name)
    if local.is_file() or not source.hub_repo:
        return local
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source.hub_repo, name, revision=source.revision, repo_type="dataset")
    except Exception:  # noqa: BLE001 - no cache to look at: identify the file by name
        cached = None
    if isinstance(cached, str):
        return Path(cached)
    return f"hub:{source.hub_repo}/{name}@{source.revision or 'unpinned'}"
