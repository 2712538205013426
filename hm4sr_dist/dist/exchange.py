"""Cross-worker exchange of batch rows for the global in-batch negatives (spec §3).

`all_gather` concatenates every rank's rows, rank-major, through
`torch.distributed.nn.functional.all_gather`, whose backward sends each row's gradient (summed
over every rank that used it) back to the rank that produced it. Each rank's loss is the mean over
its own rows, so after the usual gradient averaging over ranks (DDP / DeepSpeed), N workers with
batch b take exactly the step of one worker with batch N*b. Every rank must pass equal shapes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor

from hm4sr_dist.objective import BatchExchange


class DistributedExchange(BatchExchange):
    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def all_gather(self, tensor: Tensor) -> Tensor:
        if self.world_size == 1:
            return tensor
        if tensor.requires_grad:
            return torch.cat(dist_fn.all_gather(tensor, group=self.group), dim=0)
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.cat(parts, dim=0)

    def all_sum(self, tensor: Tensor) -> Tensor:
        total = tensor.detach().clone()
        if self.world_size > 1:
            dist.all_reduce(total, group=self.group)
        return total
