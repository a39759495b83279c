"""One decoder layer's CAMs: shared full-rank CAM, N_s specialised low-rank CAMs, their router, and the
forward hooks that apply the modulation around the frozen ``self_attn`` (no modelling code copied).

Hooks (registered by `CAMLayer.attach`):

* a forward pre-hook on ``input_layernorm`` keeps its input h (the residual stream; ``residual_sum`` only);
* a forward hook on ``self_attn`` reads u (its ``hidden_states`` input, i.e. RMSNorm_in(h)) and replaces the
  attention output a by a' with δ = m - 1, so that the layer's own ``h + a'`` is the HyCAM output::

      residual_sum:  a' = a + (h + a) ⊙ δ    →  h + a' = (h + a) ⊙ m
      attn_output:   a' = a + a ⊙ δ          →  h + a' = h + a ⊙ m

Working with δ instead of m keeps the init exact: δ = SiLU(0) = 0, so a' == a bit for bit. Both hooks run
inside the decoder layer's ``forward``, so a gradient-checkpointing recompute replays them; the routing
record (for the balance loss and statistics) is written only by the real forward, never by a recompute.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mtpeft.adapters.lowrank import kaiming_uniform_
from mtpeft.adapters.routing import RouterRecord
from mtpeft.methods.hycam.config import HyCAMConfig


class CallContext:
    """Per-call state shared by a model's CAM layers: the non-padding mask of the tokens being run."""

    token_mask: torch.Tensor | None = None  # float [B·S] of the current base-model call, or None (all real)


