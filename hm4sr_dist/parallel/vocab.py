"""Vocabulary-parallel eq. 19-20: the item table split over ranks, the softmax combined exactly.

For catalogues whose item table (n_items + 1, D) does not fit one worker. Rank r holds the
contiguous rows [start_r, stop_r) of the table (`shard_bounds`; row 0, the padding item, sits in
rank 0's slice and is never a candidate). Every rank scores ITS slice against the queries H of the
GLOBAL batch (all-gathered, (B, D)), and eq. 20's softmax cross-entropy is assembled from per-rank
pieces:

    lse_i    = log sum_r exp(lse_{r,i}),  lse_{r,i} = logsumexp over rank r's real items of h_i . x_v
               (computed as max_r lse_{r,i} + log sum_r exp(lse_{r,i} - max): one MAX and one SUM
               all-reduce of (B,) vectors)
    y_{i,t}  = h_i . x_{t_i}, computed by the rank whose slice holds t_i (0 elsewhere), SUM all-reduced
    loss_i   = lse_i - y_{i,t}

Backward, for g_i = dJ/d loss_i (all-reduced: each rank's objective uses its own rows):

    dJ/dx_v  = sum_i g_i (p_iv - [v = t_i]) h_i        v in this rank's slice: local, never reduced
    dJ/dh_i  = g_i (sum_v p_iv x_v - x_{t_i})          each rank adds its slice's share; the sum over
                                                       ranks and the return to the row's owner is the
                                                       backward of the exchange's all-gather
    p_iv     = exp(h_i . x_v - lse_i)                  recomputed chunk by chunk, never stored

J is the sum over ranks of each rank's loss. Data-parallel averaging of the replicated parameters'
gradients (DeepSpeed, DDP: x 1/W) then gives the gradient of the global-mean loss; a slice, which
must not be averaged, needs the same 1/W applied locally (what DeepSpeed's expert-parameter path
does; docs/scaling.md ("Vocabulary-parallel")).

Memory per rank: the slice (n/W x D) and its gradient, plus (B_global, chunk) scores in forward and
backward (`chunk_size` items of the slice at a time, 0 = the whole slice at once).

The input side (`vocab_parallel_lookup`): the batch's input items, looked up in the sharded table
by their owners (one SUM all-reduce of the (B_global, L, D) rows), with the gradient routed back
into the owners' slices.

Evaluation (`sharded_target_ranks`, `sharded_topk`) merges per-rank counts and top-K lists into the
unsharded full-ranking result (`metrics.target_ranks`).

The pure-math pieces (`slice_partials`, `combine_lse`, `slice_backward`, `slice_rank_counts`) do
no communication, so one process can simulate k ranks; `VocabParallelCrossEntropy` is the module.

Training with it (`loss.main_loss=vocab_parallel`, docs/scaling.md "Vocabulary-parallel"):
`ShardedItemTable` is the objective's `ItemTable` (input lookup, IDCL's targets, eq. 20,
evaluation ranks); `ItemTableShard` holds this rank's ID rows outside the DeepSpeed engine and
`ShardAdam` trains them beside it; `reslice_states` re-cuts a checkpoint's slices for another
number of ranks; `gather_table` assembles the whole table on one rank (the final weights file).
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from hm4sr_dist.objective import BatchExchange, ItemTable


# -- slicing ----------------------------------------------------------------------------------------

def shard_bounds(n_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous slice of n_rows table rows; sizes differ by at most one,
    the first n_rows % world_size ranks holding the extra row."""
    base, extra = divmod(n_rows, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _blocks(n_rows: int, chunk_size: int):
    chunk = max(n_rows, 1) if chunk_size <= 0 else chunk_size
    return [(s, min(s + chunk, n_rows)) for s in range(0, n_rows, chunk)]


def _block_logits(queries: Tensor, items: Tensor, offset: int, start: int, stop: int, acc) -> Tensor:
    """(B, stop - start) scores of local rows start..stop-1; the padding item (global 0) is -inf."""
    logits = (queries @ items[start:stop].T).to(acc)
    if offset + start == 0:
        logits[:, 0] = float("-inf")
    return logits


def _owned(target: Tensor, offset: int, n_local: int) -> Tensor:
    """(B,) bool: rows whose target item lives in this slice."""
    return (target >= offset) & (target < offset + n_local)


def _owned_rows(ids: Tensor, offset: int, n_local: int) -> tuple[Tensor, Tensor]:
    """(owned mask, slice row of each id, clamped into the slice). The callers weight by the mask
    instead of indexing with it: no data-dependent shape, so a step reads nothing to the host.
    Call only with n_local > 0."""
    return _owned(ids, offset, n_local), (ids - offset).clamp(0, n_local - 1)


# -- pure math: what one rank computes, no communication --------------------------------------------

def slice_partials(queries: Tensor, items: Tensor, target: Tensor, offset: int,
                   chunk_size: int = 0) -> tuple[Tensor, Tensor]:
    """This slice's share of the forward pass.

    queries (B, D) of the global batch; items (n_local, D) the table rows offset..offset+n_local-1;
    target (B,) global item IDs. Returns (lse_r (B,), the slice's logsumexp, -inf when it holds no
    real item; y_t (B,), h_i . x_{t_i} for rows whose target is in the slice, else 0), both in the
    accumulation dtype (float32 for half inputs).
    """
    acc = _accumulation_dtype(queries.dtype)
    lse = queries.new_full((queries.shape[0],), float("-inf"), dtype=acc)
    for start, stop in _blocks(items.shape[0], chunk_size):                 # online logsumexp
        block = _block_logits(queries, items, offset, start, stop, acc)
        lse = torch.logaddexp(lse, torch.logsumexp(block, 1))
        del block
    y_t = torch.zeros(queries.shape[0], dtype=acc, device=queries.device)
    if items.shape[0]:
        own, local_t = _owned_rows(target, offset, items.shape[0])
        y_t = torch.where(own, (queries * items[local_t]).sum(-1).to(acc), y_t)
    return lse, y_t


def combine_lse(row_max: Tensor, exp_sum: Tensor) -> Tensor:
    """lse_i = max_r lse_{r,i} + log sum_r exp(lse_{r,i} - max): the global log-sum-exp from the
    all-reduced max and the all-reduced sum of each rank's exp(lse_r - max)."""
    return row_max + exp_sum.log()


def slice_backward(queries: Tensor, items: Tensor, target: Tensor, offset: int, lse: Tensor,
                   grad_rows: Tensor, chunk_size: int = 0) -> tuple[Tensor, Tensor]:
    """This slice's gradients for per-row weights grad_rows (B,) = dJ/d loss_i (every rank's rows).

    Returns (dJ/dH restricted to this slice's items, (B, D): a partial sum over ranks;
    dJ/d items, (n_local, D): complete). lse (B,) is the combined global log-sum-exp.
    """
    acc = lse.dtype
    g = grad_rows.to(acc)
    grad_q = torch.zeros(queries.shape, dtype=acc, device=queries.device)
    grad_x = torch.empty_like(items)
    for start, stop in _blocks(items.shape[0], chunk_size):
        weight = _block_logits(queries, items, offset, start, stop, acc)     # recomputed
        weight = weight.sub_(lse.unsqueeze(1)).exp_().mul_(g.unsqueeze(1))   # g_i p_iv, in place
        grad_q += (weight.to(items.dtype) @ items[start:stop]).to(acc)
        grad_x[start:stop] = weight.T.to(queries.dtype) @ queries           # each row written once
        del weight
    if items.shape[0]:                                                       # the -onehot part
        own, local_t = _owned_rows(target, offset, items.shape[0])
        g_own = (g * own).unsqueeze(1)                                       # 0 on rows not ours
        grad_q -= g_own * items[local_t].to(acc)
        grad_x.index_add_(0, local_t, (-g_own * queries.to(acc)).to(items.dtype))
    return grad_q.to(queries.dtype), grad_x


def slice_rank_counts(queries: Tensor, items: Tensor, target: Tensor, offset: int,
                      target_score: Tensor, chunk_size: int = 0) -> Tensor:
    """(B,) int64: this slice's real items, other than the target, scoring >= the target's score
    (ties count against the target, as `metrics.target_ranks`)."""
    counts = torch.zeros(queries.shape[0], dtype=torch.int64, device=queries.device)
    for start, stop in _blocks(items.shape[0], chunk_size):
        scores = queries @ items[start:stop].T
        ids = torch.arange(offset + start, offset + stop, device=queries.device).unsqueeze(0)
        above = (scores >= target_score.unsqueeze(1)) & (ids != 0) & (ids != target.unsqueeze(1))
        counts += above.sum(1)
    return counts


def slice_target_scores(queries: Tensor, items: Tensor, target: Tensor, offset: int) -> Tensor:
    """(B,) h_i . x_{t_i} for rows whose target is in the slice, 0 elsewhere (in the query dtype,
    computed as `metrics.target_ranks` does, so the comparison is the unsharded one)."""
    score = torch.zeros(queries.shape[0], dtype=queries.dtype, device=queries.device)
    if items.shape[0]:
        own, local_t = _owned_rows(target, offset, items.shape[0])
        score = torch.where(own, (queries * items[local_t]).sum(-1), score)
    return score


# -- collectives ------------------------------------------------------------------------------------

def _world(group) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _all_reduce(tensor: Tensor, group, op=None) -> Tensor:
    """In place; the identity on one process."""
    if _world(group) > 1:
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM, group=group)
    return tensor


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-row loss_i = lse_i - y_{i,t} of the global batch, from this rank's slice + collectives."""

    @staticmethod
    def forward(ctx, queries: Tensor, items: Tensor, target: Tensor, offset: int, chunk_size: int,
                group) -> Tensor:
        lse_r, y_t = slice_partials(queries, items, target, offset, chunk_size)
        row_max = _all_reduce(lse_r.clone(), group, dist.ReduceOp.MAX)
        # one SUM all-reduce carries both the exp-sums and the owner's target logits
        packed = _all_reduce(torch.cat([(lse_r - row_max).exp(), y_t]), group)
        b = queries.shape[0]
        lse = combine_lse(row_max, packed[:b])
        ctx.save_for_backward(queries, items, target, lse)
        ctx.offset, ctx.chunk_size, ctx.group = offset, chunk_size, group
        return (lse - packed[b:]).to(queries.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_rows: Tensor):
        queries, items, target, lse = ctx.saved_tensors
        # dJ/d loss_i: every rank's objective may weigh any row (each uses its own rows' mean)
        g = _all_reduce(grad_rows.to(lse.dtype).contiguous().clone(), ctx.group)
        grad_q, grad_x = slice_backward(queries, items, target, ctx.offset, lse, g, ctx.chunk_size)
        return (grad_q if ctx.needs_input_grad[0] else None,
                grad_x if ctx.needs_input_grad[1] else None, None, None, None, None)


