"""Eq. 20 over large catalogues (hm4sr_dist/catalog_loss.py, docs/scaling.md).

The chunked loss must be the full softmax cross-entropy exactly (loss and gradients, alone and
through the whole objective); the sampled softmax is checked against hand computations of its
correction and masking, against the full loss when every item is a negative, and for an unbiased
partition-function estimate by Monte Carlo on a tiny catalogue; computing only the item rows the
sampled step reads must equal the whole-table path over optimizer steps and never project the
whole table. Small tensors only, no timing."""

import math

import pytest
import torch
from hm4sr_test_utils import tiny_config

from hm4sr_dist.catalog_loss import (MainLoss, NegativeSampler, chunked_cross_entropy, chunked_loss_bytes,
                                     full_loss_bytes, sampled_softmax_loss)
from hm4sr_dist.config import ConfigError, LossConfig, load_config
from hm4sr_dist.objective import build_objective


def full_reference(seq, items, target):
    """Today's path: (B, n+1) scores, padding column -inf, F.cross_entropy (losses.main_loss)."""
    scores = seq @ items.T
    scores[:, 0] = float("-inf")
    return torch.nn.functional.cross_entropy(scores, target)


def _inputs(dtype, b=5, n_items=10, width=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randn(b, width, generator=g, dtype=dtype)
    items = torch.randn(n_items + 1, width, generator=g, dtype=dtype)   # row 0 non-zero on purpose:
    items[0] *= 10                                                      # it must still not count
    target = torch.tensor([1, 10, 4, 4, 7])[:b]
    return seq, items, target


def _loss_and_grads(fn, seq, items, target):
    seq, items = seq.clone().requires_grad_(), items.clone().requires_grad_()
    loss = fn(seq, items, target)
    loss.backward()
    return loss.detach(), seq.grad, items.grad


@pytest.mark.parametrize("chunk", [1, 3, 4, 11, 0, 50])      # 11 = n+1 rows; 3, 4 do not divide it
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 2e-6)])
def test_chunked_loss_and_gradients_equal_the_full_softmax(chunk, dtype, tol):
    seq, items, target = _inputs(dtype)
    ref = _loss_and_grads(full_reference, seq, items, target)
    got = _loss_and_grads(lambda s, x, t: chunked_cross_entropy(s, x, t, chunk), seq, items, target)
    for name, a, b in zip(("loss", "d seq_repr", "d item_repr"), got, ref):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=name)
    assert got[2][0].abs().max() == 0                         # the padding item is no candidate


def test_chunked_loss_passes_gradcheck():
    """The hand-written backward against finite differences (float64)."""
    seq, items, target = _inputs(torch.float64, b=3, n_items=6, width=4)
    seq.requires_grad_()
    items.requires_grad_()
    assert torch.autograd.gradcheck(lambda s, x: chunked_cross_entropy(s, x, target[:3].clamp(max=6), 4),
                                    (seq, items))


def test_chunked_loss_scales_with_the_incoming_gradient():
    """The backward multiplies by the upstream gradient (the loss weight / a grad scaler)."""
    seq, items, target = _inputs(torch.float64)
    a = _loss_and_grads(lambda s, x, t: 3.5 * chunked_cross_entropy(s, x, t, 4), seq, items, target)
    b = _loss_and_grads(lambda s, x, t: 3.5 * full_reference(s, x, t), seq, items, target)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)


def _double_objective(tiny_log, **loss):
    cfg = tiny_config(hidden_dropout=0.0, attn_dropout=0.0)
    for key, value in loss.items():
        setattr(cfg.loss, key, value)
    torch.manual_seed(0)
    return build_objective(cfg.model, cfg.loss, tiny_log.catalog).double().train()


