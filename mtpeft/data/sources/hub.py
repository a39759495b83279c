"""Rows from ``datasets.load_dataset``: cache and local copies first, fail fast when nothing is there.

Where a ``dataset`` source's rows come from, in order:

1. ``local_dir`` when it exists (a copy made with ``hf download --repo-type dataset <id> --local-dir <dir>``);
   for builders (``json``, ``parquet``, ...) ``data_files`` are paths inside it;
2. for builders: the file in the Hugging Face hub cache of ``hub_repo`` (what ``hf_hub_download`` left),
   downloaded there when online;
3. for hub ids: ``datasets``' own cache, then the Hub.

Offline (``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE``) and not cached, loading raises
``DataNotAvailableError`` at once, saying what to download and where to put it. ``datasets`` is
imported only here, when a ``dataset`` source is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mtpeft.data.sources.config import SourceConfig
from mtpeft.data.sources.files import resolve_path

BUILDERS: tuple[str, ...] = ("json", "parquet", "csv", "arrow", "text")
"""``dataset`` values that are ``datasets`` builders reading ``data_files``, not repositories."""


class DataNotAvailableError(FileNotFoundError):
    """A dataset or data file is neither local nor cached, and cannot be downloaded now."""


def offline() -> bool:
    """Whether the Hugging Face libraries are told not to use the network."""
    flags = (os.environ.get(k, "").lower() for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(f in ("1", "true", "yes", "on") for f in flags)


def load_split(cfg: SourceConfig, split: str, required: tuple[str, ...]) -> list[dict[str, Any]]:
    """All rows of dataset split ``split`` (``datasets`` split syntax, e.g. ``train[:-200]``) as dicts.

    ``required`` are the format's columns; a dataset without one of them is an error naming it.
    """
    import datasets

    path, data_files = _location(cfg)
    try:
        ds = datasets.load_dataset(
            path,
            cfg.name,
            data_dir=cfg.data_dir,
            data_files=data_files,
            revision=cfg.revision,
            cache_dir=cfg.cache_dir,
            split=split,
        )
    except (ConnectionError, FileNotFoundError) as err:  # incl. datasets' DatasetNotFoundError
        raise DataNotAvailableError(_fetch_hint(cfg, str(err))) from err
    except ValueError as err:
        if "split" in str(err).lower() or "corresponds to no data" in str(err):
            raise ValueError(
                f"{cfg.label}: dataset {cfg.location} has no split {split!r} ({err}); set {cfg.label}.splits "
                "to its split names, or ratios: [train, val, test] to split its train"
            ) from err
        raise ValueError(f"{cfg.label}: loading {cfg.location} failed: {err}") from err
    check_columns(cfg, list(ds.column_names), required, split)
    return ds.to_list()


def check_columns(cfg: SourceConfig, columns: list[str], required: tuple[str, ...], split: str) -> None:
    """Every column the format needs (after ``fields`` renaming) is in the dataset; name the missing one."""
    for column in required:
        source = cfg.fields.get(column, column)
        if source not in columns:
            raise ValueError(
                f"{cfg.label}: dataset {cfg.location} split {split!r} has no column {source!r} needed by "
                f"format {cfg.format!r}; its columns: {', '.join(columns)}. Map yours with "
                f"{cfg.label}.fields: {{{column}: <your column>}}"
            )


def _location(cfg: SourceConfig) -> tuple[str, Any]:
    """``(path, data_files)`` for ``load_dataset``: local copies first."""
    assert cfg.dataset is not None
    if cfg.dataset in BUILDERS:
        if cfg.data_files is None:
            raise ValueError(f"{cfg.label}: dataset: {cfg.dataset} needs data_files (the files to read)")
        return cfg.dataset, _map_files(cfg.data_files, lambda f: _data_file(cfg, f))
    if cfg.local_dir and resolve_path(cfg.local_dir).is_dir():
        return str(resolve_path(cfg.local_dir)), cfg.data_files
    local = resolve_path(cfg.dataset)
    if local.exists():
        return str(local), cfg.data_files
    if cfg.dataset.startswith(("/", "./", "../", "~")):
        raise DataNotAvailableError(
            f"{cfg.label}: dataset directory {cfg.dataset!r} not found (looked at {local})"
        )
    return cfg.dataset, cfg.data_files


def _map_files(data_files: Any, fn: Any) -> Any:
    """Apply ``fn`` to every path of a ``data_files`` value (str, list, or split -> str/list)."""
    if isinstance(data_files, str):
        return fn(data_files)
    if isinstance(data_files, dict):
        return {split: _map_files(files, fn) for split, files in data_files.items()}
    return [fn(f) for f in data_files]


def _data_file(cfg: SourceConfig, name: str) -> str:
    """A builder's data file: under ``local_dir`` (or the working dir), else in the hub cache of ``hub_repo``."""
    local = resolve_path(Path(cfg.local_dir) / name if cfg.local_dir else name)
    if local.is_file():
        return str(local)
    if cfg.hub_repo:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        cached = try_to_load_from_cache(cfg.hub_repo, name, revision=cfg.revision, repo_type="dataset")
        if isinstance(cached, str):
            return cached
        if not offline():
            try:
                return hf_hub_download(cfg.hub_repo, name, revision=cfg.revision, repo_type="dataset")
            except Exception as err:  # network, auth, missing file: all mean "not available here"
                raise DataNotAvailableError(_file_hint(cfg, name, local, f"download failed: {err}")) from err
    raise DataNotAvailableError(
        _file_hint(cfg, name, local, "offline" if offline() else "no hub_repo to fetch it from")
    )


def _file_hint(cfg: SourceConfig, name: str, local: Path, why: str) -> str:
    target = resolve_path(cfg.local_dir) if cfg.local_dir else local.parent
    fetch = (
        f"`hf download --repo-type dataset {cfg.hub_repo} {name} --local-dir {target}`"
        if cfg.hub_repo
        else "copy the file there"
    )
    return (
        f"{cfg.label}: data file {name!r} not found at {local} and not in the Hugging Face cache ({why}). "
        f"Fetch it on a machine with network: {fetch} (or `huggingface-cli download` with older "
        f"huggingface_hub), or point {cfg.label}.local_dir / data_files at your copy."
    )


def _fetch_hint(cfg: SourceConfig, err: str) -> str:
    name = f" {cfg.name!r}" if cfg.name else ""
    target = resolve_path(cfg.local_dir) if cfg.local_dir else Path("data") / str(cfg.dataset)
    state = "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set" if offline() else "the Hub could not be reached"
    return (
        f"{cfg.label}: dataset {cfg.dataset!r}{name} is not available locally and {state} ({err}). Fetch it "
        f"on a machine with network: `hf download --repo-type dataset {cfg.dataset} --local-dir {target}` "
        f"(or `huggingface-cli download ...`), then set {cfg.label}.local_dir={target} (copy the directory "
        f"over if needed); or run `python -c \"import datasets; datasets.load_dataset('{cfg.dataset}'"
        f'{", " + repr(cfg.name) if cfg.name else ""})"` online once to fill the datasets cache.'
    )
