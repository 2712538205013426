"""Eq. 20-27: every loss term and the objective's total against computations written here from the
equations (explicit loops over rows and items on tiny tensors, float64). A reference never calls the
function under test; the model's outputs H^m and H^{m,1} are only its inputs (eq. 2-19 and 24 are
checked against their own written-out reference in tests/model/test_hm4sr_forward.py)."""

import math

import pytest
import torch
from hm4sr_test_utils import tiny_config

from hm4sr_dist.batch import Batch
from hm4sr_dist.losses import category_loss, info_nce, main_loss
from hm4sr_dist.objective import build_objective


def test_main_loss_is_softmax_cross_entropy_over_real_items():
    """Eq. 20: mean over rows of -log softmax(y)[target], the padding column (-inf) excluded."""
    scores = torch.randn(4, 7)
    scores[:, 0] = float("-inf")                       # the padding column, as HM4SR.scores gives it
    target = torch.tensor([1, 6, 3, 3])
    expected = sum(-(scores[i, target[i]] - torch.logsumexp(scores[i, 1:], 0)) for i in range(4)) / 4
    torch.testing.assert_close(main_loss(scores, target), expected)


def test_category_loss_sums_over_categories_and_averages_over_items():
    """Eq. 22: binary cross-entropy summed over the categories of each item, averaged over the items
    (`per_item`, the default); `per_element` divides by items x categories; or a given count."""
    logits, labels = torch.randn(5, 3), torch.rand(5, 3) > 0.5
    p = torch.sigmoid(logits)
    per_entry = -(labels * torch.log(p) + (~labels) * torch.log(1 - p))          # eq. 22
    torch.testing.assert_close(category_loss(logits, labels), per_entry.sum(dim=1).mean())
    torch.testing.assert_close(category_loss(logits, labels, reduction="per_element"), per_entry.mean())
    torch.testing.assert_close(category_loss(logits, labels, denominator=6.0), per_entry.sum() / 6)
    with pytest.raises(ValueError, match="loss.cp_reduction"):
        category_loss(logits, labels, reduction="sum")


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
    """Eq. 23/25: InfoNCE against a row loop, keys of other rows with the query's target skipped."""
    q, k = torch.randn(4, 6, dtype=torch.float64), torch.randn(10, 6, dtype=torch.float64)
    pos = torch.tensor([4, 5, 6, 7])                   # this "rank" owns rows 4..7 of the global batch
    kid = torch.tensor([1, 2, 3, 9, 1, 2, 3, 4, 9, 4])
    qid = kid[pos]
    got = info_nce(q, k, pos, qid, kid, tau)
    assert got.item() == pytest.approx(reference_info_nce(q, k, pos, qid, kid, tau), rel=1e-10)


def test_info_nce_ignores_same_target_negatives():
    """Eq. 23 (spec): a key with the query's target is not a negative; a key with another target is."""
    q, k = torch.randn(1, 5), torch.randn(4, 5)
    pos, kid = torch.tensor([0]), torch.tensor([7, 8, 7, 1])
    base = info_nce(q, k, pos, kid[pos], kid, 0.2)
    k_same = k.clone()
    k_same[2] = q[0] * 5                               # key 2 has the query's target: never a negative
    torch.testing.assert_close(info_nce(q, k_same, pos, kid[pos], kid, 0.2), base)
    k_other = k.clone()
    k_other[1] = q[0] * 5                              # key 1 has another target: a real negative
    assert info_nce(q, k_other, pos, kid[pos], kid, 0.2) > base + 1e-3


def reference_main(h, x, target):
    """Eq. 19-20 by hand: y_v = sum_m H^m . x_m(v) for the real items v = 1..N, then the mean over
    rows of -log(exp(y_target) / sum_v exp(y_v))."""
    n_items = next(iter(x.values())).shape[0] - 1
    total = 0.0
    for i in range(len(target)):
        y = [sum(float(h[m][i] @ x[m][v]) for m in h) for v in range(1, n_items + 1)]
        top = max(y)
        log_sum = top + math.log(sum(math.exp(s - top) for s in y))
        total += -(y[int(target[i]) - 1] - log_sum)
    return total / len(target)


def reference_cp(x_cat, w_cp, b_cp, batch, categories, reduction="per_item"):
    """Eq. 21-22 by hand: for every real input item v, logits W_CP [x_id; x_txt; x_img](v) + b_CP
    and L_CP(v) = -sum_c y_c log p_c + (1 - y_c) log(1 - p_c); reduced as docs/model.md states: the
    mean of L_CP(v) over the batch's real input items (`per_element`: also divided by |C|;
    `per_sequence`: L_CP = sum of L_CP(v) over a sequence's items, the mean over the sequences)."""
    total, n_real = 0.0, 0
    for row in range(len(batch.seq_len)):
        for pos in range(int(batch.seq_len[row])):
            v = int(batch.item_seq[row, pos])
            logits = w_cp @ x_cat[v] + b_cp
            for c in range(len(logits)):
                p, y = 1.0 / (1.0 + math.exp(-float(logits[c]))), float(categories[v, c])
                total -= y * math.log(p) + (1.0 - y) * math.log(1.0 - p)                 # eq. 22
            n_real += 1
    if reduction == "per_sequence":
        return total / len(batch.seq_len)
    return total / (n_real * (categories.shape[1] if reduction == "per_element" else 1))