@pytest.mark.parametrize("chunk", [4, 7])          # the tiny log has 15 items: 16 rows, 4 divides, 7 not
def test_objective_with_chunked_main_loss_equals_the_full_one_end_to_end(tiny_log, tiny_batch, chunk):
    """HM4SR with every loss term on (float64): same total, same main term, same gradient for every
    model parameter, whether eq. 20 is the full matmul or the chunked loss."""
    full = _double_objective(tiny_log)
    chunked = _double_objective(tiny_log, main_loss="chunked", item_chunk_size=chunk)
    chunked.load_state_dict(full.state_dict())
    assert tiny_log.catalog.n_items + 1 == 16
    results = []
    for obj in (full, chunked):
        torch.manual_seed(7)                                        # the PCL placeholder draw
        terms = obj(tiny_batch)
        terms.total.backward()
        results.append((terms, {n: p.grad for n, p in obj.named_parameters()}))
    (t_full, g_full), (t_chunk, g_chunk) = results
    assert t_chunk.main.item() == pytest.approx(t_full.main.item(), rel=1e-12, abs=1e-12)
    assert t_chunk.total.item() == pytest.approx(t_full.total.item(), rel=1e-12, abs=1e-12)
    assert g_full.keys() == g_chunk.keys() and all(g is not None for g in g_full.values())
    for name in g_full:
        torch.testing.assert_close(g_chunk[name], g_full[name], rtol=1e-10, atol=1e-10, msg=name)


# -- sampled softmax --------------------------------------------------------------------------

def test_sampled_loss_matches_a_hand_computation_of_correction_and_masking():
    """Row i: -log(exp(y_t) / (exp(y_t) + sum_j exp(y_ij - log E_j))), the negatives j whose item
    is t_i skipped, duplicates of other items kept."""
    seq, items, target = _inputs(torch.float64, b=3, n_items=6, width=4)
    target = torch.tensor([2, 5, 2])
    negatives = torch.tensor([2, 5, 3, 3, 6, 1, 2])
    log_e = torch.tensor([0.1, -0.4, 0.7, 0.7, -1.2, 0.3, 0.1], dtype=torch.float64)
    expected = 0.0
    for i in range(3):
        y = lambda v: float(seq[i] @ items[v])                                     # noqa: E731
        z = math.exp(y(int(target[i])))
        z += sum(math.exp(y(int(v)) - float(e)) for v, e in zip(negatives, log_e) if v != target[i])
        expected += -(y(int(target[i])) - math.log(z))
    got = sampled_softmax_loss(seq, items, target, negatives, log_e)
    assert got.item() == pytest.approx(expected / 3, rel=1e-12)


def test_log_expected_count_formula():
    """log E[count of v among a row's negatives] = log((B_g - 1) pi(v) + K q(v))."""
    counts = torch.tensor([0, 9, 0, 4, 1])                         # add-one smoothing: 10, 1, 5, 2
    pop = NegativeSampler(4, "popularity", counts)
    v = torch.tensor([1, 2, 3, 4])
    q = torch.tensor([10, 1, 5, 2], dtype=torch.float64) / 18
    torch.testing.assert_close(pop.q(v), q)
    torch.testing.assert_close(pop.log_expected(v, 6, 3), torch.log(5 * q + 3 * q).float())
    uni = NegativeSampler(4, "uniform")
    torch.testing.assert_close(uni.log_expected(v, 6, 3), torch.full((4,), math.log(5 / 4 + 3 / 4)))
    uni_with_counts = NegativeSampler(4, "uniform", counts)         # pi from the counts, q uniform
    torch.testing.assert_close(uni_with_counts.log_expected(v, 6, 3), torch.log(5 * q + 3 / 4).float())


def test_sampled_loss_with_every_item_as_negative_is_the_full_softmax():
    """K = n, uniform, each item once, no in-batch part: E = n * 1/n = 1, so the estimate is exact."""
    seq, items, target = _inputs(torch.float64)
    sampler = NegativeSampler(10, "uniform")
    negatives = torch.arange(1, 11)
    log_e = sampler.log_expected(negatives, n_in_batch=0, n_sampled=10).double()
    ref = _loss_and_grads(full_reference, seq, items, target)
    got = _loss_and_grads(lambda s, x, t: sampled_softmax_loss(s, x, t, negatives, log_e), seq, items, target)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("in_batch", [0, 4])
