"""Eq. 7-10 (Interactive MoE) and eq. 14-16 (Temporal MoE) against explicit per-expert loops."""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from hm4sr_dist.model.moe import InteractiveMoE, TemporalMoE
from hm4sr_tiny import D, make_model, randomize_, tiny_batch

M, K1, K2 = 3, 3, 4


def _interactive(alpha=(0.7, -1.3, 0.4), seed=0):
    moe = randomize_(InteractiveMoE(M, D, K1, list(alpha)), seed)
    with torch.no_grad():
        moe.alpha.copy_(torch.tensor(alpha))
    return moe


def _interactive_by_loop(moe, e):
    """Eq. 7-10 written out per target modality m and expert i, in float64."""
    e = e.double()
    e_inter = e.flatten(-2)                                                # eq. 7: [e_id; e_txt; e_img]
    outs, gates = [], []
    for m in range(M):
        g = torch.softmax(e[..., m, :] @ moe.gate_weight[m].double() + moe.gate_bias[m].double(), -1)  # eq. 9
        mixed = 0
        for i in range(K1):
            w, b = moe.expert_weight(m, i)
            assert w.shape == (D, M * D) and b.shape == (D,)
            mixed = mixed + g[..., i:i + 1] * (e_inter @ w.double().T + b.double())                  # eq. 8
        outs.append(e[..., m, :] + moe.alpha[m].double() * mixed)                                     # eq. 10
        gates.append(g)
    return torch.stack(outs, -2), torch.stack(gates, -2)


def test_interactive_moe_matches_explicit_loop():
    moe = _interactive()
    e = torch.randn(4, 5, M, D)
    out, gates = moe(e)
    ref_out, ref_gates = _interactive_by_loop(moe, e)
    assert out.shape == e.shape and gates.shape == (4, 5, M, K1)
    assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    assert_close(gates.double(), ref_gates, rtol=1e-5, atol=1e-6)
    assert_close(gates.sum(-1), torch.ones(4, 5, M), rtol=0, atol=1e-6)


def test_interactive_gate_reads_only_its_own_modality():
    moe = _interactive()
    e = torch.randn(6, M, D)
    e2 = e.clone()
    e2[:, 1] += torch.randn(6, D)                                  # change the text vector only
    _, g1 = moe(e)
    _, g2 = moe(e2)
    assert_close(g1[:, [0, 2]], g2[:, [0, 2]], rtol=0, atol=0)     # id and image gates unchanged
    assert not torch.allclose(g1[:, 1], g2[:, 1])
    out1, _ = moe(e)
    out2, _ = moe(e2)
    assert not torch.allclose(out1[:, 0], out2[:, 0])               # but experts read every modality


def test_interactive_alpha_scales_the_mixture_and_zero_is_the_residual_only():
    e = torch.randn(5, M, D)
    moe = _interactive(alpha=(1.0, 1.0, 1.0))
    out1, _ = moe(e)
    with torch.no_grad():
        moe.alpha.copy_(torch.tensor([2.5, -0.5, 0.0]))
    out2, _ = moe(e)
    delta1 = out1 - e
    assert_close(out2 - e, delta1 * torch.tensor([2.5, -0.5, 0.0]).view(M, 1), rtol=1e-5, atol=1e-6)
    assert torch.equal(out2[:, 2], e[:, 2])                          # alpha 0: e' = e exactly
    assert delta1.abs().max() > 1e-2


def test_interactive_alpha_initial_values_in_hm4sr():
    model = make_model(randomize=False)
    assert torch.equal(model.interactive_moe.alpha.detach(), torch.tensor([0.0, 1.0, 1.0]))   # id, txt, img


def _temporal(width=M * D, time_width=2 * D, seed=0):
    moe = randomize_(TemporalMoE(width, time_width, K2), seed)
    with torch.no_grad():
        moe.expert_weight.add_(1.0)
    return moe