def reference_terms(objective, catalog, batch, out):
    """Eq. 19-26 from the parameters and the catalogue; `out.seq_repr` (H^m) and `out.pcl_repr`
    (H^{m,1}) of the model are the only inputs taken from the code under test."""
    model, cfg = objective.model, objective.cfg
    params = {name: p.detach().double() for name, p in model.named_parameters()}
    d, target, rows = model.d, batch.target, torch.arange(len(batch.target))
    x = {}                                                                             # eq. 2-5
    for m in model.modalities:
        if m == "id":
            x[m] = params["items.id_table.weight"]
        else:
            f = catalog.feature_table(m).double()
            x[m] = f @ params[f"items.projections.{m}.weight"].T + params[f"items.projections.{m}.bias"]
    h = {m: out.seq_repr[:, i * d:(i + 1) * d].detach().double() for i, m in enumerate(model.modalities)}
    ref = {"main": reference_main(h, x, target)}
    if "cp_head.weight" in params:
        x_cat = torch.cat([x[m] for m in model.modalities], dim=-1)
        ref["cp"] = reference_cp(x_cat, params["cp_head.weight"], params["cp_head.bias"], batch,
                                 catalog.categories, cfg.cp_reduction)
    if cfg.idcl_weight > 0:                                                            # eq. 23
        ref["idcl"] = reference_info_nce(h["id"], x["id"][target], rows, target, target, cfg.idcl_temperature)
    if cfg.pcl_weight > 0:                                                             # eq. 25-26
        per_modality = [reference_info_nce(h[m], out.pcl_repr[m].detach().double(), rows, target, target,
                                           cfg.pcl_temperature) for m in ("text", "image")]
        ref["pcl"] = sum(per_modality) / 2
    return ref


def _objective(tiny_log, randomize=True, **loss):
    """The production objective on the tiny log, dropout 0 (training mode is then deterministic
    apart from the PCL placeholder draw), every parameter at a generic random value."""
    cfg = tiny_config(hidden_dropout=0.0, attn_dropout=0.0)
    for key, value in loss.items():
        setattr(cfg.loss, key, value)
    objective = build_objective(cfg.model, cfg.loss, tiny_log.catalog)
    if randomize:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in objective.named_parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            objective.model.items.id_table.weight[0].zero_()                 # the padding item
            objective.model.temporal_moe.expert_weight.add_(1.0)             # experts near 1
    return objective.train()


def _with_duplicate_target(batch):
    """The batch with the last row's target set to the first row's: a same-target pair to mask."""
    target = batch.target.clone()
    target[-1] = target[0]
    return Batch(batch.item_seq, batch.time_seq, batch.seq_len, target)


def test_objective_terms_and_total_match_the_equations(tiny_log, tiny_batch):
    """Eq. 20, 21-22, 23, 24-26 and 27 in training mode (CP is computed): each term and the total
    L = L_main + l1 L_CP + l2 L_IDCL + l3 L_PCL against the references above, non-default weights
    and temperatures, a same-target pair in the batch."""
    batch = _with_duplicate_target(tiny_batch)
    assert (batch.seq_len < batch.item_seq.shape[1]).any() and len(batch.target) >= 3   # padding present
    weights = {"cp_weight": 0.7, "idcl_weight": 1.25, "pcl_weight": 0.3}
    obj = _objective(tiny_log, **weights, idcl_temperature=0.3, pcl_temperature=0.5)
    terms = obj(batch)
    assert all(getattr(terms, name) is not None for name in ("cp", "idcl", "pcl"))
    ref = reference_terms(obj, tiny_log.catalog, batch, terms.output)
    for name in ("main", "cp", "idcl", "pcl"):
        assert terms.scalars()[name] == pytest.approx(ref[name], rel=1e-5), name
    expected = ref["main"] + 0.7 * ref["cp"] + 1.25 * ref["idcl"] + 0.3 * ref["pcl"]      # eq. 27
    assert terms.total.item() == pytest.approx(expected, rel=1e-5)
    # the same-target pair matters to IDCL: without masking it, the reference differs
    unmasked = torch.arange(len(batch.target))
    d = obj.model.d
    h_id = terms.output.seq_repr[:, :d].detach().double()
    x_id = obj.model.items.id_table.weight.detach().double()[batch.target]
    assert abs(reference_info_nce(h_id, x_id, unmasked, unmasked, unmasked, 0.3) - ref["idcl"]) > 1e-4


