"""Cross-worker exchange of batch rows for the global in-batch negatives (spec §3).

`all_gather` concatenates every rank's rows, rank-major. Its backward all-reduces (sums) the
gradient of the gathered tensor and hands each rank the slice of its own rows: the gradient every
rank's loss sends to a row returns to the rank that produced it. Each rank's loss is the mean over
its own rows, so after the usual gradient averaging over ranks (DDP / DeepSpeed), N workers with
batch b take exactly the step of one worker with batch N*b. Every rank must pass equal shapes.
(An all-reduce rather than a reduce-scatter, because gloo has no reduce-scatter; the tensors are
(N*b, d), small next to the model's gradients.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from hm4sr_dist.objective import BatchExchange


def _gather_rows(tensor: Tensor, group, world_size: int) -> Tensor:
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=0)


class _AllGatherWithGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: Tensor, group, rank: int, world_size: int) -> Tensor:
        ctx.group, ctx.rank, ctx.rows = group, rank, tensor.shape[0]
        return _gather_rows(tensor, group, world_size)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None, None, None


class DistributedExchange(BatchExchange):
    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def all_gather(self, tensor: Tensor) -> Tensor:
        if self.world_size == 1:
            return tensor
        if tensor.requires_grad:
            return _AllGatherWithGradient.apply(tensor, self.group, self.rank, self.world_size)
        return _gather_rows(tensor, self.group, self.world_size)

    def all_sum(self, tensor: Tensor) -> Tensor:
        total = tensor.detach().clone()
        if self.world_size > 1:
            dist.all_reduce(total, group=self.group)
        return total
