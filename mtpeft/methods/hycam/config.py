"""`HyCAMConfig`: every HyCAM switch, with its source (paper, reference code, or ours).

Reference code = Applied-Machine-Learning-Lab/HyCAM @ 8280ae4 (``self_utils.py``, ``main.py``); see
docs/methods.md section 2(i) for the behaviours of that code which the defaults deliberately do not reproduce.
"""

from __future__ import annotations

from typing import Literal

from mtpeft.adapters.base import MethodConfig
from mtpeft.utils.schema import Bool, NonNegativeFloat, PositiveFloat, PositiveInt, config_dataclass


@config_dataclass
class HyCAMConfig(MethodConfig):
    num_specialised: PositiveInt = 4
    """N_s, specialised low-rank CAMs per layer (reference ``--multi_classes``, argparse default 2; the
    paper's value is unverified; ours: 4, the docs/methods.md 2(h) example)."""
    rank: PositiveInt = 8
    """r of each specialised CAM (reference ``--lora_dim``, default 0 crashes; ours: 8, as the LoRA baseline)."""
    alpha: PositiveFloat = 32.0
    """Scale numerator, c = alpha / r (reference code: ``lora_alpha = 32`` hard-coded)."""
    apply_to: Literal["residual_sum", "attn_output"] = "residual_sum"
    """Where m acts. ``residual_sum``: h' = (h + a) ⊙ m (reference code, the only verified form, default for
    reproduction per docs/methods.md 2(b)); ``attn_output``: h' = h + a ⊙ m (paper text / figure caption)."""
    routing: Literal["hard_gumbel", "soft_gumbel", "softmax"] = "hard_gumbel"
    """``hard_gumbel``: one CAM per token, straight-through Gumbel-softmax (reference code, ``hard=True``);
    ``soft_gumbel``: Gumbel-softmax weights over all CAMs (README/paper: "soft routing");
    ``softmax``: softmax(z / tau) without noise (ours)."""
    tau: PositiveFloat = 0.5
    """Gumbel-softmax / softmax temperature (reference code: 0.5)."""
    eval_noise: Bool = False
    """Draw Gumbel noise in eval mode too (true = reference code, stochastic inference). False (ours):
    deterministic eval routing, argmax one-hot for ``hard_gumbel``, softmax(z / tau) otherwise."""
    balance_coef: NonNegativeFloat = 0.01
    """λ of the load-balancing loss L_bal = Σ_k mean(p_k)·mean(softmax(z)_k) over non-padding tokens of all
    layers (README formula; never added to the loss in the reference code, λ unverified). Ours: 0.01, the
    Switch/Mixtral/MixLoRA coefficient; 0 disables it."""
    router_trainable: Bool = True
    """Train the router (paper). False reproduces the reference code, whose router matches none of the
    trainable-name substrings and stays at its random init (the router is still saved with the adapter)."""
    train_layernorms: Bool = False
    """Also train the input / post-attention RMSNorm weights, 2·d·L parameters (true = reference code,
    substring ``layernorm``; ours: false, not part of the CAM design)."""
    use_shared: Bool = True
    """Shared full-rank CAM (paper). False: specialised-only ablation, m = 1 + Σ_k g_k m_k (ours)."""
    use_specialised: Bool = True
    """Specialised CAMs and their router (paper). False: shared-only ablation, m = m_shared (ours)."""
    bias: Bool = True
    """Biases on the shared and specialised CAM projections (reference ``use_CAM_Bias``, on by default).
    The router always has a bias (reference ``nn.Linear(d, N_s)``)."""
    dispatch: Literal["sparse", "dense"] = "sparse"
    """Hard routing only. ``sparse`` (ours): each specialised CAM runs on its own tokens (sorted gather,
    scatter-add); same forward and CAM gradients as ``dense``, but the router's straight-through
    gradient comes only from the selected CAM's gate. ``dense``: all N_s CAMs on every token, masked by the
    one-hot (reference code; exact straight-through router gradient, N_s times the cost)."""
    init_weights: Bool = True
    """True: zero shared weight and zero B, so m = 1 at init (reference ``load_CAM_model``). False (ours,
    for tests): Kaiming-uniform shared weight and B, a non-identity start."""

    def __post_init__(self) -> None:
        """Cross-field check (the layer prefixes the message with ``method``)."""
        if not (self.use_shared or self.use_specialised):
            raise ValueError("use_shared and use_specialised are both false: enable at least one")

    @property
    def scale(self) -> float:
        """c = alpha / r, applied to B's output (bias included) inside the SiLU."""
        return self.alpha / self.rank
