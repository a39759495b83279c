"""HyCAM, Hybrid Contextual Attention Modulation (Pan et al., CIKM 2025; docs/methods.md section 2).

Per decoder layer, a context-dependent gate m ∈ R^d rescales what the frozen attention block writes into
the residual stream::

      h ──► RMSNorm_in ──► u ──► SelfAttn (frozen) ──► a
                           │
                           ├─► shared CAM:  m_sh = SiLU(W_sh u + b_sh) + 1            (d×d, W_sh = 0 at init)
                           ├─► router:      z = W_g u + b_g (fp32),  g = GumbelSoftmax(z, tau)
                           └─► CAM k:       m_k = SiLU(c·(B_k(N_k(A_k u + bA_k) + bN_k) + bB_k)),  c = alpha/r
                                                                                        (B_k = 0 at init)
      m  = m_sh + Σ_k g_k m_k                                     (m ≡ 1 at init: identity)
      h' = (h + a) ⊙ m        apply_to=residual_sum (reference code)
      h' =  h + a ⊙ m         apply_to=attn_output  (paper text)
      out = h' + MLP(RMSNorm_post(h'))                            (frozen)

Load balancing (README formula, over the non-padding tokens of all layers, weight ``balance_coef``):
``L_bal = Σ_k mean(p_k) · mean(softmax(z)_k)``. Trainable parameters, docs/methods.md 2(h), per layer:
``(d² + d) + N_s(2dr + r² + 2r + d) + (d N_s + N_s) [+ 2d with train_layernorms]``.

Files: `config.py` (the switches and their sources), `layer.py` (the CAMs of one layer and the hooks
around ``self_attn``), `model.py` (the registered `HyCAM` adapted model). The routing record, the balance
loss and the statistics use the functions shared with MoE-LoRA (`mtpeft.adapters.routing`).
"""

from mtpeft.methods.hycam.config import HyCAMConfig
from mtpeft.methods.hycam.model import HyCAM

__all__ = ["HyCAM", "HyCAMConfig"]