def vocab_parallel_cross_entropy(queries: Tensor, items: Tensor, target: Tensor, offset: int,
                                 chunk_size: int = 0, group=None) -> Tensor:
    """(B,) eq. 20's per-row loss over the whole catalogue, each rank holding one slice.

    queries (B, D) the global batch (identical on every rank: pass it through an autograd
    all-gather, whose backward sums the partial query gradients and returns each row's to its
    owner); items (n_local, D) this rank's rows offset..offset+n_local-1; target (B,) global IDs.
    Every rank of `group` must call it with equal B. The result is identical on every rank.
    """
    return _VocabParallelCrossEntropy.apply(queries, items, target, int(offset), int(chunk_size), group)


class VocabParallelCrossEntropy(nn.Module):
    """Eq. 20 with the item table sharded over the ranks of `exchange`.

    `forward(seq_repr (b, D), item_slice (n_local, D), target (b,))` -> the mean loss over this
    rank's b rows. Gradients are those of J = sum over ranks of each rank's loss, so after the
    engine's 1/W averaging of replicated gradients (and the same 1/W on the slice) they are the
    global-mean gradients of one process holding the whole table and the global batch.

    Args:
        n_rows: n_items + 1 (the table with its padding row).
        exchange: the batch exchange (`DistributedExchange`; `BatchExchange()` on one process).
        chunk_size: slice rows scored per block (0 = the whole slice at once).
        group: the process group of the collectives (the exchange's).
    """

    def __init__(self, n_rows: int, exchange: BatchExchange | None = None, chunk_size: int = 0, group=None):
        super().__init__()
        self.exchange = exchange or BatchExchange()
        self.n_rows, self.chunk_size = n_rows, chunk_size
        self.group = group if group is not None else getattr(self.exchange, "group", None)
        self.start, self.stop = shard_bounds(n_rows, self.exchange.rank, self.exchange.world_size)

    def forward(self, seq_repr: Tensor, item_slice: Tensor, target: Tensor) -> Tensor:
        if item_slice.shape[0] != self.stop - self.start:
            raise ValueError(f"rank {self.exchange.rank} holds table rows [{self.start}, {self.stop}), "
                             f"got a slice of {item_slice.shape[0]} rows")
        b, rank = seq_repr.shape[0], self.exchange.rank
        queries = self.exchange.all_gather(seq_repr)                              # (W b, D)
        targets = self.exchange.all_gather(target)
        rows = vocab_parallel_cross_entropy(queries, item_slice, targets, self.start, self.chunk_size,
                                            self.group)
        return rows[rank * b:(rank + 1) * b].mean()


