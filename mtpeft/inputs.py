"""What a run reads besides its config, recorded as ``inputs`` in ``results.json`` and hashed into its job
identity (`mtpeft.utils.confighash.job_hash`): digests of the data files it reads, the code version and the
base model this machine loads (`mtpeft.models.identity`)."""

from __future__ import annotations

from typing import Any

from mtpeft.models.identity import base_identity
from mtpeft.utils.confighash import data_and_code


def run_inputs(config: dict[str, Any]) -> dict[str, Any]:
    """``{"data": {file: sha256}, "code": code_version(), "base": {"weight_files": digest, "dtype": name}}``
    (``base`` when the config has a ``model`` node; the tiny model is built or a GGUF file converted first if
    this machine has not yet)."""
    inputs = data_and_code(config)
    if isinstance(config.get("model"), dict):
        inputs["base"] = base_identity(config["model"])
    return inputs
