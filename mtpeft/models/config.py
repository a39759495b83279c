"""The ``model`` node as a typed, discriminated config: ``kind: tiny`` or ``kind: hub``.

``parse_model(node)`` validates a Hydra ``model`` node (or a dict) with the config layer
(`mtpeft.utils.schema`): ``kind`` picks the class, unknown keys and wrong types are errors naming
``model.<key>`` and the valid keys, before anything is built or downloaded. The loader
(`mtpeft.models.loader`) then works on the parsed object.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Annotated, Any, Literal

from pydantic import Field

from mtpeft.models.pretrain import PretrainConfig
from mtpeft.models.tiny import TinyModelConfig
from mtpeft.utils.schema import Bool, PositiveInt, Str, config_dataclass, parse

Dtype = Literal["float32", "bfloat16", "float16", "auto", "bfloat16_if_native"]
"""Storage dtype of the frozen base weights (``auto``: the checkpoint's own; ``bfloat16_if_native``:
bfloat16 where the hardware computes it natively, else float32, see `mtpeft.models.loader.base_dtype`)."""
AdapterDtype = Literal["float32", "bfloat16", "float16"]
"""Storage dtype of the trainable adapter parameters."""


@config_dataclass(frozen=True)
class TinyModelSpec(TinyModelConfig):
    """``kind: tiny``: the tiny model's shapes (`TinyModelConfig`), its tokenizer and pre-training budget."""

    kind: Literal["tiny"] = "tiny"
    """Built and pre-trained locally, then cached (``mtpeft.models.cache``)."""
    vocab_size: PositiveInt | None = 1024
    """Target vocabulary of the byte-level BPE tokenizer; the model itself uses ``len(tokenizer)``."""
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    """Pre-training budget and optimiser (``steps: 0`` keeps the random initialisation)."""
    cache_dir: Str | None = None
    """Cache root (null: ``$MTPEFT_CACHE_DIR``, else the platform's user cache dir)."""

    def shapes(self) -> TinyModelConfig:
        """The model's own config: the shapes, with the vocabulary taken from the tokenizer."""
        names = {f.name for f in dataclasses.fields(TinyModelConfig)} - {"vocab_size"}
        return TinyModelConfig(**{name: getattr(self, name) for name in names})


@config_dataclass(frozen=True)
class HubModelSpec:
    """``kind: hub``: a local directory, a hub id in the local HF cache, or a GGUF checkpoint."""

    kind: Literal["hub"] = "hub"
    """Loaded with ``AutoTokenizer`` / ``AutoModelForCausalLM``."""
    name_or_path: Str | None = None
    """A local directory or a hub id (``???`` in conf/model/local_dir.yaml: required there)."""
    dtype: Dtype = "float32"
    """Frozen base weights' dtype; float32 is safe on CPU."""
    attn_implementation: Str | None = None
    """``sdpa`` | ``eager`` | ``flash_attention_2`` (null: transformers' default)."""
    trust_remote_code: Bool = False
    """Never run repository code unless asked."""
    revision: Str | None = None
    """Hub revision (branch, tag or commit) to pin; null = default branch."""
    allow_download: Bool = False
    """True: download a missing hub id (needs network); false: fail fast."""
    gradient_checkpointing: Bool = False
    """Feeds the top-level ``gradient_checkpointing`` switch (memory for time)."""
    adapter_dtype: AdapterDtype | None = None
    """Storage dtype of the trainable adapter parameters (null: float32)."""
    chat_template: Bool = False
    """Wrap prompts in the tokenizer's chat template (instruct models); read by the datamodule."""
    gguf_file: Str | None = None
    """A GGUF checkpoint (a path, or a file name inside ``gguf_package``), converted once into the cache."""
    gguf_package: Str | None = None
    """Installed package that ships ``gguf_file`` (located without importing it)."""
    cache_dir: Str | None = None
    """Where a converted GGUF directory lives (null: the mtpeft cache)."""


ModelSpec = Annotated[TinyModelSpec | HubModelSpec, Field(discriminator="kind")]
"""The ``model`` node: ``kind`` selects the class."""


def parse_model(node: Any) -> TinyModelSpec | HubModelSpec:
    """The ``model`` node (Hydra node or mapping, interpolations resolved) as a typed spec."""
    if isinstance(node, TinyModelSpec | HubModelSpec):
        return node
    return parse(ModelSpec, node, "model")
