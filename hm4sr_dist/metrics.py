"""Full-ranking metrics over the whole catalogue (spec §1): NDCG@K, MRR@K, Hit@K.

Every real item is a candidate (the padding item is not; history items are NOT masked). A
target's rank is the number of real items scored strictly above it. Results are kept as sums plus
a count, so workers can add them up and divide once: the global mean is exact, not an average of
per-worker means.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor


def target_ranks(seq_repr: Tensor, item_repr: Tensor, target: Tensor, chunk_size: int = 0) -> Tensor:
    """(B,) int64: how many real items score strictly higher than each row's target (eq. 19 scores).

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
        # The padding item is no candidate; the target is never above itself (rounding aside).
        above = (scores > target_score) & (ids != 0) & (ids != target.unsqueeze(1))
        ranks += above.sum(1)
    return ranks


def metric_sums(ranks: Tensor, ks: Iterable[int], weight: Tensor | None = None) -> dict[str, Tensor]:
    """Per-metric sums over rows (float64) plus "count"; `weight` 0 drops padded rows."""
    w = torch.ones_like(ranks, dtype=torch.float64) if weight is None else weight.to(torch.float64)
    r = ranks.to(torch.float64)
    sums = {"count": w.sum()}
    for k in ks:
        hit = (r < k).to(torch.float64) * w
        sums[f"hit@{k}"] = hit.sum()
        sums[f"ndcg@{k}"] = (hit / torch.log2(r + 2.0)).sum()
        sums[f"mrr@{k}"] = (hit / (r + 1.0)).sum()
    return sums


def add_sums(total: dict[str, Tensor] | None, new: dict[str, Tensor]) -> dict[str, Tensor]:
    if total is None:
        return {k: v.clone() for k, v in new.items()}
    return {k: total[k] + new[k] for k in total}


def finalize(sums: dict[str, Tensor]) -> dict[str, float]:
    """Means from summed metrics."""
    count = float(sums["count"])
    if count == 0:
        raise ValueError("no evaluation rows: cannot compute metrics")
    return {k: float(v) / count for k, v in sums.items() if k != "count"} | {"count": int(count)}


def random_ranking_ndcg(k: int, n_items: int) -> float:
    """Expected NDCG@k when the target's rank is uniform over n_items (the chance level)."""
    return sum(1.0 / math.log2(r + 2) for r in range(min(k, n_items))) / n_items
