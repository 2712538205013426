"""HM4SR's losses, eq. 20-27, as plain functions of tensors.

The contrastive losses take the tensors to contrast AGAINST as arguments: on one process those are
the batch's own; under data parallelism the trainer hands in the all-gathered global batch and the
index of each local row's positive in it, and the model never knows the difference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def full_precision(x: Tensor) -> Tensor:
    """`x` in fp32 if it is in half precision (bf16 autocast), else unchanged (fp32, fp64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def main_loss(scores: Tensor, target: Tensor) -> Tensor:
    """Eq. 20: softmax cross-entropy over all items (scores (B, n_items + 1), padding column -inf).

    `loss.main_loss=full`. For catalogues where (B, n_items + 1) scores do not fit, the same loss in
    item chunks (`loss.main_loss=chunked`) and a sampled softmax (`sampled`) are in
    `hm4sr_dist.catalog_loss` (docs/scaling.md).
    """
    return F.cross_entropy(full_precision(scores), target)       # log-sum-exp in fp32 under bf16 autocast


def category_loss(logits: Tensor, labels: Tensor, denominator: Tensor | float | None = None,
                  reduction: str = "per_item", mask: Tensor | None = None) -> Tensor:
    """Eq. 21-22: binary cross-entropy of per-item category logits against multi-hot labels.

    logits, labels: (..., C), one row per input position; `mask` (...,) bool keeps the real
    positions (None: every row is real). The summed BCE over every real (item, category) pair,
    divided by `denominator`; by default the number of real items (`reduction="per_item"`: eq. 22's
    sum over categories, averaged over the items as spec §3 says) or of real (item, category) pairs
    (`"per_element"`). Under data parallelism the caller passes the global count (see
    `HM4SRObjective`). Computed in fp32 (also under bf16 autocast), with a mask rather than
    boolean indexing, so no step reads a value back to the host.
    """
    logits = full_precision(logits)
    per_pair = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
    if mask is not None:
        per_pair = per_pair * mask.unsqueeze(-1)
    if denominator is None:
        denominator = category_count(logits, reduction, mask).clamp_min(1)
    return per_pair.sum() / denominator


CP_REDUCTIONS = ("per_item", "per_sequence", "per_element")


def category_count(logits: Tensor, reduction: str, mask: Tensor | None = None) -> Tensor:
    """What category_loss averages over, as a float tensor on the logits' device: real items
    (`per_item`), sequences (`per_sequence`: the paper's L_CP = sum over the items of S, so a
    sequence's items and categories are summed and the batch averages over sequences; logits are
    (B, L, C)) or real (item, category) pairs (`per_element`)."""
    if reduction not in CP_REDUCTIONS:
        raise ValueError(f"loss.cp_reduction: expected one of {CP_REDUCTIONS}, got {reduction!r}")
    if reduction == "per_sequence":
        return torch.tensor(float(logits.shape[0]), device=logits.device)
    items = (mask.sum(dtype=torch.float32) if mask is not None else
             torch.tensor(float(logits[..., 0].numel()), device=logits.device))
    return items * logits.shape[-1] if reduction == "per_element" else items


def info_nce(queries: Tensor, keys: Tensor, positives: Tensor, query_ids: Tensor, key_ids: Tensor,
             temperature: float) -> Tensor:
    """InfoNCE with cosine similarity (eq. 23, 25), mean over the query rows.

    queries (b, d); keys (N, d) (N >= b: the global batch); positives (b,) index of each query's
    positive key; query_ids (b,) and key_ids (N,) the target items: a key whose target equals the
    query's (other than its positive) is masked out, since it is not a true negative.
    """
    # fp32 (also under bf16 autocast): the cosines are divided by a temperature below 1
    with torch.autocast(queries.device.type, enabled=False):
        sim = (F.normalize(full_precision(queries), dim=-1) @ F.normalize(full_precision(keys), dim=-1).T
               / temperature)                                                             # (b, N)
    same_target = query_ids.unsqueeze(1) == key_ids.unsqueeze(0)
    rows = torch.arange(queries.shape[0], device=queries.device)
    same_target[rows, positives] = False
    return F.cross_entropy(sim.masked_fill(same_target, float("-inf")), positives)


def weighted_total(main: Tensor, cp: Tensor | None, idcl: Tensor | None, pcl: Tensor | None,
                   cp_weight: float, idcl_weight: float, pcl_weight: float) -> Tensor:
    """Eq. 27: L = L_main + l1 L_CP + l2 L_IDCL + l3 L_PCL (absent terms count as 0)."""
    total = main
    for term, weight in ((cp, cp_weight), (idcl, idcl_weight), (pcl, pcl_weight)):
        if term is not None and weight:
            total = total + weight * term
    return total
