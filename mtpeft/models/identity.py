"""Which base model a run trains on, beyond what its config says: part of a job's identity.

A config names a base (``model=tiny``, a directory, a GGUF file, a hub id) but not always the weights a run
gets. The tiny model is pre-trained on the machine that first needs it, and the same command builds different
weights on CPUs with different kernels (base digests ``abb6a736``, ``4316e7db`` and ``95fef731`` on three
VMs); a model directory can be replaced in place; ``model.dtype: bfloat16_if_native`` loads bfloat16 on one
machine and float32 on another. `base_identity` is a digest of the weight files the run loads and the dtype
it loads them in. `mtpeft.inputs.run_inputs` records it as ``inputs.base``, so it is part of the
job hash: a run finished on another base is not a finished run of this job, and a study resumed on another
machine runs again instead of mixing two bases in one table (`mtpeft.study.publish.check_published_bases`
also refuses to publish into a study directory whose runs were made on another base).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mtpeft.models.config import TinyModelSpec, parse_model
from mtpeft.models.loader import hub_cache_dir, hub_source, resolved_dtype, tiny_entry
from mtpeft.utils.digests import file_digest

#: Name of a Hugging Face hub cache blob of a large (LFS) file: the SHA-256 of its content.
HUB_BLOB = re.compile(r"[0-9a-f]{64}")
#: Files that hold weights (what `weight_files_digest` hashes; configs, tokenizers and manifests do not count).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def base_identity(cfg: Mapping[str, Any]) -> dict[str, str]:
    """``{"weight_files": <digest of the weight files>, "dtype": <dtype the base is loaded in>}`` of the Hydra
    ``model`` node, building the tiny model or converting a GGUF file first if this machine has not yet.
    A hub id that is not in the local cache is named instead (``hub:<id>@<revision>``): pin a revision."""
    spec = parse_model(cfg)
    if isinstance(spec, TinyModelSpec):
        entry, _ = tiny_entry(spec)
        return {"weight_files": weight_files_digest(entry), "dtype": "float32"}
    name = hub_source(spec)
    local = Path(name).expanduser()
    where = local if local.is_dir() else hub_cache_dir(name, spec.revision)
    weights = weight_files_digest(where) if where is not None else f"hub:{name}@{spec.revision or 'unpinned'}"
    return {"weight_files": weights, "dtype": dtype_name(resolved_dtype(spec.dtype))}


def weight_files_digest(directory: Path) -> str:
    """SHA-256 (16 hex digits) of the weight files in ``directory`` (`WEIGHT_SUFFIXES`), names included:
    equal for two directories that hold the same weights, whatever else they hold."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file()):
        relative = path.relative_to(directory).as_posix()
        if any(part.startswith(".") for part in Path(relative).parts):
            continue
        digest.update(relative.encode() + b"\0" + bytes.fromhex(content_digest(path)))
    return digest.hexdigest()[:16]


def content_digest(path: Path) -> str:
    """SHA-256 of a file's bytes. A file of the Hugging Face hub cache is a link to a blob named by that
    digest (for large files), which is taken as it is: a 7B model's 14 GB are not read at every job start."""
    target = path.resolve()
    if path.is_symlink() and HUB_BLOB.fullmatch(target.name):
        return target.name
    return file_digest(path)


def dtype_name(dtype: torch.dtype | str) -> str:
    """``torch.bfloat16`` -> ``bfloat16``; strings (``auto``) as they are."""
    return str(dtype).removeprefix("torch.")
