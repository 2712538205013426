"""Eq. 17-18: S' = Dropout(LayerNorm(S)); H = causal post-LN Transformer(S') at the last real position.

The reference is torch's own nn.TransformerEncoderLayer with our weights copied into it.
"""

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from hm4sr_dist.model.encoder import SequenceEncoder
from hm4sr_tiny import D, L, randomize_, tiny_model_cfg


def _reference_layers(encoder: SequenceEncoder, cfg) -> nn.ModuleList:
    layers = nn.ModuleList()
    for ours in encoder.layers:
        ref = nn.TransformerEncoderLayer(D, cfg.n_heads, dim_feedforward=cfg.inner_size, dropout=0.0,
                                         activation="gelu", layer_norm_eps=cfg.layer_norm_eps,
                                         batch_first=True, norm_first=False)
        with torch.no_grad():
            ref.self_attn.in_proj_weight.copy_(ours.attention.qkv.weight)    # rows: q, k, v
            ref.self_attn.in_proj_bias.copy_(ours.attention.qkv.bias)
            ref.self_attn.out_proj.weight.copy_(ours.attention.out.weight)
            ref.self_attn.out_proj.bias.copy_(ours.attention.out.bias)
            ref.linear1.weight.copy_(ours.ffn[0].weight)
            ref.linear1.bias.copy_(ours.ffn[0].bias)
            ref.linear2.weight.copy_(ours.ffn[2].weight)
            ref.linear2.bias.copy_(ours.ffn[2].bias)
            ref.norm1.weight.copy_(ours.attn_norm.weight)
            ref.norm1.bias.copy_(ours.attn_norm.bias)
            ref.norm2.weight.copy_(ours.ffn_norm.weight)
            ref.norm2.bias.copy_(ours.ffn_norm.bias)
        layers.append(ref)
    return layers.eval()


def _reference(encoder, layers, seq, seq_len, eps):
    h = nn.functional.layer_norm(seq, (D,), encoder.norm.weight, encoder.norm.bias, eps)   # eq. 17
    mask = nn.Transformer.generate_square_subsequent_mask(seq.shape[1])
    for layer in layers:
        h = layer(h, src_mask=mask, is_causal=True)                                             # eq. 18
    return h[torch.arange(seq.shape[0]), seq_len - 1]


@pytest.mark.parametrize("eps, n_layers, n_heads", [(1e-12, 2, 2), (1e-5, 1, 4), (1e-12, 3, 1)])
def test_encoder_matches_torch_transformer_encoder_layer(eps, n_layers, n_heads):
    cfg = tiny_model_cfg(layer_norm_eps=eps, n_layers=n_layers, n_heads=n_heads)
    encoder = randomize_(SequenceEncoder(cfg), seed=n_layers).eval()
    layers = _reference_layers(encoder, cfg)
    seq = torch.randn(5, L, D)
    seq_len = torch.tensor([7, 3, 1, 5, 2])
    with torch.no_grad():
        got = encoder(seq, seq_len)
        expected = _reference(encoder, layers, seq, seq_len, eps)
    assert got.shape == (5, D)
    assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_encoder_is_causal_and_reads_the_last_real_position():
    encoder = randomize_(SequenceEncoder(tiny_model_cfg()), seed=3).eval()
    seq = torch.randn(4, L, D)
    seq_len = torch.tensor([7, 4, 1, 6])
    base = encoder(seq, seq_len)
    after = seq.clone()
    for row, n in enumerate(seq_len.tolist()):
        after[row, n:] = 100 * torch.randn(L - n, D)                 # everything after the last real slot
    assert_close(encoder(after, seq_len), base, rtol=0, atol=1e-6)
    before = seq.clone()
    before[:, 0] += torch.randn(D)          # the first item matters to every row (not a constant shift:
                                            # eq. 17's LayerNorm removes those)
    assert ((encoder(before, seq_len) - base).abs().amax(1) > 1e-4).all()
    # H is the hidden state at seq_len - 1: a longer seq_len reads a later position
    shorter = encoder(seq, seq_len.clamp(max=2))
    assert_close(shorter[2], base[2], rtol=0, atol=0)            # seq_len 1 is unchanged
    assert ((shorter[[0, 1, 3]] - base[[0, 1, 3]]).abs().amax(1) > 1e-4).all()


def test_encoder_dropout_only_in_training():
    encoder = randomize_(SequenceEncoder(tiny_model_cfg(hidden_dropout=0.5, attn_dropout=0.5)), seed=4)
    seq, seq_len = torch.randn(3, L, D), torch.tensor([7, 5, 2])
    encoder.eval()
    assert torch.equal(encoder(seq, seq_len), encoder(seq, seq_len))
    encoder.train()
    torch.manual_seed(0)
    a = encoder(seq, seq_len)
    torch.manual_seed(1)
    b = encoder(seq, seq_len)
    assert not torch.allclose(a, b)
