"""Prompt seeds and prompt encoders: ``P = f_θ(E)`` for every task at once (docs/methods.md 8(b)).

Seeds ``E`` have shape ``[T_p, m, e]`` (T_p = 1 for ``shared``, else the number of tasks T) and the
encoder maps each task's m seeds to m prompt vectors of width ``out`` (d in input mode, L·2·d_kv in deep
mode). Encoders see the m seeds of one task as a sequence, so LSTM and transformer encoders mix virtual
tokens; mlp and residual_mlp act per token. Written after peft's ``PromptEncoder`` (P-tuning MLP / LSTM),
``PrefixEncoder`` (prefix projection) and ``MultitaskPromptEmbedding`` (MPT), not copied from them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from mtpeft.methods.peml.config import EncoderConfig, PromptConfig

INIT_STD = 0.02  # docs/methods.md 8(f): random seeds N(0, 0.02); peft MPT factors use the same std
_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}
_FUNCTIONAL = {"relu": torch.relu, "gelu": nn.functional.gelu, "tanh": torch.tanh}


class PromptSeeds(nn.Module):
    """Trainable seeds per ``sharing`` mode; ``forward()`` returns ``E`` of shape [T_p, m, e].

    ``from_tokens`` (``init: vocab``) maps token ids [rows, m] to seeds [rows, m, e]; the ids are drawn
    uniformly from the vocabulary (peft ``PromptTuningInit.SAMPLE_VOCAB``) and kept in ``init_token_ids``.
    """

    def __init__(
        self,
        cfg: PromptConfig,
        num_tasks: int,
        width: int,
        from_tokens: Callable[[torch.Tensor], torch.Tensor] | None = None,
        vocab_size: int = 0,
    ) -> None:
        super().__init__()
        self.sharing = cfg.sharing
        self.init_token_ids: list[torch.Tensor] = []
        m = cfg.length

        def init(rows: int) -> torch.Tensor:
            if from_tokens is None:
                return torch.randn(rows, m, width) * INIT_STD
            ids = torch.randint(0, vocab_size, (rows, m))
            self.init_token_ids.append(ids)
            return from_tokens(ids).detach().float().reshape(rows, m, width).cpu().clone()

        if cfg.sharing in ("shared", "shared+per_task", "mpt"):
            self.shared = nn.Parameter(init(1)[0])
        if cfg.sharing == "per_task":
            self.per_task = nn.Parameter(init(num_tasks))
        elif cfg.sharing == "shared+per_task":
            self.per_task = nn.Parameter(torch.zeros(num_tasks, m, width))  # every task starts from E
        elif cfg.sharing == "mpt":
            rank = cfg.mpt_rank
            start = 1.0 / math.sqrt(rank)  # u_t v_t^T ≈ 1: P_t starts as the shared prompt (ours)
            self.mpt_u = nn.Parameter(start + torch.randn(num_tasks, m, rank) * INIT_STD)
            self.mpt_v = nn.Parameter(start + torch.randn(num_tasks, rank, width) * INIT_STD)

    def forward(self) -> torch.Tensor:
        if self.sharing == "shared":
            return self.shared.unsqueeze(0)
        if self.sharing == "per_task":
            return self.per_task
        if self.sharing == "shared+per_task":
            return self.shared.unsqueeze(0) + self.per_task
        return self.shared.unsqueeze(0) * torch.bmm(self.mpt_u, self.mpt_v)  # MPT: E ⊙ (u_t v_t^T)


def _mlp(widths: list[int], activation: str, dropout: float) -> nn.Sequential:
    """Linear layers through ``widths`` with activation + dropout between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(widths) - 2:
            layers += [_ACTIVATIONS[activation](), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


class LSTMEncoder(nn.Module):
    """P-tuning's LSTM reparameterisation: bi-LSTM (width h per direction) + MLP head 2h → 2h → out."""

    def __init__(self, cfg: EncoderConfig, width: int, out: int, hidden: int) -> None:
        super().__init__()
        dropout = cfg.dropout if cfg.layers > 1 else 0.0  # nn.LSTM applies it between layers only
        self.lstm = nn.LSTM(width, hidden, cfg.layers, dropout=dropout, bidirectional=True, batch_first=True)
        self.head = _mlp([2 * hidden, 2 * hidden, out], cfg.activation, cfg.dropout)

    def forward(self, seeds: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(seeds)[0])


class TransformerEncoder(nn.Module):
    """Pre-norm transformer layers (FFN width h) over the m seeds, then a projection if out ≠ e."""

    def __init__(self, cfg: EncoderConfig, width: int, out: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                width,
                cfg.heads,
                hidden,
                cfg.dropout,
                activation=_FUNCTIONAL[cfg.activation],
                batch_first=True,
                norm_first=True,
            )
            for _ in range(cfg.layers)
        )
        self.head = nn.Linear(width, out) if out != width else nn.Identity()

    def forward(self, seeds: torch.Tensor) -> torch.Tensor:
        x = seeds
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class ResidualMLPEncoder(nn.Module):
    """Blocks ``x + W2 act(W1 x)`` (e → h → e) with W2 = 0 at init, then a projection if out ≠ e."""

    def __init__(self, cfg: EncoderConfig, width: int, out: int, hidden: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            _mlp([width, hidden, width], cfg.activation, cfg.dropout) for _ in range(cfg.layers)
        )
        for block in self.blocks:
            nn.init.zeros_(block[-1].weight)
            nn.init.zeros_(block[-1].bias)
        self.head = nn.Linear(width, out) if out != width else nn.Identity()

    def forward(self, seeds: torch.Tensor) -> torch.Tensor:
        x = seeds
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def build_encoder(cfg: EncoderConfig, width: int, out: int, hidden: int) -> nn.Module:
    """The encoder f_θ mapping seeds [N, m, width] to prompts [N, m, out]."""
    if cfg.type == "identity":
        if width != out:
            raise ValueError(f"identity encoder needs seed width {width} == prompt width {out}")
        return nn.Identity()
    if cfg.type == "mlp":  # layers=2: peft P-tuning MLP (3 linears); layers=1: peft prefix projection
        return _mlp([width] + [hidden] * cfg.layers + [out], cfg.activation, cfg.dropout)
    if cfg.type == "lstm":
        return LSTMEncoder(cfg, width, out, hidden)
    if cfg.type == "transformer":
        if width % cfg.heads:
            raise ValueError(
                f"method.prompt.encoder.heads={cfg.heads} must divide the seed width {width} "
                "(the model's hidden size) for encoder.type=transformer"
            )
        return TransformerEncoder(cfg, width, out, hidden)
    return ResidualMLPEncoder(cfg, width, out, hidden)


class PromptModule(nn.Module):
    """Seeds + encoder: ``forward()`` returns the prompt table [T_p, m, out] for all tasks."""

    def __init__(
        self, cfg: PromptConfig, num_tasks: int, width: int, out: int, hidden: int, **seed_init
    ) -> None:
        super().__init__()
        self.seeds = PromptSeeds(cfg, num_tasks, width, **seed_init)
        self.encoder = build_encoder(cfg.encoder, width, out, hidden)

    def forward(self) -> torch.Tensor:
        return self.encoder(self.seeds())