def test_category_prediction_reads_real_positions_only(tiny_log, tiny_batch):
    """Eq. 21-22: CP covers exactly the real input items; garbage item IDs in padded slots change
    nothing (the reference loops over positions < seq_len only)."""
    obj = _objective(tiny_log, idcl_weight=0.0, pcl_weight=0.0)
    terms = obj(tiny_batch)
    assert terms.cp is not None
    ref = reference_terms(obj, tiny_log.catalog, tiny_batch, terms.output)
    assert terms.cp.item() == pytest.approx(ref["cp"], rel=1e-5)
    assert terms.total.item() == pytest.approx(ref["main"] + 1.0 * ref["cp"], rel=1e-5)
    per_element = _objective(tiny_log, idcl_weight=0.0, pcl_weight=0.0, cp_reduction="per_element")
    ref_element = reference_terms(per_element, tiny_log.catalog, tiny_batch, per_element(tiny_batch).output)
    assert per_element(tiny_batch).cp.item() == pytest.approx(ref_element["cp"], rel=1e-5)
    assert ref["cp"] == pytest.approx(ref_element["cp"] * tiny_log.catalog.categories.shape[1], rel=1e-9)
    per_sequence = _objective(tiny_log, idcl_weight=0.0, pcl_weight=0.0, cp_reduction="per_sequence")
    ref_sequence = reference_terms(per_sequence, tiny_log.catalog, tiny_batch, per_sequence(tiny_batch).output)
    assert per_sequence(tiny_batch).cp.item() == pytest.approx(ref_sequence["cp"], rel=1e-5)
    mean_length = tiny_batch.seq_len.double().mean().item()              # the sum over S = items x mean length
    assert ref_sequence["cp"] == pytest.approx(ref["cp"] * mean_length, rel=1e-9)
    noisy = tiny_batch.trimmed()
    noisy.item_seq = noisy.item_seq.masked_fill(~noisy.padding_mask(), 3)
    assert (noisy.item_seq != tiny_batch.trimmed().item_seq).any()
    assert obj(noisy).cp.item() == pytest.approx(ref["cp"], rel=1e-5)


def test_objective_in_eval_mode_keeps_every_term(tiny_log, tiny_batch):
    """Eq. 27 is the same objective in eval mode (e.g. a validation loss): CP is not dropped
    silently, and the total still includes l1 L_CP."""
    obj = _objective(tiny_log, idcl_weight=0.0, pcl_weight=0.0).eval()
    terms = obj(tiny_batch)
    assert terms.cp is not None
    ref = reference_terms(obj, tiny_log.catalog, tiny_batch, terms.output)
    assert terms.total.item() == pytest.approx(ref["main"] + 1.0 * ref["cp"], rel=1e-5)


@pytest.mark.parametrize("weights, present", [
    ({"cp_weight": 0.0}, {"idcl", "pcl"}), ({"idcl_weight": 0.0}, {"cp", "pcl"}),
    ({"pcl_weight": 0.0}, {"cp", "idcl"}), ({}, {"cp", "idcl", "pcl"}),
])
def test_zero_weight_removes_exactly_its_term(tiny_log, tiny_batch, weights, present):
    """Eq. 27 with a zero weight (the -CP, -IDCL, -PCL ablations): every term with a weight > 0 is
    present, the zero-weight one is absent, and the total is the reference sum of the present ones."""
    obj = _objective(tiny_log, **weights)
    terms = obj(tiny_batch)
    assert {n for n in ("cp", "idcl", "pcl") if getattr(terms, n) is not None} == present
    ref = reference_terms(obj, tiny_log.catalog, tiny_batch, terms.output)
    cfg = obj.cfg
    lam = {"cp": cfg.cp_weight, "idcl": cfg.idcl_weight, "pcl": cfg.pcl_weight}
    assert terms.total.item() == pytest.approx(ref["main"] + sum(lam[n] * ref[n] for n in present), rel=1e-5)


def test_every_parameter_gets_a_gradient(tiny_log, tiny_batch):
    """Eq. 27 trains every parameter from the default initialisation, the Temporal MoE experts
    (the authors' fault (a)) and alpha_id (which starts at 0) included."""
    obj = _objective(tiny_log, randomize=False)
    obj(tiny_batch).total.backward()
    missing = [n for n, p in obj.named_parameters() if p.grad is None]
    assert not missing
    model = obj.model
    assert model.temporal_moe.expert_weight.grad.abs().sum() > 0                  # fault (a) fixed
    assert (model.interactive_moe.alpha.grad.abs() > 0).all()                     # alpha_id starts at 0


def test_missing_categories_is_a_clear_error(tiny_log):
    """Eq. 21-22 need item categories: asking for CP without them is an error naming the key."""
    from dataclasses import replace
    catalog = replace(tiny_log.catalog, categories=None)
    cfg = tiny_config()
    with pytest.raises(ValueError, match="loss.cp_weight > 0 but the data set has no item categories"):
        build_objective(cfg.model, cfg.loss, catalog)
