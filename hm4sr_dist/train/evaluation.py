"""Full-ranking evaluation across ranks: each rank scores its own users, the summable metric state
is all-reduced, and (for the test split) every user's rank is gathered on rank 0.

Evaluation always runs in fp32: a model trained in bf16/fp16 is evaluated on an fp32 copy of its
weights, so ties and rounding do not depend on the training precision (metrics.py counts ties
against the target).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.distributed as dist

from hm4sr_dist.evaluate import evaluate_sums
from hm4sr_dist.metrics import finalize


HALF = (torch.bfloat16, torch.float16)


def fp32_model(model: torch.nn.Module) -> torch.nn.Module:
    """`model` itself when no parameter or buffer is in half precision, else a copy whose half
    tensors are fp32 (float64 buffers, such as the time embedding's frequencies, stay float64)."""
    if not any(t.dtype in HALF for t in list(model.parameters()) + list(model.buffers())):
        return model
    copied = copy.deepcopy(model)
    for module in copied.modules():
        for name, param in module.named_parameters(recurse=False):
            if param.dtype in HALF:
                param.data = param.data.float()
        for name, buf in module.named_buffers(recurse=False):
            if buf.dtype in HALF:
                setattr(module, name, buf.float())
    return copied


def distributed_metrics(model, reader, ks, item_chunk_size: int = 0, device="cpu", per_user: bool = False,
                        observe=None, table=None, id_rows=None
                        ) -> tuple[dict[str, float], dict[str, np.ndarray] | None]:
    """Metrics over every user of the reader's split, summed across ranks (the exact global mean).

    With `per_user`, returns on rank 0 also {"user": ids, "rank": ranks} for every real row of every
    rank, sorted by user (None elsewhere). `observe(out, batch, weight)` sees every forward pass.
    `table`, `id_rows`: the sharded item table of loss.main_loss=vocab_parallel and this rank's ID
    rows (`evaluate.evaluate_sums`; trained in fp32 only, so there is no half-precision copy to make).
    """
    rows: list[tuple[torch.Tensor, torch.Tensor]] | None = [] if per_user else None
    sums = evaluate_sums(fp32_model(model), reader, ks, item_chunk_size, device, rows_out=rows,
                         observe=observe, table=table, id_rows=id_rows)
    if dist.is_available() and dist.is_initialized():
        for value in sums.values():
            dist.all_reduce(value)
    metrics = finalize(sums, ks)
    if not per_user:
        return metrics, None
    users = torch.cat([u for u, _ in rows]).numpy() if rows else np.zeros(0, np.int64)
    ranks = torch.cat([r for _, r in rows]).numpy() if rows else np.zeros(0, np.int64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (users, ranks))
        users = np.concatenate([p[0] for p in parts])
        ranks = np.concatenate([p[1] for p in parts])
        if dist.get_rank() != 0:
            return metrics, None
    order = np.argsort(users, kind="stable")
    return metrics, {"user": users[order].astype(np.int64), "rank": ranks[order].astype(np.int64)}
