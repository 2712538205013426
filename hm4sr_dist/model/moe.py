"""The two levels of the hierarchical mixture of experts (paper §4.2).

Both are soft MoEs: every expert runs on every position (no routing capacity, no dropped tokens),
which also keeps ZeRO from hanging on experts that receive nothing on one rank.
Experts are batched into single tensors, never looped over.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class InteractiveMoE(nn.Module):
    """Eq. 7-10. Each of the M target modalities routes k1 experts that read all modalities.

    e_inter = [e_id; e_txt; e_img]                           (eq. 7, width M*d)
    g^m = softmax(W_{1,m} e_m + b_{1,m})                     (eq. 9, gate sees its own modality)
    x^inter_m = alpha_m * sum_i g^m_i (W_{i,m} e_inter + b_{i,m})   (eq. 8, M*d -> d per expert)
    e'_m = e_m + x^inter_m                                   (eq. 10)
    """

    def __init__(self, n_modalities: int, hidden_size: int, n_experts: int, alpha_init: list[float],
                 init_std: float = 0.02):
        super().__init__()
        m, d, k = n_modalities, hidden_size, n_experts
        self.m, self.d, self.k = m, d, k
        # All M*k expert projections as one (M*d -> M*k*d) linear map: one GEMM per forward.
        self.experts = nn.Linear(m * d, m * k * d)
        self.gate_weight = nn.Parameter(torch.empty(m, d, k))
        self.gate_bias = nn.Parameter(torch.zeros(m, k))
        self.alpha = nn.Parameter(torch.tensor(alpha_init, dtype=torch.float32))
        nn.init.normal_(self.experts.weight, std=init_std)
        nn.init.zeros_(self.experts.bias)
        nn.init.normal_(self.gate_weight, std=init_std)

    def expert_weight(self, target: int, expert: int) -> tuple[Tensor, Tensor]:
        """(W_{i,m} of shape (d, M*d), b_{i,m} of shape (d,)) for reading and tests."""
        rows = slice((target * self.k + expert) * self.d, (target * self.k + expert + 1) * self.d)
        return self.experts.weight[rows], self.experts.bias[rows]

    def forward(self, e: Tensor) -> tuple[Tensor, Tensor]:
        """e: (..., M, d) -> (e' of the same shape, gate weights (..., M, k1))."""
        lead = e.shape[:-2]
        expert_out = self.experts(e.flatten(-2)).view(*lead, self.m, self.k, self.d)   # (..., M, k, d)
        gates = torch.softmax(torch.einsum("...md,mdk->...mk", e, self.gate_weight) + self.gate_bias, -1)
        mixed = (gates.unsqueeze(-1) * expert_out).sum(-2)                              # (..., M, d)
        return e + self.alpha.unsqueeze(-1) * mixed, gates


class TemporalMoE(nn.Module):
    """Eq. 14-16. Time embeddings route k2 element-wise experts over e_temp = [e'_id; e'_txt; e'_img].

    g' = softmax(W_2 [r_1; r_2] + b_2)                       (eq. 14)
    x_temp = sum_i g'_i * (W^temp_i ⊙ e_temp)                (eq. 16; no residual)

    The expert weights are a registered Parameter (the authors' code kept them in a Python list,
    so they were never trained or saved). They start near 1 (identity) with a little noise so the
    experts, and hence the gate's gradients, differ from the first step.
    """

    def __init__(self, width: int, time_width: int, n_experts: int, init_std: float = 0.02):
        super().__init__()
        self.gate = nn.Linear(time_width, n_experts)
        self.expert_weight = nn.Parameter(1.0 + init_std * torch.randn(n_experts, width))

    def forward(self, e_temp: Tensor, time_embedding: Tensor) -> tuple[Tensor, Tensor]:
        """e_temp: (..., M*d); time_embedding: (..., time_width) -> (x_temp (..., M*d), gates (..., k2))."""
        gates = torch.softmax(self.gate(time_embedding), dim=-1)
        # sum_i g'_i (W_i ⊙ e) == (sum_i g'_i W_i) ⊙ e: one (k2 x M*d) matmul instead of k2 products.
        return (gates @ self.expert_weight) * e_temp, gates