def test_sampled_partition_function_estimate_is_unbiased(in_batch):
    """E[exp(loss + y_t)] = sum_v exp(y_v) (one row) over many draws: popularity sampler, K = 3,
    plus `in_batch` other rows whose targets are drawn from the same (count) distribution."""
    g = torch.Generator().manual_seed(3)
    n = 8
    seq = torch.randn(1, 4, generator=g, dtype=torch.float64)
    items = torch.randn(n + 1, 4, generator=g, dtype=torch.float64)
    counts = torch.tensor([0, 30, 1, 5, 0, 12, 2, 8, 3])
    sampler = NegativeSampler(n, "popularity", counts)
    target = torch.tensor([3])
    y = (seq @ items.T)[0]
    z_true = float(y[1:].exp().sum())
    draws = []
    for _ in range(6000):
        negatives = [target]                                    # the row's own in-batch column
        if in_batch:
            negatives.append(sampler.sample(in_batch, generator=g))
        negatives.append(sampler.sample(3, generator=g))
        negatives = torch.cat(negatives) if in_batch else torch.cat(negatives[1:])
        log_e = sampler.log_expected(negatives, in_batch + 1 if in_batch else 0, 3).double()
        loss = sampled_softmax_loss(seq, items, target, negatives, log_e)
        draws.append(math.exp(loss.item() + float(y[3])))
    draws = torch.tensor(draws, dtype=torch.float64)
    mean, se = float(draws.mean()), float(draws.std() / math.sqrt(len(draws)))
    assert abs(mean - z_true) < 4 * se, (mean, z_true, se)


def test_samplers_draw_real_items_with_their_probabilities():
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([1000, 0, 3, 96])            # the padding row's count is ignored
    pop = NegativeSampler(3, "popularity", counts)
    draws = pop.sample(20000, generator=g)
    assert draws.min() >= 1 and draws.max() <= 3
    freq = torch.bincount(draws, minlength=4)[1:].double() / len(draws)
    torch.testing.assert_close(freq, pop.q(torch.tensor([1, 2, 3])), atol=0.01, rtol=0)
    uni = NegativeSampler(3, "uniform").sample(3000, generator=g)
    assert set(uni.tolist()) == {1, 2, 3}


def test_popularity_without_item_counts_is_an_error_naming_the_key():
    with pytest.raises(ConfigError, match="loss.negative_sampler.*needs item counts"):
        NegativeSampler(5, "popularity", None)
    cfg = LossConfig(main_loss="sampled", num_negatives=0, in_batch_negatives=False)
    with pytest.raises(ConfigError, match="loss.num_negatives"):
        MainLoss(cfg, 5)


def test_in_batch_negatives_come_from_the_gathered_global_batch():
    """main_loss=sampled, in-batch only, uniform: the negatives are the global targets (as the
    exchange's all_gather returns them), the row's own target item masked, a constant correction."""
    seq, items, target = _inputs(torch.float64, b=2, n_items=6, width=4)
    target = torch.tensor([2, 5])
    global_targets = torch.tensor([9, 2, 5, 2, 1]).clamp(max=6)        # another rank's rows around ours
    loss = MainLoss(LossConfig(main_loss="sampled", num_negatives=0, in_batch_negatives=True), 6)
    got = loss(seq, items, target, all_gather=lambda t: global_targets)
    log_e = torch.full((5,), math.log(4 / 6), dtype=torch.float64)
    torch.testing.assert_close(got, sampled_softmax_loss(seq, items, target, global_targets, log_e))


def test_sampled_objective_trains_every_parameter(tiny_log, tiny_batch):
    cfg = tiny_config()
    cfg.loss.main_loss, cfg.loss.num_negatives = "sampled", 5
    obj = build_objective(cfg.model, cfg.loss, tiny_log.catalog).train()
    obj(tiny_batch).total.backward()
    assert not [n for n, p in obj.named_parameters() if p.grad is None]


def test_config_keys_load_and_validate():
    cfg = load_config(None, ["loss.main_loss=chunked", "loss.item_chunk_size=4096"])
    assert (cfg.loss.main_loss, cfg.loss.item_chunk_size) == ("chunked", 4096)
    with pytest.raises(ConfigError, match="loss.main_loss"):
        load_config(None, ["loss.main_loss=blocked"])
    with pytest.raises(ConfigError, match="loss.negative_sampler"):
        load_config(None, ["loss.negative_sampler=zipf"])


def test_memory_model():
    """docs/scaling.md's numbers: 10^6 items, B 1024, d 64, fp32."""
    assert full_loss_bytes(1024, 10**6, 64) / 2**30 == pytest.approx(8.1, abs=0.1)
    assert chunked_loss_bytes(1024, 10**6, 64, 16384) / 2**30 == pytest.approx(0.6, abs=0.05)


