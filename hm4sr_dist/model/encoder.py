"""Per-modality sequence encoder, eq. 17-18: S' = Dropout(LayerNorm(S)); H = Transformer(S').

A left-to-right (causal) Transformer in RecBole's post-LayerNorm arrangement (the authors' base):
each sub-layer is LayerNorm(x + Dropout(sublayer(x))). With right padding and a causal mask, a
real position only ever attends to earlier real positions, so padding cannot leak into outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hm4sr_dist.config import ModelConfig


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
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.attn_dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, length, d))


class TransformerLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.hidden_size
        self.attention = CausalSelfAttention(d, cfg.n_heads, cfg.attn_dropout)
        self.attn_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.inner_size), nn.GELU(), nn.Linear(cfg.inner_size, d))
        self.ffn_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.attn_norm(x + self.dropout(self.attention(x)))
        return self.ffn_norm(x + self.dropout(self.ffn(x)))


class SequenceEncoder(nn.Module):
    """Eq. 17-18 for one modality: (B, L, d) sequence -> (B, d) vector at the last real position."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        self.layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.n_layers))

    def forward(self, seq: Tensor, seq_len: Tensor) -> Tensor:
        h = self.dropout(self.norm(seq))
        for layer in self.layers:
            h = layer(h)
        last = (seq_len - 1).view(-1, 1, 1).expand(-1, 1, h.shape[-1])
        return h.gather(1, last).squeeze(1)                                            # (B, d)