def _in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. a gradient-checkpointing recompute)."""
    if torch.compiler.is_compiling():  # compiled recomputes run inside the compiled backward, not here
        return False
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


class CAMLayer(nn.Module):
    """The HyCAM parameters of one decoder layer and the computation of δ = m - 1 from u."""

    def __init__(self, hidden: int, config: HyCAMConfig, context: CallContext) -> None:
        super().__init__()
        self.config = config
        self.context = context
        self.record: RouterRecord | None = None  # routing of the last forward (not of a recompute)
        self._residual: torch.Tensor | None = None
        d, n, r = hidden, config.num_specialised, config.rank
        if config.use_shared:
            self.shared = nn.Linear(d, d, bias=config.bias)
        if config.use_specialised:
            self.router = nn.Linear(d, n)
            self.spec_A = nn.Parameter(torch.empty(n, r, d))
            self.spec_N = nn.Parameter(torch.empty(n, r, r))
            self.spec_B = nn.Parameter(torch.empty(n, d, r))
            for name, width in (("spec_A_bias", r), ("spec_N_bias", r), ("spec_B_bias", d)):
                self.register_parameter(name, nn.Parameter(torch.zeros(n, width)) if config.bias else None)
        self.reset_parameters()

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles leave out the per-call state (tensors of the last forward's graph)."""
        return {**self.__dict__, "record": None, "_residual": None}

    def reset_parameters(self) -> None:
        """Reference ``load_CAM_model`` init: shared W = 0, A/N Kaiming-uniform, B = 0, biases 0;
        router N(0, 0.02) with zero bias. ``init_weights=False`` makes shared W and B random."""
        cfg = self.config
        if cfg.use_shared:
            (kaiming_uniform_ if not cfg.init_weights else nn.init.zeros_)(self.shared.weight)
            if self.shared.bias is not None:
                nn.init.zeros_(self.shared.bias)
        if cfg.use_specialised:
            nn.init.normal_(self.router.weight, std=0.02)
            nn.init.zeros_(self.router.bias)
            kaiming_uniform_(self.spec_A)
            kaiming_uniform_(self.spec_N)
            (kaiming_uniform_ if not cfg.init_weights else nn.init.zeros_)(self.spec_B)
            for bias in (self.spec_A_bias, self.spec_N_bias, self.spec_B_bias):
                if bias is not None:
                    nn.init.zeros_(bias)

    # -- hooks ------------------------------------------------------------------------------------
    def attach(self, decoder_layer: nn.Module) -> list[Any]:
        """Register the hooks on ``decoder_layer.input_layernorm`` / ``.self_attn``; return the handles."""
        handles = [decoder_layer.self_attn.register_forward_hook(self._modulate, with_kwargs=True)]
        if self.config.apply_to == "residual_sum":
            hook = decoder_layer.input_layernorm.register_forward_pre_hook(
                self._keep_residual, with_kwargs=True
            )
            handles.append(hook)
        return handles

    def _keep_residual(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._residual = args[0] if args else kwargs["hidden_states"]

    def _modulate(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        u = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        attn, *rest = output if isinstance(output, tuple) else (output,)
        delta = self.delta(u)
        if self.config.apply_to == "residual_sum":
            residual, self._residual = self._residual, None
            if residual is None or residual.shape != attn.shape:
                raise RuntimeError(
                    "HyCAM apply_to=residual_sum: the input of input_layernorm was not captured before "
                    "self_attn ran; this decoder layer does not follow the pre-norm Llama/Qwen2/Mistral layout"
                )
            new = torch.addcmul(attn, residual + attn, delta)
        else:
            new = torch.addcmul(attn, attn, delta)
        return (new, *rest) if isinstance(output, tuple) else new

    # -- computation ------------------------------------------------------------------------------
    def delta(self, u: torch.Tensor) -> torch.Tensor:
        """δ = m - 1 = SiLU(u W_sh^T + b_sh) + Σ_k g_k m_k for u [..., d] (terms per the ablation switches)."""
        cfg = self.config
        x = u.reshape(-1, u.shape[-1]).to(next(self.parameters()).dtype)  # CAMs may be fp32 on a bf16 base
        shared = F.silu(self.shared(x)) if cfg.use_shared else None
        if not cfg.use_specialised:
            return shared.to(u.dtype).view_as(u)
        logits = F.linear(x.float(), self.router.weight.float(), self.router.bias.float())  # fp32 router
        gates, index = self.route(logits)
        if index is not None and cfg.dispatch == "sparse":
            # torch.compile: per-CAM slice sizes are data, so every CAM runs and each token's is gathered
            sparse = self.gathered_specialised if torch.compiler.is_compiling() else self.sparse_specialised
            out = sparse(x, gates.gather(1, index[:, None]), index, shared)
        else:
            spec = torch.einsum("tn,tnd->td", gates.to(x.dtype), self.dense_specialised(x))
            out = spec if shared is None else shared + spec
        if not _in_backward():
            self._record(logits, gates)
        return out.to(u.dtype).view_as(u)

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gates g [T, N_s] (fp32) and, for hard routing, each token's CAM index [T].

        Hard gates are the exact one-hot plus the straight-through term (y - y.detach()), which is 0 in
        value and carries the gradient of y = softmax((z + gumbel) / tau).
        """
        cfg = self.config
        noisy = cfg.routing != "softmax" and (self.training or cfg.eval_noise)
        if noisy:
            gumbel = -torch.empty_like(logits).exponential_().log()
            soft = ((logits + gumbel) / cfg.tau).softmax(dim=-1)
        else:
            soft = (logits / cfg.tau).softmax(dim=-1)
        if cfg.routing != "hard_gumbel":
            return soft, None
        index = soft.argmax(dim=-1)
        hard = F.one_hot(index, cfg.num_specialised).to(soft.dtype)
        return hard + (soft - soft.detach()), index

    def _scaled_B(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        c = self.config.scale
        return self.spec_B * c, (self.spec_B_bias * c if self.spec_B_bias is not None else None)

    def dense_specialised(self, x: torch.Tensor) -> torch.Tensor:
        """m_k(x) = SiLU(c·(B_k(N_k(A_k x + bA_k) + bN_k) + bB_k)) for every CAM k: [T, N_s, d]."""
        n, r, d = self.spec_A.shape
        h = F.linear(x, self.spec_A.reshape(n * r, d), _flat(self.spec_A_bias)).view(-1, n, r)
        h = torch.einsum("tns,nrs->tnr", h, self.spec_N)
        if self.spec_N_bias is not None:
            h = h + self.spec_N_bias
        weight, bias = self._scaled_B()
        out = torch.einsum("tnr,ndr->tnd", h, weight)
        return F.silu(out + bias if bias is not None else out)

    def sparse_specialised(
        self, x: torch.Tensor, gate: torch.Tensor, index: torch.Tensor, shared: torch.Tensor | None
    ) -> torch.Tensor:
        """shared + g_t · m_{index_t}(x_t), each CAM run on its own tokens only (sorted gather, scatter-add).

        ``gate`` [T, 1] is exactly 1 in value; it is multiplied in only when it carries a gradient.
        """
        n = self.spec_A.shape[0]
        order = index.argsort()
        counts = torch.bincount(index, minlength=n).tolist()
        weight_b, bias_b = self._scaled_B()
        outs = []
        for k, chunk in enumerate(x.index_select(0, order).split(counts)):
            h = F.linear(chunk, self.spec_A[k], _row(self.spec_A_bias, k))
            h = F.linear(h, self.spec_N[k], _row(self.spec_N_bias, k))
            outs.append(F.linear(h, weight_b[k], _row(bias_b, k)))
        routed = F.silu(torch.cat(outs))
        if gate.requires_grad:
            routed = routed * gate.index_select(0, order).to(routed.dtype)
        base = shared if shared is not None else x.new_zeros(x.shape[0], routed.shape[1])
        return base.index_add(0, order, routed)

    def gathered_specialised(
        self, x: torch.Tensor, gate: torch.Tensor, index: torch.Tensor, shared: torch.Tensor | None
    ) -> torch.Tensor:
        """`sparse_specialised` with static shapes (for torch.compile): every CAM on every token, each
        token's own CAM gathered; the same values and gradients (unchosen CAMs and gates get none)."""
        dense = self.dense_specialised(x)
        routed = dense.gather(1, index[:, None, None].expand(-1, 1, dense.shape[-1])).squeeze(1)
        if gate.requires_grad:
            routed = routed * gate.to(routed.dtype)
        return routed if shared is None else shared + routed

    def _record(self, logits: torch.Tensor, gates: torch.Tensor) -> None:
        mask = self.context.token_mask
        if mask is not None and mask.shape[0] != logits.shape[0]:
            mask = None
        self.record = RouterRecord(logits, gates=gates, mask=mask)


def _flat(bias: torch.Tensor | None) -> torch.Tensor | None:
    return bias.reshape(-1) if bias is not None else None


def _row(tensor: torch.Tensor | None, k: int) -> torch.Tensor | None:
    return tensor[k] if tensor is not None else None
