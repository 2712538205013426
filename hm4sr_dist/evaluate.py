"""Full-ranking evaluation of a model over batches; returns summable metric sums (see metrics.py)."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from hm4sr_dist.batch import Batch
from hm4sr_dist.metrics import add_sums, metric_sums, target_ranks
from hm4sr_dist.model.hm4sr import HM4SR


@torch.no_grad()
def evaluate_sums(model: HM4SR, batches: Iterable[Batch | tuple[Batch, Tensor]], ks: Iterable[int],
                  item_chunk_size: int = 0, device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """Sum NDCG/MRR/Hit over every row. A batch may come with a (B,) weight (0 = padded row)."""
    was_training = model.training
    model.eval()
    try:
        item_repr = model.item_representations()           # once per evaluation, not per batch
        sums = None
        for entry in batches:
            batch, weight = entry if isinstance(entry, tuple) else (entry, None)
            batch = batch.to(device).trimmed()
            out = model(batch, item_repr=item_repr)
            ranks = target_ranks(out.seq_repr, item_repr, batch.target, item_chunk_size)
            sums = add_sums(sums, metric_sums(ranks, ks, None if weight is None else weight.to(device)))
        if sums is None:
            raise ValueError("evaluation got no batches")
        return sums
    finally:
        model.train(was_training)