def test_temporal_moe_matches_explicit_loop():
    moe = _temporal()
    e = torch.randn(3, 5, M * D)
    r = torch.randn(3, 5, 2 * D)
    out, gates = moe(e, r)
    g = torch.softmax(r.double() @ moe.gate.weight.double().T + moe.gate.bias.double(), -1)    # eq. 14
    expected = sum(g[..., i:i + 1] * (moe.expert_weight[i].double() * e.double())                # eq. 16
                   for i in range(K2))
    assert gates.shape == (3, 5, K2)
    assert_close(gates.double(), g, rtol=1e-5, atol=1e-6)
    assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_temporal_moe_has_no_residual_and_unit_experts_are_identity():
    moe = _temporal()
    e, r = torch.randn(4, M * D), torch.randn(4, 2 * D)
    with torch.no_grad():
        moe.expert_weight.zero_()
    assert torch.count_nonzero(moe(e, r)[0]) == 0                   # no "+ e" anywhere
    with torch.no_grad():
        moe.expert_weight.fill_(1.0)
    assert_close(moe(e, r)[0], e, rtol=1e-6, atol=1e-6)


def test_temporal_experts_are_registered_parameters():
    moe = TemporalMoE(M * D, 2 * D, K2)
    params = dict(moe.named_parameters())
    assert isinstance(moe.expert_weight, torch.nn.Parameter)
    assert params["expert_weight"].shape == (K2, M * D) and params["expert_weight"].requires_grad
    assert "expert_weight" in moe.state_dict()
    # initialised near 1, with noise so the experts differ
    assert (moe.expert_weight - 1).abs().max() < 0.2
    assert not torch.equal(moe.expert_weight[0], moe.expert_weight[1])


def test_moe_parameters_receive_gradients_through_hm4sr():
    batch = tiny_batch()
    model = make_model(randomize=False).train()          # the model's own init: alpha_id = 0
    assert "temporal_moe.expert_weight" in model.state_dict()
    assert any(p is model.temporal_moe.expert_weight for p in model.parameters())
    out = model(batch, augment=True)
    loss = F.cross_entropy(model.scores(out.seq_repr, out.item_repr), batch.target) \
        + sum(h.square().mean() for h in out.pcl_repr.values())
    loss.backward()
    tmoe, imoe = model.temporal_moe, model.interactive_moe
    assert tmoe.expert_weight.grad is not None
    assert (tmoe.expert_weight.grad.abs().sum(1) > 0).all()          # every temporal expert
    assert tmoe.gate.weight.grad.abs().sum() > 0                       # and its gate (W_2)
    assert imoe.alpha.grad is not None
    assert (imoe.alpha.grad.abs() > 0).all()                           # every alpha_m, even alpha_id = 0
    assert imoe.gate_weight.grad is not None and imoe.experts.weight.grad is not None
    # the time embeddings behind the gate, too
    te = model.time_embedding
    assert te.time_linear.weight.grad.abs().sum() > 0 and te.interval_table.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("k1", [1, 2, 5])
def test_interactive_expert_count(k1):
    moe = randomize_(InteractiveMoE(2, D, k1, [0.5, 1.0]), seed=k1)
    e = torch.randn(3, 2, D)
    out, gates = moe(e)
    assert gates.shape == (3, 2, k1)
    w_all = torch.stack([torch.stack([moe.expert_weight(m, i)[0] for i in range(k1)]) for m in range(2)])
    b_all = torch.stack([torch.stack([moe.expert_weight(m, i)[1] for i in range(k1)]) for m in range(2)])
    # every expert row block is distinct and the blocks tile the packed Linear exactly once
    assert torch.equal(w_all.reshape(2 * k1 * D, 2 * D), moe.experts.weight)
    assert torch.equal(b_all.reshape(-1), moe.experts.bias)
    mixed = torch.einsum("bmk,bmkd->bmd", gates,
                         torch.einsum("mkdc,bc->bmkd", w_all, e.flatten(-2)) + b_all)
    assert_close(out, e + moe.alpha.view(2, 1) * mixed, rtol=1e-5, atol=1e-5)