# -- sampled: the item rows the step reads, not the catalogue ----------------------------------

def _sampled_objective(tiny_log, row_wise: bool):
    cfg = tiny_config(modalities=["id", "text"])
    cfg.loss.main_loss, cfg.loss.num_negatives = "sampled", 6
    cfg.loss.idcl_weight, cfg.loss.pcl_weight = 0.1, 0.1
    torch.manual_seed(0)
    obj = build_objective(cfg.model, cfg.loss, tiny_log.catalog).double().train()
    obj.row_wise = row_wise
    return obj


def test_sampled_row_wise_steps_equal_the_whole_table_steps(tiny_log, tiny_batch):
    """ID + text, IDCL and PCL on, dropout on, float64: three Adam steps where eq. 2-5 are computed
    for the step's rows only give the same losses, parameter gradients and parameters as the
    whole-table path with the same seeds (same dropout, placeholders and negatives)."""
    rows, whole = _sampled_objective(tiny_log, True), _sampled_objective(tiny_log, False)
    whole.load_state_dict(rows.state_dict())
    assert rows.cfg.idcl_weight > 0 and rows.cfg.pcl_weight > 0 and rows.model.modalities == ["id", "text"]
    history = []
    for obj in (rows, whole):
        opt = torch.optim.Adam(obj.parameters(), lr=1e-2)
        steps = []
        for step in range(3):
            torch.manual_seed(100 + step)
            opt.zero_grad(set_to_none=True)
            terms = obj(tiny_batch)
            terms.total.backward()
            steps.append((terms.scalars(), {n: p.grad.clone() for n, p in obj.named_parameters()}))
            opt.step()
        history.append((steps, dict(obj.named_parameters())))
    (steps_rows, params_rows), (steps_whole, params_whole) = history
    for (s_rows, g_rows), (s_whole, g_whole) in zip(steps_rows, steps_whole):
        assert s_rows.keys() == s_whole.keys() >= {"total", "main", "idcl", "pcl"}
        for key in s_whole:
            assert s_rows[key] == pytest.approx(s_whole[key], rel=1e-12, abs=1e-12), key
        assert g_rows.keys() == g_whole.keys()
        for name in g_whole:
            torch.testing.assert_close(g_rows[name], g_whole[name], rtol=1e-10, atol=1e-12, msg=name)
    assert torch.count_nonzero(steps_rows[0][1]["model.items.projections.text.weight"]) > 0
    for name in params_whole:
        torch.testing.assert_close(params_rows[name], params_whole[name], rtol=1e-10, atol=1e-12, msg=name)


def test_sampled_row_wise_reads_only_the_needed_feature_rows(tiny_log, tiny_batch, monkeypatch):
    """The whole-table projection is never called and the frozen text table is read at the batch's
    input items, its targets and the sampled negatives only."""
    from hm4sr_dist.model import items as items_module

    def whole_table(*args, **kwargs):
        raise AssertionError("the whole-table projection was called under loss.main_loss=sampled")

    monkeypatch.setattr(items_module, "project_frozen", whole_table)
    monkeypatch.setattr(items_module.FrozenFeatures, "block", whole_table)
    read, drawn = [], []
    gather = items_module.FrozenFeatures.gather
    monkeypatch.setattr(items_module.FrozenFeatures, "gather",
                        lambda self, ids, *a: read.append(ids.clone()) or gather(self, ids, *a))
    obj = _sampled_objective(tiny_log, True)
    sample = obj.catalog_loss.sampler.sample
    monkeypatch.setattr(obj.catalog_loss.sampler, "sample",
                        lambda *a, **k: drawn.append(sample(*a, **k)) or drawn[-1])
    obj(tiny_batch).total.backward()
    read_items = set(torch.cat(read).tolist())
    needed = set(torch.cat([tiny_batch.item_seq.reshape(-1), tiny_batch.target, drawn[0]]).tolist())
    assert len(drawn) == 1 and read_items == needed
    assert len(needed) < tiny_log.catalog.n_items + 1          # the test would prove nothing otherwise
    assert obj.model.items.projections["text"].weight.grad is not None
