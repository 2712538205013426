"""hm4sr_dist.model.dropout and the encoder's explicit CPU attention: the same semantics as
F.dropout / F.scaled_dot_product_attention, with the dropout mask drawn from `rand >= p`.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from hm4sr_dist.model import dropout as fast_dropout
from hm4sr_dist.model.encoder import SequenceEncoder, causal_attention, explicit_causal_attention
from hm4sr_tiny import D, L, randomize_, tiny_model_cfg

B, H = 5, 2
SEQ_LEN = torch.tensor([7, 3, 1, 5, 2])                      # right padding, as in tiny_batch


def _qkv(dtype=torch.float64, seed=0):
    """(B, H, L, d_h) q, k, v; padded slots hold large, different values (they must not matter)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(3):
        t = torch.randn(B, H, L, D // H, generator=g, dtype=dtype)
        for row, n in enumerate(SEQ_LEN.tolist()):
            t[row, :, n:] = 30 * torch.randn(H, L - n, D // H, generator=g, dtype=dtype)
        out.append(t)
    return out


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


# ---------------------------------------------------------------- attention, no dropout


def test_explicit_attention_equals_sdpa_in_float64():
    q, k, v = _qkv()
    got = explicit_causal_attention(q, k, v, 0.0)
    assert torch.isfinite(got).all()                         # no all -inf row, even on padded rows
    assert_close(got, _sdpa(q, k, v), rtol=1e-12, atol=1e-12)
    # and the dispatcher is SDPA itself in eval mode and with p = 0 in training
    assert torch.equal(causal_attention(q, k, v, 0.5, training=False), _sdpa(q, k, v))
    assert torch.equal(causal_attention(q, k, v, 0.0, training=True), _sdpa(q, k, v))


def test_explicit_attention_is_causal_and_rows_are_distributions():
    q, k, v = _qkv()
    """Read the probabilities off a one-hot v: rows sum to 1 (so no row was all -inf: query i
    always keeps key 0, padded rows included) and nothing above the diagonal."""
    eye = torch.eye(L, dtype=torch.float64).expand(B, H, L, L)
    probs = explicit_causal_attention(q, k, eye, 0.0)
    assert torch.isfinite(probs).all()
    assert_close(probs.sum(-1), torch.ones(B, H, L, dtype=torch.float64), rtol=0, atol=1e-12)
    assert (probs.triu(1) == 0).all()                        # key j > query i gets nothing
    assert torch.equal(probs[..., 0, 0], torch.ones(B, H, dtype=torch.float64))    # row 0: key 0 only


def test_explicit_attention_in_half_precision_matches_sdpa_math():
    q, k, v = (t.to(torch.bfloat16) for t in _qkv(torch.float32))
    got = explicit_causal_attention(q, k, v, 0.0)
    assert got.dtype == torch.bfloat16
    expected = _sdpa(q.float(), k.float(), v.float()).to(torch.bfloat16)
    assert_close(got.float(), expected.float(), rtol=0, atol=0)


def _sdpa_encoder_reference(encoder: SequenceEncoder, seq, seq_len):
    """SequenceEncoder.forward as it was before the CPU path: hidden dropout off (eval), SDPA."""
    h = encoder.norm(seq)
    for layer in encoder.layers:
        att = layer.attention
        b, n, d = h.shape
        q, k, v = att.qkv(h).view(b, n, 3, att.n_heads, d // att.n_heads).permute(2, 0, 3, 1, 4)
        y = att.out(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, n, d))
        h = layer.attn_norm(h + y)
        h = layer.ffn_norm(h + layer.ffn(h))
    return h[torch.arange(b), seq_len - 1]


def test_encoder_in_eval_equals_the_sdpa_encoder():
    encoder = randomize_(SequenceEncoder(tiny_model_cfg(hidden_dropout=0.5, attn_dropout=0.5)), seed=5)
    encoder = encoder.double().eval()
    seq = torch.randn(B, L, D, dtype=torch.float64)
    with torch.no_grad():
        assert_close(encoder(seq, SEQ_LEN), _sdpa_encoder_reference(encoder, seq, SEQ_LEN), rtol=0, atol=0)


def test_encoder_training_path_with_dropout_disabled_equals_sdpa(monkeypatch):
    """In training with attn_dropout > 0 the CPU encoder takes the explicit path; with its
    dropouts made the identity it gives the eval (SDPA) output, in float64."""
    cfg = tiny_model_cfg(hidden_dropout=0.3, attn_dropout=0.5, n_layers=2)
    encoder = randomize_(SequenceEncoder(cfg), seed=6).double()
    seq = torch.randn(B, L, D, dtype=torch.float64)
    calls = []

    def identity(x, p=0.5, training=True, inplace=False):
        calls.append((p, training, tuple(x.shape)))
        return x

    monkeypatch.setattr(fast_dropout, "dropout", identity)
    got = encoder.train()(seq, SEQ_LEN)
    hidden, attn = (0.3, True, (B, L, D)), (0.5, True, (B, cfg.n_heads, L, L))
    assert calls == [hidden] + [attn, hidden, hidden] * cfg.n_layers      # input; per layer: probs, out, ffn
    with torch.no_grad():
        expected = encoder.eval()(seq, SEQ_LEN)
    assert_close(got.detach(), expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- dropout, training


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keeps_1_minus_p_scales_kept_values_and_zeroes_the_rest(p):
    n = 10 ** 6
    x = torch.randn(n).abs_().add_(0.1).requires_grad_()     # no zero in x: out != 0 <=> kept
    torch.manual_seed(123)
    expected_keep = torch.rand(n) >= p                        # the documented mask
    torch.manual_seed(123)
    out = fast_dropout.dropout(x, p, training=True)
    kept = out != 0
    assert torch.equal(kept, expected_keep)
    frac = kept.double().mean().item()
    assert abs(frac - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    scale = 1.0 / (1.0 - p)
    assert torch.equal(out[kept], x.detach()[kept] * scale)
    assert (out[~kept] == 0).all()
    # the same scaling as F.dropout's kept values
    reference = F.dropout(torch.ones(1000), p, True)
    assert torch.equal(reference[reference != 0].unique(), (torch.ones(1) * scale))
    out.backward(torch.ones(n))
    assert torch.equal(x.grad, kept.float() / (1 - p))
    assert torch.equal(x.grad, kept.float() * scale)


def test_dropout_keeps_only_a_bool_mask_for_backward():
    x = torch.randn(1000, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fast_dropout.dropout(x, 0.3, training=True)
    assert [(t.dtype, t.shape) for t in saved] == [(torch.bool, x.shape)]      # 1 byte per element
    out.sum().backward()
    assert torch.equal(x.grad != 0, out != 0)


def test_dropout_in_bfloat16_draws_float32_noise():
    torch.manual_seed(7)
    x = torch.ones(10 ** 6, dtype=torch.bfloat16)
    out = fast_dropout.dropout(x, 0.1, training=True)
    assert out.dtype == torch.bfloat16
    frac = (out != 0).double().mean().item()
    assert abs(frac - 0.9) < 5 * math.sqrt(0.09 / 10 ** 6)     # bf16 rand would keep 230/256 = 0.8984


def test_dropout_one_gives_zeros_and_zero_gradient():
    x = torch.randn(100, 8, requires_grad=True)
    out = fast_dropout.dropout(x, 1.0, training=True)
    assert torch.equal(out, torch.zeros_like(x))
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    q, k, v = _qkv()
    assert torch.equal(causal_attention(q, k, v, 1.0, training=True), torch.zeros_like(q))


def test_eval_p0_and_non_cpu_are_f_dropout(monkeypatch):
    x = torch.randn(10, 8)
    assert fast_dropout.dropout(x, 0.5, training=False) is x                   # F.dropout returns it
    assert torch.equal(fast_dropout.dropout(x, 0.0, training=True), x)
    calls = []
    monkeypatch.setattr(F, "dropout", lambda x, p, training, inplace: calls.append(x.device.type) or x)
    fast_dropout.dropout(torch.empty(10, 8, device="meta"), 0.5, training=True)  # any non-CPU device
    fast_dropout.dropout(x, 0.5, training=True)                                   # CPU: not F.dropout
    assert calls == ["meta"]


def test_dropout_is_reproducible_under_a_seed():
    x = torch.randn(50, 64)
    torch.manual_seed(11)
    a = fast_dropout.dropout(x, 0.5, training=True)
    torch.manual_seed(11)
    b = fast_dropout.dropout(x, 0.5, training=True)
    c = fast_dropout.dropout(x, 0.5, training=True)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ---------------------------------------------------------------- attention dropout


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_attention_dropout_is_softmax_then_the_rand_mask_then_matmul(p):
    q, k, v = _qkv()
    torch.manual_seed(3)
    got = causal_attention(q, k, v, p, training=True)
    torch.manual_seed(3)
    keep = torch.rand(B, H, L, L, dtype=torch.float64) >= p
    future = torch.ones(L, L, dtype=torch.bool).triu(1)
    logits = (q @ k.transpose(-1, -2) / math.sqrt(D // H)).masked_fill(future, -math.inf)
    expected = (torch.softmax(logits, -1) * keep / (1 - p)) @ v
    assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got, _sdpa(q, k, v))           # something was dropped


def test_attention_with_tiny_dropout_approaches_sdpa():
    q, k, v = _qkv()
    assert_close(causal_attention(q, k, v, 1e-12, training=True), _sdpa(q, k, v), rtol=1e-10, atol=1e-10)


def test_encoder_in_training_is_reproducible_and_finite():
    cfg = tiny_model_cfg(hidden_dropout=0.5, attn_dropout=0.5)
    encoder = randomize_(SequenceEncoder(cfg), seed=4).train()
    seq = torch.randn(B, L, D)
    torch.manual_seed(0)
    a = encoder(seq, SEQ_LEN)
    torch.manual_seed(0)
    b = encoder(seq, SEQ_LEN)
    torch.manual_seed(1)
    c = encoder(seq, SEQ_LEN)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


# ---------------------------------------------------------------- checkpoints


def test_dropout_modules_hold_no_state_and_keys_are_unchanged():
    cfg = tiny_model_cfg(n_layers=2)
    encoder = SequenceEncoder(cfg)
    dropouts = [encoder.dropout] + [layer.dropout for layer in encoder.layers]
    for module in dropouts:
        assert isinstance(module, nn.Dropout) and module.p == cfg.hidden_dropout
        assert not list(module.parameters()) and not list(module.buffers())
    keys = set(encoder.state_dict())
    assert not any("dropout" in key for key in keys)
    per_layer = {"attention.qkv.weight", "attention.qkv.bias", "attention.out.weight", "attention.out.bias",
                 "attn_norm.weight", "attn_norm.bias", "ffn.0.weight", "ffn.0.bias", "ffn.2.weight",
                 "ffn.2.bias", "ffn_norm.weight", "ffn_norm.bias"}
    assert keys == {"norm.weight", "norm.bias"} | {f"layers.{i}.{k}" for i in range(2) for k in per_layer}