class ItemTableShard(nn.Module):
    """This rank's rows [start, stop) of the (n_rows, D) ID table, as a parameter of its own.

    Meant to live OUTSIDE the module a DeepSpeed engine wraps: the engine would broadcast rank 0's
    values over it at initialisation and average it with other ranks' different rows
    (docs/scaling.md ("Vocabulary-parallel")). Its gradient is scaled by 1/W on arrival, so that with the
    gradients of `VocabParallelCrossEntropy` / `vocab_parallel_lookup` (those of the sum of the
    ranks' losses) it is the global-mean gradient, matching the engine's averaging of the rest.
    """

    def __init__(self, weight: Tensor, start: int, world_size: int):
        super().__init__()
        self.start, self.stop = start, start + weight.shape[0]
        self.weight = nn.Parameter(weight)
        if world_size > 1:
            self.weight.register_hook(lambda grad: grad / world_size)

    @classmethod
    def from_full(cls, table: Tensor, rank: int, world_size: int) -> "ItemTableShard":
        """The slice of a whole table (same initial values as an unsharded run)."""
        start, stop = shard_bounds(table.shape[0], rank, world_size)
        return cls(table[start:stop].detach().clone(), start, world_size)


INIT_BLOCK_ROWS = 16384


def initial_rows(start: int, stop: int, width: int, std: float, seed: int) -> Tensor:
    """Rows start..stop-1 of an N(0, std) table with a zero padding row 0, the same values whatever
    the slicing: block k of INIT_BLOCK_ROWS rows is drawn from its own generator (seed, k), so any
    number of ranks starts from the same whole table, each drawing at most two blocks it does not
    keep entirely."""
    out = torch.empty(stop - start, width)
    for k in range(start // INIT_BLOCK_ROWS, -(-stop // INIT_BLOCK_ROWS)):
        g = torch.Generator().manual_seed((int(seed) << 24) + k)
        block = torch.randn(INIT_BLOCK_ROWS, width, generator=g) * std
        a, z = max(start, k * INIT_BLOCK_ROWS), min(stop, (k + 1) * INIT_BLOCK_ROWS)
        out[a - start:z - start] = block[a - k * INIT_BLOCK_ROWS:z - k * INIT_BLOCK_ROWS]
    if start == 0 and stop > 0:
        out[0] = 0.0
    return out


class ShardAdam:
    """This rank's ID-table slice trained beside the DeepSpeed engine: its own torch Adam with the
    engine's learning rate (copied in at every step, so any schedule is followed) and weight decay
    (Adam is element-wise: the slice's step is the slice of the whole table's step). `step` is
    called at gradient-accumulation boundaries only; the gradient accumulates in between, as the
    engine's does, and arrives already / W (`ItemTableShard`)."""

    def __init__(self, shard: ItemTableShard, n_rows: int, world_size: int, lr: float, weight_decay: float):
        self.shard, self.n_rows, self.world_size = shard, n_rows, world_size
        self.optimizer = torch.optim.Adam(shard.parameters(), lr=lr, weight_decay=weight_decay)

    @property
    def weight(self) -> nn.Parameter:
        return self.shard.weight

    def step(self, lr: float | None = None) -> None:
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def grad_norm_sq(self, group=None) -> Tensor:
        """||gradient||^2 summed over every rank's slice (one all-reduce; 0 before any gradient),
        a float64 tensor on the slice's device (no host read)."""
        grad = self.weight.grad
        local = grad.detach().double().pow(2).sum() if grad is not None else \
            torch.zeros((), dtype=torch.float64, device=self.weight.device)
        return _all_reduce(local.reshape(1), group)[0]

    def state_dict(self, best: Tensor | None = None) -> dict:
        """What a checkpoint keeps of this rank: the slice, its bounds, Adam's state, and the slice
        of the best validation weights (`best`)."""
        return {"n_rows": self.n_rows, "world_size": self.world_size, "start": self.shard.start,
                "stop": self.shard.stop, "weight": self.weight.detach().cpu().clone(),
                "adam": copy.deepcopy(self.optimizer.state_dict()),      # not the live tensors
                "best": None if best is None else best.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> Tensor | None:
        """Restore a state of THIS rank's bounds (`reslice_states` makes one from another world
        size); returns the best slice, if the checkpoint has one."""
        mine = (self.n_rows, self.shard.start, self.shard.stop)
        if (state["n_rows"], state["start"], state["stop"]) != mine:
            raise ValueError(f"table slice [{state['start']}, {state['stop']}) of {state['n_rows']} rows "
                             f"for a rank holding [{self.shard.start}, {self.shard.stop}) of {self.n_rows}")
        with torch.no_grad():
            self.weight.copy_(state["weight"])
        self.optimizer.load_state_dict(state["adam"])
        best = state.get("best")
        return None if best is None else best.to(self.weight.device)


def reslice_states(parts: list[dict], rank: int, world_size: int) -> dict:
    """`ShardAdam.state_dict` of `rank` out of `world_size`, cut from the states `parts` that every
    rank of another (or the same) world size saved: slices, Adam moments and best slices are
    concatenated by their bounds and cut by `shard_bounds` again (Adam is element-wise, so the
    result is the state the new rank would have had). Holds the whole table while it cuts.
    Raises ValueError naming what is missing."""
    if not parts:
        raise ValueError("no item-table slices to re-slice")
    parts = sorted(parts, key=lambda p: p["start"])
    n_rows, saved_world = parts[0]["n_rows"], parts[0]["world_size"]
    bounds = [(p["start"], p["stop"]) for p in parts]
    expected = [shard_bounds(n_rows, r, saved_world) for r in range(saved_world)]
    if len(parts) != saved_world or bounds != expected or any(p["n_rows"] != n_rows for p in parts):
        raise ValueError(f"the checkpoint's item-table slices {bounds} are not the {saved_world} slices "
                         f"of {n_rows} rows it was saved with (a rank's file is missing or foreign)")
    start, stop = shard_bounds(n_rows, rank, world_size)
    cut = lambda key: torch.cat([p[key] for p in parts])[start:stop].clone()          # noqa: E731
    out = {"n_rows": n_rows, "world_size": world_size, "start": start, "stop": stop, "weight": cut("weight"),
           "best": cut("best") if all(p.get("best") is not None for p in parts) else None}
    adam = parts[0]["adam"]
    states = [p["adam"]["state"].get(0) for p in parts]
    if any((s is None) != (states[0] is None) for s in states):
        raise ValueError("the checkpoint's slices disagree on whether Adam has stepped")
    state = {}
    if states[0] is not None:
        state = {0: {"step": states[0]["step"].clone(),
                     **{k: torch.cat([s[k] for s in states])[start:stop].clone()
                        for k in ("exp_avg", "exp_avg_sq")}}}
    out["adam"] = {"state": state, "param_groups": adam["param_groups"]}
    return out


def gather_table(rows: Tensor, n_rows: int, group=None, dst: int = 0) -> Tensor | None:
    """The whole (n_rows, D) table on rank `dst` from every rank's slice (None elsewhere): one
    gather of slices padded to equal size. Only for the final weights file: it needs n_rows x D
    on `dst`."""
    world = _world(group)
    if world == 1:
        return rows.detach().clone()
    rank = dist.get_rank(group)
    padded = rows.detach().new_zeros((-(-n_rows // world),) + tuple(rows.shape[1:]))
    padded[:rows.shape[0]] = rows.detach()
    parts = [torch.empty_like(padded) for _ in range(world)] if rank == dst else None
    dist.gather(padded, parts, dst=dst, group=group)
    if rank != dst:
        return None
    return torch.cat([p[:b - a] for p, (a, b) in zip(parts, (shard_bounds(n_rows, r, world)
                                                             for r in range(world)))])


class ShardedItemTable(ItemTable):
    """The objective's `ItemTable` under `loss.main_loss=vocab_parallel`: this rank holds the table
    rows [start, stop) (`shard_bounds`); the input items and IDCL's targets are looked up in the
    owners' slices (`vocab_parallel_lookup`), eq. 20 is `VocabParallelCrossEntropy`, evaluation
    ranks are `sharded_target_ranks`. Every method is a collective: every rank calls it with the
    same number of rows (the readers give every rank equal batches); the input sequences may be
    of different lengths (each rank trims its batch), they are padded to the longest for the
    gather. No parameters: the ID rows are an `ItemTableShard` the caller hands to the objective."""

    sharded = True

    def __init__(self, n_rows: int, exchange: BatchExchange, chunk_size: int = 0, group=None):
        self.exchange, self.n_rows, self.chunk_size = exchange, n_rows, chunk_size
        self.group = group if group is not None else getattr(exchange, "group", None)
        self.start, self.stop = shard_bounds(n_rows, exchange.rank, exchange.world_size)
        self.loss = VocabParallelCrossEntropy(n_rows, exchange, chunk_size, self.group)

    def _mine(self, rows: Tensor, b: int) -> Tensor:
        rank = self.exchange.rank
        return rows[rank * b:(rank + 1) * b]

    def lookup(self, ids: Tensor, items: Tensor) -> Tensor:
        b, shape = ids.shape[0], tuple(ids.shape[1:])
        if shape and _world(self.group) > 1:                   # equal shapes for the gather
            longest = _all_reduce(torch.tensor(shape, device=ids.device), self.group, dist.ReduceOp.MAX)
            pad = [x for n, m in zip(reversed(shape), reversed(longest.tolist())) for x in (0, m - n)]
            ids = torch.nn.functional.pad(ids, pad)            # item 0: looked up, never used
        rows = vocab_parallel_lookup(self.exchange.all_gather(ids), items, self.start, self.group)
        return self._mine(rows, b)[(slice(None),) + tuple(slice(0, n) for n in shape)]

    def main_loss(self, seq_repr: Tensor, items: Tensor, target: Tensor) -> Tensor:
        return self.loss(seq_repr, items, target)

    def target_ranks(self, seq_repr: Tensor, items: Tensor, target: Tensor, chunk_size: int = 0) -> Tensor:
        b = seq_repr.shape[0]
        queries, targets = self.exchange.all_gather(seq_repr.detach()), self.exchange.all_gather(target)
        ranks = sharded_target_ranks(queries, items, targets, self.start, chunk_size, self.group)
        return self._mine(ranks, b)


def build_vocab_parallel(model_cfg, optim_cfg, chunk_size: int, n_items: int, exchange: BatchExchange,
                         device="cpu") -> tuple[ShardedItemTable, ShardAdam | None]:
    """This rank's `ShardedItemTable` and, with the id modality, its ID rows (N(0, initializer_range),
    `initial_rows`, the same whole table for any number of ranks) with their Adam."""
    table = ShardedItemTable(n_items + 1, exchange, chunk_size)
    if "id" not in model_cfg.modalities:
        return table, None
    rows = initial_rows(table.start, table.stop, model_cfg.hidden_size, model_cfg.initializer_range,
                        optim_cfg.seed).to(device)
    shard = ItemTableShard(rows, table.start, exchange.world_size)
    return table, ShardAdam(shard, n_items + 1, exchange.world_size, optim_cfg.lr, optim_cfg.weight_decay)


# -- the input side: looking up the batch's items in the sharded table ------------------------------

class _VocabParallelLookup(torch.autograd.Function):
    """x = table[ids] for ids of the global batch: each rank fills the rows it owns, SUM all-reduce."""

    @staticmethod
    def forward(ctx, ids: Tensor, items: Tensor, offset: int, group) -> Tensor:
        out = items.new_zeros(ids.shape + items.shape[1:])
        own = torch.zeros_like(ids, dtype=torch.bool)
        if items.shape[0]:
            own, local = _owned_rows(ids, offset, items.shape[0])
            out = torch.where(own.unsqueeze(-1), items[local], out)
        ctx.save_for_backward(ids, own)
        ctx.offset, ctx.rows, ctx.group = offset, items.shape[0], group
        return _all_reduce(out, group)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        ids, own = ctx.saved_tensors
        # every rank's objective may use any looked-up row: sum, then keep the rows of our items
        grad = _all_reduce(grad.contiguous().clone(), ctx.group)
        grad_items = grad.new_zeros((ctx.rows,) + grad.shape[ids.dim():])
        if ctx.rows:
            local = (ids - ctx.offset).clamp(0, ctx.rows - 1).reshape(-1)
            kept = grad * own.unsqueeze(-1)                                   # 0 on rows not ours
            grad_items.index_add_(0, local, kept.reshape((-1,) + grad.shape[ids.dim():]))
        return None, grad_items, None, None


def vocab_parallel_lookup(ids: Tensor, items: Tensor, offset: int, group=None) -> Tensor:
    """(ids.shape..., D) rows of the sharded table for ids of the GLOBAL batch (identical on every
    rank; all-gather the ids first). `F.embedding(ids, full_table)` without a padding index, and
    its gradient to this rank's slice (of J, the sum over ranks' objectives, like the loss)."""
    return _VocabParallelLookup.apply(ids, items, int(offset), group)


# -- evaluation -------------------------------------------------------------------------------------

@torch.no_grad()
def sharded_target_ranks(queries: Tensor, items: Tensor, target: Tensor, offset: int,
                         chunk_size: int = 0, group=None) -> Tensor:
    """(B,) full-ranking rank of each target (`metrics.target_ranks`), the table sharded.

    queries (B, D) the global batch on every rank; the owner supplies the target's score, every
    rank counts its slice's items at or above it, the counts are summed. Integers: exact.
    """
    target_score = _all_reduce(slice_target_scores(queries, items, target, offset), group)
    counts = slice_rank_counts(queries, items, target, offset, target_score, chunk_size)
    return _all_reduce(counts, group)


@torch.no_grad()
def sharded_topk(queries: Tensor, items: Tensor, offset: int, k: int, group=None) -> tuple[Tensor, Tensor]:
    """(scores (B, k), global item IDs (B, k)) of the k best real items (k <= n_items), the table
    sharded: each rank's top-k of its slice, all-gathered, merged by a top-k of the W k candidates.
    Tied scores may come out in any order, as with an unsharded `topk`."""
    scores = queries @ items.T
    if offset == 0 and items.shape[0]:
        scores[:, 0] = float("-inf")                                  # the padding item
    k_local = min(k, scores.shape[1])
    local_scores, local_ids = scores.topk(k_local, dim=1)
    # pad to k so that every rank gathers equal shapes (slices may hold fewer than k items)
    pad = k - k_local
    local_scores = torch.cat([local_scores, scores.new_full((scores.shape[0], pad), float("-inf"))], 1)
    local_ids = torch.cat([local_ids + offset, local_ids.new_full((scores.shape[0], pad), -1)], 1)
    world = _world(group)
    if world > 1:
        parts_s = [torch.empty_like(local_scores) for _ in range(world)]
        parts_i = [torch.empty_like(local_ids) for _ in range(world)]
        dist.all_gather(parts_s, local_scores.contiguous(), group=group)
        dist.all_gather(parts_i, local_ids.contiguous(), group=group)
        local_scores, local_ids = torch.cat(parts_s, 1), torch.cat(parts_i, 1)
    best, where = local_scores.topk(k, dim=1)
    return best, local_ids.gather(1, where)


# -- memory model -----------------------------------------------------------------------------------

def vocab_parallel_bytes(batch_global: int, n_items: int, width: int, world_size: int, chunk: int = 0,
                         element: int = 4, adam: bool = True) -> dict[str, int]:
    """Per-rank bytes of the vocab-parallel main loss (docs/scaling.md ("Vocabulary-parallel")).

    table: the largest slice (ceil((n+1)/W) rows x D) and its gradient, plus Adam's two states;
    scores: the (B_global, block) logits and their softmax/gradient weights, block = the chunk or
    the whole slice; queries: the gathered (B_global, D) queries and their gradient.
    """
    rows = -(-(n_items + 1) // world_size)
    block = rows if chunk <= 0 else min(chunk, rows)
    table = element * rows * width * (2 + (2 if adam else 0))
    scores = element * 2 * batch_global * block
    queries = element * 2 * batch_global * width
    return {"table": table, "scores": scores, "queries": queries, "total": table + scores + queries}


__all__ = ["shard_bounds", "slice_partials", "combine_lse", "slice_backward", "slice_rank_counts",
           "slice_target_scores", "vocab_parallel_cross_entropy", "VocabParallelCrossEntropy",
           "vocab_parallel_lookup", "ItemTableShard", "initial_rows", "ShardAdam", "reslice_states",
           "gather_table", "ShardedItemTable", "build_vocab_parallel",
           "sharded_target_ranks", "sharded_topk", "vocab_parallel_bytes"]
