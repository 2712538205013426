"""Full-ranking metrics: ranks against a brute-force sort, chunking, formulas, summing across workers."""

import math

import pytest
import torch

from hm4sr_dist.metrics import add_sums, finalize, metric_sums, random_ranking_ndcg, target_ranks


def brute_force_ranks(seq_repr, item_repr, target):
    scores = seq_repr @ item_repr.T
    ranks = []
    for row, t in enumerate(target.tolist()):
        candidates = [(float(scores[row, v]), v) for v in range(1, item_repr.shape[0])]   # no padding
        ordered = sorted(candidates, key=lambda sv: -sv[0])
        ranks.append([v for _, v in ordered].index(t))
    return torch.tensor(ranks)


@pytest.mark.parametrize("chunk", [0, 1, 3, 7, 1000])
def test_ranks_match_brute_force_for_any_chunk_size(chunk):
    h, items = torch.randn(6, 4, dtype=torch.float64), torch.randn(20, 4, dtype=torch.float64)
    items[0] = 100.0                                          # padding row: huge score, never counted
    target = torch.tensor([1, 5, 19, 7, 7, 2])
    torch.testing.assert_close(target_ranks(h, items, target, chunk), brute_force_ranks(h, items, target))


def test_metric_formulas():
    ranks = torch.tensor([0, 1, 4, 5, 9, 10])
    means = finalize(metric_sums(ranks, [5, 10]), [5, 10])
    assert means["count"] == 6
    assert means["hit@5"] == pytest.approx(3 / 6) and means["hit@10"] == pytest.approx(5 / 6)
    assert means["ndcg@5"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6)) / 6)
    assert means["mrr@10"] == pytest.approx((1 + 1 / 2 + 1 / 5 + 1 / 6 + 1 / 10) / 6)


def test_sums_over_workers_equal_the_whole():
    ranks = torch.randint(0, 30, (17,))
    whole = finalize(metric_sums(ranks, [5, 10]), [5, 10])
    # Two "workers" with unequal shares; the second padded with a weighted-out row.
    a = metric_sums(ranks[:5], [5, 10])
    b = metric_sums(torch.cat([ranks[5:], torch.tensor([0])]), [5, 10],
                    weight=torch.cat([torch.ones(12), torch.zeros(1)]))
    split = finalize(add_sums(b, a), [5, 10])
    assert split == whole                                     # bit-identical, whatever the order


def test_history_items_are_not_masked():
    # Item 3 is in the (imaginary) history and scores above the target: it still counts.
    h = torch.tensor([[1.0, 0.0]])
    items = torch.tensor([[0.0, 0.0], [0.5, 0.0], [0.1, 0.0], [0.9, 0.0]])
    assert target_ranks(h, items, torch.tensor([1])).item() == 1


def test_random_ranking_ndcg():
    assert random_ranking_ndcg(10, 10) == pytest.approx(sum(1 / math.log2(r + 2) for r in range(10)) / 10)
    ranks = torch.arange(1000) % 50                           # uniform over 50 items
    assert finalize(metric_sums(ranks, [10]), [10])["ndcg@10"] == pytest.approx(random_ranking_ndcg(10, 50))


@pytest.mark.parametrize("chunk", [0, 2])
def test_ties_count_against_the_target(chunk):
    # Items 2 and 3 score exactly as the target (item 1); item 4 lower: the target ranks 2nd after
    # both ties, never first (a bf16 model ties often; ties must not inflate metrics).
    h = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    items = torch.tensor([[9.0, 0.0], [0.5, 0.0], [0.5, 0.0], [0.5, 0.0], [0.25, 0.0]])
    assert target_ranks(h, items, torch.tensor([1, 4]), chunk).tolist() == [2, 3]
