"""Eq. 20-27: every loss term against a direct computation on small tensors."""

import math

import pytest
import torch
from hm4sr_test_utils import tiny_config

from hm4sr_dist.losses import category_loss, info_nce, main_loss
from hm4sr_dist.objective import build_objective


def test_main_loss_is_softmax_cross_entropy_over_real_items():
    scores = torch.randn(4, 7)
    scores[:, 0] = float("-inf")                       # the padding column, as HM4SR.scores gives it
    target = torch.tensor([1, 6, 3, 3])
    expected = sum(-(scores[i, target[i]] - torch.logsumexp(scores[i, 1:], 0)) for i in range(4)) / 4
    torch.testing.assert_close(main_loss(scores, target), expected)


def test_category_loss_is_mean_binary_cross_entropy():
    logits, labels = torch.randn(5, 3), torch.rand(5, 3) > 0.5
    p = torch.sigmoid(logits)
    per_entry = -(labels * torch.log(p) + (~labels) * torch.log(1 - p))          # eq. 22
    torch.testing.assert_close(category_loss(logits, labels), per_entry.sum() / 15)
    torch.testing.assert_close(category_loss(logits, labels, denominator=6.0), per_entry.sum() / 6)


def reference_info_nce(q, k, pos, qid, kid, tau):
    """Eq. 23/25 by hand: row loops, cosine similarity, same-target keys skipped."""
    q, k = q.detach(), k.detach()
    total = 0.0
    for i in range(q.shape[0]):
        cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))                # noqa: E731
        numerator = math.exp(cos(q[i], k[pos[i]]) / tau)
        denominator = sum(math.exp(cos(q[i], k[j]) / tau) for j in range(k.shape[0])
                          if j == pos[i] or kid[j] != qid[i])
        total += -math.log(numerator / denominator)
    return total / q.shape[0]


@pytest.mark.parametrize("tau", [0.2, 1.0])
def test_info_nce_matches_loop_reference_with_same_target_masking(tau):
    q, k = torch.randn(4, 6, dtype=torch.float64), torch.randn(10, 6, dtype=torch.float64)
    pos = torch.tensor([4, 5, 6, 7])                   # this "rank" owns rows 4..7 of the global batch
    kid = torch.tensor([1, 2, 3, 9, 1, 2, 3, 4, 9, 4])
    qid = kid[pos]
    got = info_nce(q, k, pos, qid, kid, tau)
    assert got.item() == pytest.approx(reference_info_nce(q, k, pos, qid, kid, tau), rel=1e-10)


def test_info_nce_ignores_same_target_negatives():
    q, k = torch.randn(1, 5), torch.randn(4, 5)
    pos, kid = torch.tensor([0]), torch.tensor([7, 8, 7, 1])
    base = info_nce(q, k, pos, kid[pos], kid, 0.2)
    k_same = k.clone()
    k_same[2] = q[0] * 5                               # key 2 has the query's target: never a negative
    torch.testing.assert_close(info_nce(q, k_same, pos, kid[pos], kid, 0.2), base)
    k_other = k.clone()
    k_other[1] = q[0] * 5                              # key 1 has another target: a real negative
    assert info_nce(q, k_other, pos, kid[pos], kid, 0.2) > base + 1e-3


def _objective(tiny_log, **loss):
    cfg = tiny_config()
    for key, value in loss.items():
        setattr(cfg.loss, key, value)
    return build_objective(cfg.model, cfg.loss, tiny_log.catalog)


def test_objective_terms_match_direct_computation(tiny_log, tiny_batch):
    obj = _objective(tiny_log, cp_weight=0.7, idcl_weight=1.25, pcl_weight=0.3, idcl_temperature=0.3)
    obj.eval()                                         # no dropout, so the reference can re-run
    torch.manual_seed(5)
    terms = obj(tiny_batch)
    torch.manual_seed(5)
    out = obj.model(tiny_batch, augment=True)          # same placeholder draw
    d, target = obj.model.d, tiny_batch.target
    # eq. 20
    torch.testing.assert_close(terms.main, main_loss(obj.model.scores(out.seq_repr, out.item_repr), target))
    # eq. 23: H^id vs x_id(target), tau = 0.3
    pos = torch.arange(len(target))
    idcl = reference_info_nce(out.seq_repr[:, :d].double(), out.item_repr[target, :d].double(), pos,
                              target, target, 0.3)
    assert terms.idcl.item() == pytest.approx(idcl, rel=1e-5)
    # eq. 25-26: H^m vs the placeholder view H^{m,1}, temperature 1, averaged over text and image
    pcl = [reference_info_nce(out.seq_repr[:, i * d:(i + 1) * d].double(), out.pcl_repr[m].double(), pos,
                              target, target, 1.0) for i, m in ((1, "text"), (2, "image"))]
    assert terms.pcl.item() == pytest.approx(sum(pcl) / 2, rel=1e-5)
    # eq. 27
    expected = terms.main + 0.7 * (terms.cp if terms.cp is not None else 0) + 1.25 * terms.idcl + 0.3 * terms.pcl
    torch.testing.assert_close(terms.total, expected)


def test_category_prediction_reads_real_positions_only(tiny_log, tiny_batch):
    obj = _objective(tiny_log, idcl_weight=0.0, pcl_weight=0.0)
    obj.model.hidden_dropout = 0.0
    for module in obj.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    terms = obj(tiny_batch)                            # training mode: CP is a training loss
    real = tiny_batch.padding_mask()
    items = obj.model.item_representations()
    logits = obj.model.cp_head(items[tiny_batch.item_seq[real]])                 # eq. 21, no position
    labels = tiny_log.catalog.categories[tiny_batch.item_seq[real]]
    torch.testing.assert_close(terms.cp, category_loss(logits, labels))
    # Garbage in padded slots changes nothing.
    noisy = tiny_batch.trimmed()
    noisy.item_seq = noisy.item_seq.masked_fill(~noisy.padding_mask(), 3)
    torch.testing.assert_close(obj(noisy).cp, terms.cp)


@pytest.mark.parametrize("weights, present", [
    ({"cp_weight": 0.0}, {"idcl", "pcl"}), ({"idcl_weight": 0.0}, {"cp", "pcl"}),
    ({"pcl_weight": 0.0}, {"cp", "idcl"}), ({}, {"cp", "idcl", "pcl"}),
])
def test_zero_weight_removes_exactly_its_term(tiny_log, tiny_batch, weights, present):
    terms = _objective(tiny_log, **weights)(tiny_batch)
    assert {n for n in ("cp", "idcl", "pcl") if getattr(terms, n) is not None} == present


def test_every_parameter_gets_a_gradient(tiny_log, tiny_batch):
    obj = _objective(tiny_log)
    obj(tiny_batch).total.backward()
    missing = [n for n, p in obj.named_parameters() if p.grad is None]
    assert not missing
    model = obj.model
    assert model.temporal_moe.expert_weight.grad.abs().sum() > 0                  # fault (a) fixed
    assert (model.interactive_moe.alpha.grad.abs() > 0).all()                     # alpha_id starts at 0


def test_missing_categories_is_a_clear_error(tiny_log):
    from dataclasses import replace
    catalog = replace(tiny_log.catalog, categories=None)
    cfg = tiny_config()
    with pytest.raises(ValueError, match="loss.cp_weight > 0 but the data set has no item categories"):
        build_objective(cfg.model, cfg.loss, catalog)
