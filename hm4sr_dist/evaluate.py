"""Full-ranking evaluation of a model over batches; returns summable metric sums (see metrics.py).

With a sharded item table (`loss.main_loss=vocab_parallel`: the model holds a slice, `table` is
`hm4sr_dist.parallel.vocab.ShardedItemTable`, `id_rows` the slice's ID rows) the input items are
looked up and the targets ranked across the workers' slices; every worker must then evaluate the
same number of equal-sized batches (the readers do), and the ranks are the unsharded ones exactly
(integer counts summed over the slices).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor

from hm4sr_dist.batch import Batch
from hm4sr_dist.data.placement import BatchPlacement
from hm4sr_dist.metrics import add_sums, metric_sums, target_ranks
from hm4sr_dist.model.hm4sr import HM4SR
from hm4sr_dist.objective import ItemTable


def _unpack(entry) -> tuple[Batch, Tensor | None, Tensor | None]:
    """A Batch, a (batch, weight) pair, or an EvalBatch (batch, mask[, users])."""
    if isinstance(entry, Batch):
        return entry, None, None
    batch, weight = entry[0], entry[1]
    return batch, weight, getattr(entry, "users", None)


@torch.no_grad()
def evaluate_sums(model: HM4SR, batches: Iterable, ks: Iterable[int], item_chunk_size: int = 0,
                  device: torch.device | str | BatchPlacement = "cpu", rows_out: list | None = None,
                  observe: Callable | None = None, table: ItemTable | None = None,
                  id_rows: Tensor | None = None) -> dict[str, Tensor]:
    """Sum NDCG/MRR/Hit over every row. A batch may come with a (B,) weight (0 = padded row).

    `device`: where to compute, or the `BatchPlacement` that takes each batch there (batches
    a reader already placed pass unchanged).
    `rows_out`, a list, receives (user ids, ranks) of the real rows of every batch (the batch must
    carry `users`); `observe(out, batch, weight)` sees every forward pass (diagnostics). `table` and
    `id_rows`: a sharded item table and this worker's ID rows (module docstring)."""
    sharded = table is not None and table.sharded
    place = device if isinstance(device, BatchPlacement) else BatchPlacement(device)
    was_training = model.training
    model.eval()
    try:
        # once per evaluation, not per batch
        item_repr = model.item_representations(id_rows) if sharded else model.item_representations()
        sums = None
        for entry in batches:
            batch, weight, users = _unpack(place(entry))
            if sharded:
                out = model(batch, item_repr=item_repr, lookup=table.lookup)
                ranks = table.target_ranks(out.seq_repr, item_repr, batch.target, item_chunk_size)
            else:
                out = model(batch, item_repr=item_repr)
                ranks = target_ranks(out.seq_repr, item_repr, batch.target, item_chunk_size)
            sums = add_sums(sums, metric_sums(ranks, ks, weight))
            if observe is not None:
                observe(out, batch, weight)
            if rows_out is not None:
                if users is None:
                    raise ValueError("per-user evaluation needs batches that carry user ids")
                real = torch.ones_like(ranks, dtype=torch.bool) if weight is None else weight.bool()
                rows_out.append((users[real.cpu()].cpu(), ranks[real].cpu()))
        if sums is None:
            raise ValueError("evaluation got no batches")
        return sums
    finally:
        model.train(was_training)
