"""Per-modality sequence encoder, eq. 17-18: S' = Dropout(LayerNorm(S)); H = Transformer(S').

A left-to-right (causal) Transformer in RecBole's post-LayerNorm arrangement (the authors' base):
each sub-layer is LayerNorm(x + Dropout(sublayer(x))). With right padding and a causal mask, a
real position only ever attends to earlier real positions, so padding cannot leak into outputs.

Dropout is `hm4sr_dist.model.dropout` (mask from `rand`, not `bernoulli_`, on the CPU; `F.dropout`
elsewhere). Attention dropout sits inside `F.scaled_dot_product_attention`, which draws it with
`bernoulli_` on its math path, on the largest tensors (B x H x L x L); so on the CPU in training with
attn_dropout > 0, `causal_attention` computes the attention explicitly with that dropout (same
result as SDPA's math path given the mask). In eval, with attn_dropout = 0 or on the GPU, it is SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hm4sr_dist.config import ModelConfig
from hm4sr_dist.model import dropout as fast_dropout
from hm4sr_dist.model.dropout import Dropout

_HALF = (torch.float16, torch.bfloat16)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0,
                     training: bool = False) -> Tensor:
    """Causal attention with attention dropout in training; (B, H, L, d_h) each.

    `F.scaled_dot_product_attention(is_causal=True)`, except on the CPU in training with
    dropout_p > 0: there `explicit_causal_attention`, whose dropout is `fast_dropout.dropout`.
    """
    if not training or dropout_p == 0.0 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                              dropout_p=dropout_p if training else 0.0)
    return explicit_causal_attention(q, k, v, dropout_p)


def explicit_causal_attention(q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> Tensor:
    """softmax(q k^T / sqrt(d_h) with -inf above the diagonal), dropout (training), @ v.

    Every query row i keeps keys 0..i (the mask is causal only; padding is never masked), so no
    row is all -inf. Half precision is computed in float32, as SDPA's CPU math path does.
    """
    dtype = q.dtype
    if dtype in _HALF:
        q, k, v = q.float(), k.float(), v.float()
    length = q.shape[-2]
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)                            # (B, H, L, L)
    future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)     # key j > query i
    probs = torch.softmax(scores.masked_fill_(future, float("-inf")), dim=-1)
    return (fast_dropout.dropout(probs, dropout_p, True) @ v).to(dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, n_heads: int, attn_dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.attn_dropout = attn_dropout

    def forward(self, x: Tensor) -> Tensor:
        b, length, d = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        y = causal_attention(q, k, v, self.attn_dropout, self.training)
        return self.out(y.transpose(1, 2).reshape(b, length, d))


class TransformerLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.hidden_size
        self.attention = CausalSelfAttention(d, cfg.n_heads, cfg.attn_dropout)
        self.attn_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.inner_size), nn.GELU(), nn.Linear(cfg.inner_size, d))
        self.ffn_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.hidden_dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.attn_norm(x + self.dropout(self.attention(x)))
        return self.ffn_norm(x + self.dropout(self.ffn(x)))


class SequenceEncoder(nn.Module):
    """Eq. 17-18 for one modality: (B, L, d) sequence -> (B, d) vector at the last real position."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.hidden_dropout)
        self.layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.n_layers))

    def forward(self, seq: Tensor, seq_len: Tensor) -> Tensor:
        h = self.dropout(self.norm(seq))
        for layer in self.layers:
            h = layer(h)
        last = (seq_len - 1).view(-1, 1, 1).expand(-1, 1, h.shape[-1])
        return h.gather(1, last).squeeze(1)                                            # (B, d)
