"""Full-ranking metrics over the whole catalogue (spec §1): NDCG@K, MRR@K, Hit@K.

Every real item is a candidate (the padding item is not; history items are NOT masked). A
target's rank is the number of other real items scored at or above it: a tie never favours the
target (in bf16 or with collapsed embeddings ties are common, and counting them in the target's
favour would inflate metrics by an amount that differs between models). Results are kept as sums plus
a count (`metric_sums`), so workers can add them up and divide once: the global mean is exact, not
an average of per-worker means, and does not depend on how rows were split or ordered.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor


def target_ranks(seq_repr: Tensor, item_repr: Tensor, target: Tensor, chunk_size: int = 0) -> Tensor:
    """(B,) int64: how many other real items score at least as high as each row's target (eq. 19).

    Items are scored `chunk_size` at a time (0 = all at once), so the largest score block is
    (B, chunk_size) whatever the catalogue size.
    """
    n_total = item_repr.shape[0]
    chunk = n_total if chunk_size <= 0 else chunk_size
    target_score = (seq_repr * item_repr[target]).sum(-1, keepdim=True)          # (B, 1)
    ranks = torch.zeros_like(target)
    for start in range(0, n_total, chunk):
        stop = min(start + chunk, n_total)
        scores = seq_repr @ item_repr[start:stop].T                                # (B, c)
        ids = torch.arange(start, stop, device=target.device).unsqueeze(0)
        # The padding item is no candidate; the target is never above itself; ties count against it.
        above = (scores >= target_score) & (ids != 0) & (ids != target.unsqueeze(1))
        ranks += above.sum(1)
    return ranks


def metric_sums(ranks: Tensor, ks: Iterable[int], weight: Tensor | None = None) -> dict[str, Tensor]:
    """Summable evaluation state: how many rows have each rank below max(ks), and the row count.

    Counts are whole numbers (float64, exact to 2**53), so adding them across batches and workers
    in any order gives bit-identical metrics. `weight` 0 drops padded rows.
    """
    top = max(ks)
    w = torch.ones_like(ranks, dtype=torch.float64) if weight is None else weight.to(torch.float64)
    inside = ranks < top
    hist = torch.zeros(top, dtype=torch.float64, device=ranks.device)
    hist.index_add_(0, ranks[inside], w[inside])
    return {"rank_hist": hist, "count": w.sum()}


def add_sums(total: dict[str, Tensor] | None, new: dict[str, Tensor]) -> dict[str, Tensor]:
    if total is None:
        return {k: v.clone() for k, v in new.items()}
    return {k: total[k] + new[k] for k in total}


def finalize(sums: dict[str, Tensor], ks: Iterable[int]) -> dict[str, float]:
    """NDCG@K (1/log2(rank+2)), MRR@K (1/(rank+1)) and Hit@K, averaged over all rows."""
    hist = sums["rank_hist"].double().cpu()
    count = float(sums["count"])
    if count == 0:
        raise ValueError("no evaluation rows: cannot compute metrics")
    r = torch.arange(len(hist), dtype=torch.float64)
    out: dict[str, float] = {}
    for k in sorted(ks):
        h = hist[:k]
        out[f"hit@{k}"] = float(h.sum()) / count
        out[f"ndcg@{k}"] = float((h / torch.log2(r[:k] + 2)).sum()) / count
        out[f"mrr@{k}"] = float((h / (r[:k] + 1)).sum()) / count
    return out | {"count": int(count)}


def random_ranking_ndcg(k: int, n_items: int) -> float:
    """Expected NDCG@k when the target's rank is uniform over n_items (the chance level)."""
    return sum(1.0 / math.log2(r + 2) for r in range(min(k, n_items))) / n_items
