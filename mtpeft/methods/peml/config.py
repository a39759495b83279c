"""`PemlConfig`: the PEML-style search space of docs/methods.md 8(g), as nested typed sections.

``conf/method/peml.yaml`` reads ``prompt.mode``, ``prompt.encoder.type``, ``lora.r`` ...; the config
layer (`mtpeft.utils.schema`) parses the nested sections into the typed dataclasses below (unknown keys
and wrong types are errors naming the full key, e.g. ``method.prompt.encoder.hiden``, and the valid
keys). Sources: docs/methods.md 8, peft's prompt tuners (``p_tuning``, ``prefix_tuning``,
``multitask_prompt_tuning``) or ours, as noted per field.
"""

from __future__ import annotations

from dataclasses import field
from typing import Literal

from mtpeft.adapters.base import MethodConfig
from mtpeft.methods.lora import LoraMethodConfig
from mtpeft.utils.schema import Bool, Dropout, PositiveFloat, PositiveInt, config_dataclass

Mode = Literal["input", "deep"]
Sharing = Literal["shared", "per_task", "shared+per_task", "mpt"]
EncoderType = Literal["identity", "mlp", "lstm", "transformer", "residual_mlp"]
Activation = Literal["relu", "gelu", "tanh"]


@config_dataclass
class EncoderConfig:
    type: EncoderType = "mlp"
    """Prompt encoder f_θ applied to the seeds: ``identity`` (prompt / raw prefix tuning), ``mlp`` (P-tuning
    MLP; with ``layers: 1`` and tanh it is peft's prefix projection), ``lstm`` (P-tuning bi-LSTM + MLP head),
    ``transformer`` (pre-norm encoder layers over the m seeds, ours), ``residual_mlp`` (x + W2 act(W1 x)
    blocks with W2 = 0, so the encoder starts as the identity; ours). docs/methods.md 8(b)."""
    hidden: PositiveInt | None = None
    """h, the encoder width (MLP hidden, LSTM hidden per direction, transformer FFN); null = the model's
    hidden size d (peft: ``encoder_hidden_size`` defaults to ``token_dim``)."""
    layers: PositiveInt = 2
    """Hidden layers of the MLP (2 = peft's 3-linear P-tuning MLP), LSTM layers (peft default 2),
    transformer layers or residual blocks."""
    activation: Activation = "relu"
    """Non-linearity of mlp / residual_mlp / transformer / the LSTM head (peft P-tuning: ReLU; prefix: tanh)."""
    dropout: Dropout = 0.0
    """Dropout after each hidden activation, between LSTM layers and inside transformer layers (peft: 0)."""
    heads: PositiveInt = 4
    """Attention heads of the ``transformer`` encoder; must divide the seed width (ours)."""


@config_dataclass
class PromptConfig:
    mode: Mode = "input"
    """``input``: m virtual tokens prepended to the input embeddings (P-tuning / prompt tuning);
    ``deep``: per-layer key/value prefixes (prefix tuning / P-tuning v2). docs/methods.md 8(b)."""
    length: PositiveInt = 8
    """m, the number of virtual tokens (docs/methods.md 8(g) explores 4..100; ``method=lora`` is the m = 0 case)."""
    sharing: Sharing = "shared+per_task"
    """Seeds: one ``shared`` E (task-agnostic), ``per_task`` E_t, ``shared+per_task`` E + E_t (E_t = 0 at
    init), or ``mpt``: E ⊙ (u_t v_t^T) with rank ``mpt_rank`` (peft MultitaskPromptEmbedding). All but
    ``shared`` need task ids (docs/methods.md 8(d): the mtpeft default is shared encoder + per-task seeds)."""
    mpt_rank: PositiveInt = 4
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


@config_dataclass
class PemlConfig(MethodConfig):
    prompt: PromptConfig = field(default_factory=PromptConfig)
    """Continuous prompts: placement, length, sharing across tasks, seed init and encoder."""
    lora: LoraMethodConfig = field(default_factory=LoraMethodConfig)
    """The LoRA part, exactly ``method=lora``'s options (r 8, alpha 16, q,k,v,o; docs/methods.md 3)."""
    lr_prompt: PositiveFloat | None = None
    """Learning rate of the seeds and the encoder; null = the optimiser's lr. docs/methods.md 8(g): prompts
    usually want a larger lr (1e-3 .. 3e-2) than LoRA."""
    lr_lora: PositiveFloat | None = None
    """Learning rate of the LoRA matrices; null = the optimiser's lr (docs/methods.md 8(g): 1e-4 .. 3e-4)."""
    reparam_at_inference: Bool = False
    """In eval mode, encode the prompts once, cache them and skip the encoder (outputs unchanged);
    the cache is rebuilt whenever a prompt parameter changes (docs/methods.md 8(g) ``reparam_at_inference``)."""
