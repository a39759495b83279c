"""`PemlConfig`: the PEML-style search space of docs/methods.md 8(g), as nested typed sections.

``conf/method/peml.yaml`` reads ``prompt.mode``, ``prompt.encoder.type``, ``lora.r`` ...; Hydra hands the
nested sections over as plain dicts, which ``__post_init__`` parses into the dataclasses below (unknown
keys and wrong types are errors naming the full key, e.g. ``method.prompt.encoder.hiden``, and the valid
keys). Sources: docs/methods.md 8, peft's prompt tuners (``p_tuning``, ``prefix_tuning``,
``multitask_prompt_tuning``) or ours, as noted per field.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from mtpeft.adapters.base import MethodConfig
from mtpeft.adapters.registry import parse_dataclass
from mtpeft.methods.lora import LoraMethodConfig

Mode = Literal["input", "deep"]
Sharing = Literal["shared", "per_task", "shared+per_task", "mpt"]
EncoderType = Literal["identity", "mlp", "lstm", "transformer", "residual_mlp"]
Activation = Literal["relu", "gelu", "tanh"]


@dataclass
class EncoderConfig:
    type: EncoderType = "mlp"
    """Prompt encoder f_θ applied to the seeds: ``identity`` (prompt / raw prefix tuning), ``mlp`` (P-tuning
    MLP; with ``layers: 1`` and tanh it is peft's prefix projection), ``lstm`` (P-tuning bi-LSTM + MLP head),
    ``transformer`` (pre-norm encoder layers over the m seeds, ours), ``residual_mlp`` (x + W2 act(W1 x)
    blocks with W2 = 0, so the encoder starts as the identity; ours). docs/methods.md 8(b)."""
    hidden: int | None = None
    """h, the encoder width (MLP hidden, LSTM hidden per direction, transformer FFN); null = the model's
    hidden size d (peft: ``encoder_hidden_size`` defaults to ``token_dim``)."""
    layers: int = 2
    """Hidden layers of the MLP (2 = peft's 3-linear P-tuning MLP), LSTM layers (peft default 2),
    transformer layers or residual blocks."""
    activation: Activation = "relu"
    """Non-linearity of mlp / residual_mlp / transformer / the LSTM head (peft P-tuning: ReLU; prefix: tanh)."""
    dropout: float = 0.0
    """Dropout after each hidden activation, between LSTM layers and inside transformer layers (peft: 0)."""
    heads: int = 4
    """Attention heads of the ``transformer`` encoder; must divide the seed width (ours)."""

    def __post_init__(self) -> None:
        _check_literals(self, "method.prompt.encoder")
        for name in ("layers", "heads"):
            _check_positive(getattr(self, name), f"method.prompt.encoder.{name}")
        if self.hidden is not None:
            _check_positive(self.hidden, "method.prompt.encoder.hidden")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"method.prompt.encoder.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class PromptConfig:
    mode: Mode = "input"
    """``input``: m virtual tokens prepended to the input embeddings (P-tuning / prompt tuning);
    ``deep``: per-layer key/value prefixes (prefix tuning / P-tuning v2). docs/methods.md 8(b)."""
    length: int = 8
    """m, the number of virtual tokens (docs/methods.md 8(g) explores 4..100; ``method=lora`` is the m = 0 case)."""
    sharing: Sharing = "shared+per_task"
    """Seeds: one ``shared`` E (task-agnostic), ``per_task`` E_t, ``shared+per_task`` E + E_t (E_t = 0 at
    init), or ``mpt``: E ⊙ (u_t v_t^T) with rank ``mpt_rank`` (peft MultitaskPromptEmbedding). All but
    ``shared`` need task ids (docs/methods.md 8(d): the mtpeft default is shared encoder + per-task seeds)."""
    mpt_rank: int = 4
    """R of the MPT task factors u_t ∈ R^{m×R}, v_t ∈ R^{R×d} (docs/methods.md 8(g): R ∈ {1, 4}). They start at
    1/sqrt(R) + N(0, 0.02), so u_t v_t^T ≈ 1 and every task starts from the shared prompt (ours; peft draws
    both from N(0, 0.02), which makes the initial prompt ≈ 0 unless loaded from a source task)."""
    init: Literal["random", "vocab"] = "random"
    """Seed init: ``random`` N(0, 0.02) (docs/methods.md 8(f)) or ``vocab``: embeddings of uniformly sampled
    vocabulary tokens (peft ``PromptTuningInit.SAMPLE_VOCAB``). For ``mode: deep`` with the identity
    encoder the seeds are the raw prefix, so ``vocab`` takes the frozen model's own keys/values of the
    sampled tokens (prefix tuning's "activations of real words" init, Li & Liang 2021): either way the
    model at init (LoRA B = 0) behaves as if those tokens were prepended to the input."""
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    """The prompt encoder f_θ (docs/methods.md 8(b), 8(g))."""

    def __post_init__(self) -> None:
        self.encoder = parse_section(EncoderConfig, self.encoder, "method.prompt.encoder")
        _check_literals(self, "method.prompt")
        _check_positive(self.length, "method.prompt.length")
        _check_positive(self.mpt_rank, "method.prompt.mpt_rank")


@dataclass
class PemlConfig(MethodConfig):
    prompt: PromptConfig = field(default_factory=PromptConfig)
    """Continuous prompts: placement, length, sharing across tasks, seed init and encoder."""
    lora: LoraMethodConfig = field(default_factory=LoraMethodConfig)
    """The LoRA part, exactly ``method=lora``'s options (r 8, alpha 16, q,k,v,o; docs/methods.md 3)."""
    lr_prompt: float | None = None
    """Learning rate of the seeds and the encoder; null = the optimiser's lr. docs/methods.md 8(g): prompts
    usually want a larger lr (1e-3 .. 3e-2) than LoRA."""
    lr_lora: float | None = None
    """Learning rate of the LoRA matrices; null = the optimiser's lr (docs/methods.md 8(g): 1e-4 .. 3e-4)."""
    reparam_at_inference: bool = False
    """In eval mode, encode the prompts once, cache them and skip the encoder (outputs unchanged);
    the cache is rebuilt whenever a prompt parameter changes (docs/methods.md 8(g) ``reparam_at_inference``)."""

    def __post_init__(self) -> None:
        self.prompt = parse_section(PromptConfig, self.prompt, "method.prompt")
        self.lora = parse_section(LoraMethodConfig, self.lora, "method.lora")
        for name in ("lr_prompt", "lr_lora"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"method.{name} must be > 0 or null (the optimiser's lr), got {value}")


def parse_section(cls: type, values: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a nested YAML section; errors name ``where.<key>``."""
    return parse_dataclass(cls, values, where)


def _check_literals(config: Any, where: str) -> None:
    """Literal fields of a directly constructed section (``parse_section`` already checked parsed ones)."""
    for name, hint in typing.get_type_hints(type(config)).items():
        if typing.get_origin(hint) is Literal and getattr(config, name) not in typing.get_args(hint):
            valid = list(typing.get_args(hint))
            raise ValueError(f"{where}.{name}={getattr(config, name)!r} is not valid; choose one of {valid}")


def _check_positive(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where} must be a positive integer, got {value!r}")
