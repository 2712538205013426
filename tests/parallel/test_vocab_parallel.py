"""Vocabulary-parallel eq. 20 (hm4sr_dist/parallel/vocab.py): the item table split over ranks.

1. The pure math, k ranks simulated in one process (slices combined by hand), against
   F.cross_entropy over the whole table: loss, query gradient, every slice's gradient (float64).
2. Two real gloo ranks (forked, free port, timeouts): the module's loss and the gradients of the
   queries and of each rank's table slice equal the unsharded full softmax to 1e-6 in float64,
   with and without chunking; a tiny model step (sharded input lookup + sharded loss) equals the
   unsharded one; the sharded evaluation ranks and top-K equal the unsharded ones.
3. The integration route of docs/scaling.md ("Vocabulary-parallel") on two ranks: a DeepSpeed engine over
   the replicated weights, the slice outside it; three Adam steps equal one process.
"""

import socket
import sys
import threading
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from hm4sr_dist.metrics import target_ranks
from hm4sr_dist.parallel.exchange import DistributedExchange
from hm4sr_dist.parallel.vocab import (ItemTableShard, VocabParallelCrossEntropy, combine_lse, shard_bounds,
                                       sharded_target_ranks, sharded_topk, slice_backward, slice_partials,
                                       slice_rank_counts, slice_target_scores, vocab_parallel_bytes,
                                       vocab_parallel_cross_entropy, vocab_parallel_lookup)

TOL = dict(rtol=1e-6, atol=1e-6)


def _inputs(b=6, n_items=10, width=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    queries = torch.randn(b, width, generator=g, dtype=dtype)
    table = torch.randn(n_items + 1, width, generator=g, dtype=dtype)
    table[0] *= 10                                   # a large padding row: it must still not count
    target = torch.randint(1, n_items + 1, (b,), generator=g)
    target[1] = target[0]                            # a repeated target
    target[2] = n_items                              # the last row of the last slice
    return queries, table, target


def reference(queries, table, target, weight=1.0):
    """The unsharded loss: (B, n+1) scores, padding -inf, F.cross_entropy; and its gradients."""
    q, x = queries.clone().requires_grad_(), table.clone().requires_grad_()
    loss = reference_loss(q, x, target)
    (weight * loss).backward()
    return loss.detach(), q.grad, x.grad


def reference_loss(queries, table, target):
    scores = queries @ table.T
    scores[:, 0] = float("-inf")
    return F.cross_entropy(scores, target)


def simulate(queries, table, target, bounds, chunk=0, weight=1.0):
    """k ranks in one process: each slice's partials, the combine (what the all-reduces do), each
    slice's backward, the query partials summed (what the all-gather's backward does)."""
    parts = [slice_partials(queries, table[a:z], target, a, chunk) for a, z in bounds]
    lse_r = torch.stack([p[0] for p in parts])                       # (k, B)
    row_max = lse_r.max(0).values
    lse = combine_lse(row_max, (lse_r - row_max).exp().sum(0))
    y_t = torch.stack([p[1] for p in parts]).sum(0)
    loss = (lse - y_t).mean()
    g = torch.full_like(lse, weight / queries.shape[0])                # d(weight * mean) / d loss_i
    grads = [slice_backward(queries, table[a:z], target, a, lse, g, chunk) for a, z in bounds]
    return loss, sum(gq for gq, _ in grads), torch.cat([gx for _, gx in grads])


def test_shard_bounds_cover_the_table_contiguously():
    for n_rows in (1, 7, 11, 64):
        for world in (1, 2, 3, 4, 8):
            bounds = [shard_bounds(n_rows, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n_rows
            assert all(bounds[r][1] == bounds[r + 1][0] for r in range(world - 1))
            sizes = [z - a for a, z in bounds]
            assert max(sizes) - min(sizes) <= 1 and max(sizes) == -(-n_rows // world)
    assert [shard_bounds(11, r, 3) for r in range(3)] == [(0, 4), (4, 8), (8, 11)]


@pytest.mark.parametrize("bounds", [
    [(0, 11)],                                        # one rank: the unsharded loss
    [(0, 6), (6, 11)],
    [(0, 4), (4, 8), (8, 11)],
    [(0, 1), (1, 1), (1, 7), (7, 11)],               # a padding-only slice and an empty one
])
@pytest.mark.parametrize("chunk", [0, 2, 3])
def test_simulated_ranks_equal_the_full_softmax(bounds, chunk):
    queries, table, target = _inputs()
    ref = reference(queries, table, target, weight=2.5)
    got = simulate(queries, table, target, bounds, chunk, weight=2.5)
    for name, a, b in zip(("loss", "d queries", "d table"), got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    assert got[2][0].abs().max() == 0                                  # the padding item: no gradient


def test_one_process_function_passes_gradcheck_and_equals_cross_entropy():
    """World size 1 (no process group): the autograd Function itself, finite differences."""
    queries, table, target = _inputs(b=4, n_items=6, width=3)
    q, x = queries.clone().requires_grad_(), table.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: vocab_parallel_cross_entropy(a, b, target, 0, 3), (q, x))
    loss = vocab_parallel_cross_entropy(q, x, target, 0, 2).mean()
    loss.backward()
    for a, b in zip((loss.detach(), q.grad, x.grad), reference(queries, table, target)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_one_process_lookup_is_f_embedding():
    _, table, _ = _inputs()
    ids = torch.tensor([[0, 3, 3], [10, 1, 0]])
    a, b = table.clone().requires_grad_(), table.clone().requires_grad_()
    upstream = torch.randn(2, 3, table.shape[1], dtype=table.dtype)
    got, want = vocab_parallel_lookup(ids, a, 0), F.embedding(ids, b)
    assert torch.equal(got, want)
    (got * upstream).sum().backward()
    (want * upstream).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)


def test_float32_slices_upcast_like_the_unsharded_loss():
    queries, table, target = _inputs(dtype=torch.float32)
    got = simulate(queries, table, target, [(0, 4), (4, 8), (8, 11)], chunk=3)
    for a, b in zip(got, reference(queries, table, target)):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)


def _int_valued(b=7, n_items=12, width=4, seed=1):
    """Small integers in float64: every dot product is exact, so ties are real ties."""
    g = torch.Generator().manual_seed(seed)
    queries = torch.randint(-2, 3, (b, width), generator=g).double()
    table = torch.randint(-2, 3, (n_items + 1, width), generator=g).double()
    table[5] = table[9]                               # duplicated items across slices: exact ties
    target = torch.tensor([5, 9, 1, 12, 3, 5, 7])[:b]
    return queries, table, target


def test_simulated_rank_counts_equal_the_unsharded_ranks_with_ties():
    queries, table, target = _int_valued()
    expected = target_ranks(queries, table, target)
    for bounds in ([(0, 13)], [(0, 7), (7, 13)], [(0, 5), (5, 9), (9, 13)]):
        score = sum(slice_target_scores(queries, table[a:z], target, a) for a, z in bounds)
        ranks = sum(slice_rank_counts(queries, table[a:z], target, a, score, chunk_size=2) for a, z in bounds)
        assert torch.equal(ranks, expected), bounds
    assert (expected > 0).any()                        # ties against the target do occur here


def test_memory_model_matches_a_hand_computation():
    # 10^6 items, D 64, B_global 1024, 8 ranks, chunk 16384: slice 125001 rows
    got = vocab_parallel_bytes(1024, 10**6, 64, 8, chunk=16384)
    assert got["table"] == 4 * 125001 * 64 * 4
    assert got["scores"] == 4 * 2 * 1024 * 16384
    assert got["queries"] == 4 * 2 * 1024 * 64
    assert got["total"] == got["table"] + got["scores"] + got["queries"]
    assert vocab_parallel_bytes(1024, 10**6, 64, 8)["scores"] == 4 * 2 * 1024 * 125001   # no chunk


# -- two real gloo ranks ----------------------------------------------------------------------------

WORLD, ROWS_PER_RANK, N_ITEMS, WIDTH, K, SEQ_LEN = 2, 3, 10, 5, 4, 4


def _tiny_model_inputs():
    """Input sequences (padding 0 included) and a replicated projection for the model-step check."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, N_ITEMS + 1, (WORLD * ROWS_PER_RANK, SEQ_LEN), generator=g)
    ids[:, 0] = torch.tensor([0, 1, 6, 10, 3, 8])                  # both slices, and the padding item
    return ids, torch.randn(WIDTH, WIDTH, generator=g, dtype=torch.float64)


def tiny_model_loss(embedded, proj, table_or_slice, target, loss_fn):
    """A stand-in for HM4SR: embed the sequence, encode, score against the catalogue."""
    return loss_fn(torch.tanh(embedded.mean(1) @ proj), table_or_slice, target)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, out_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    queries, table, target = _inputs(b=WORLD * ROWS_PER_RANK, n_items=N_ITEMS, width=WIDTH)
    rows = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
    out = {}
    for chunk in (0, 2):
        module = VocabParallelCrossEntropy(N_ITEMS + 1, DistributedExchange(), chunk_size=chunk)
        h = queries[rows].clone().requires_grad_()                     # this rank's own rows
        x = table[module.start:module.stop].clone().requires_grad_()   # this rank's slice only
        loss = module(h, x, target[rows])
        (2.5 * loss).backward()
        out[chunk] = {"loss": loss.detach(), "d_queries": h.grad, "d_slice": x.grad,
                      "bounds": (module.start, module.stop)}
    # a model step: the batch's input items looked up in the sharded table, encoded, scored; the
    # slice gets gradients from both the lookup and the loss
    ids, proj = _tiny_model_inputs()
    module = VocabParallelCrossEntropy(N_ITEMS + 1, DistributedExchange(), chunk_size=3)
    x = table[module.start:module.stop].clone().requires_grad_()
    w = proj.clone().requires_grad_()
    embedded = vocab_parallel_lookup(DistributedExchange().all_gather(ids[rows]), x, module.start)[rows]
    loss = tiny_model_loss(embedded, w, x, target[rows], module)
    loss.backward()
    out["model"] = {"loss": loss.detach(), "d_proj": w.grad, "d_slice": x.grad}
    ex = DistributedExchange()
    gathered = ex.all_gather(queries[rows])
    x = table[slice(*out[0]["bounds"])]
    out["ranks"] = sharded_target_ranks(gathered, x, ex.all_gather(target[rows]), out[0]["bounds"][0], 3)
    out["topk"] = sharded_topk(gathered, x, out[0]["bounds"][0], K)
    torch.save(out, f"{out_file}.{rank}")
    dist.destroy_process_group()


def _start_method() -> str:
    """fork when the test process runs nothing else: the ranks inherit the imported torch (a fresh
    import costs 5-15 s per process on a busy 2-core machine). With other threads alive (an
    embedded Ray's, later in the suite) forking is unsafe: spawn."""
    ray = sys.modules.get("ray")
    busy = threading.active_count() > 1 or (ray is not None and ray.is_initialized())
    return "spawn" if busy else "fork"


def _spawn(tmp_path, worker=_worker, timeout=90):
    ctx = mp.start_processes(worker, args=(_free_port(), str(tmp_path / "out")), nprocs=WORLD,
                             join=False, start_method=_start_method())
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError("vocab-parallel ranks did not finish")
    finally:
        for p in ctx.processes:                       # only the processes this test started
            if p.is_alive():
                p.terminate()
    return [torch.load(tmp_path / f"out.{r}") for r in range(WORLD)]


def test_two_gloo_ranks_equal_the_unsharded_softmax_and_ranking(tmp_path):
    results = _spawn(tmp_path)
    queries, table, target = _inputs(b=WORLD * ROWS_PER_RANK, n_items=N_ITEMS, width=WIDTH)
    ref_loss, ref_dq, ref_dx = reference(queries, table, target, weight=2.5)
    assert (target < 6).any() and (target >= 6).any()        # both ranks own some targets
    for chunk in (0, 2):
        per_rank = [r[chunk] for r in results]
        assert [p["bounds"] for p in per_rank] == [(0, 6), (6, 11)]
        # the engine's view: losses and replicated gradients averaged over ranks (x 1/W), the
        # slice gradient local and divided by W (what DeepSpeed does to expert parameters)
        torch.testing.assert_close(sum(p["loss"] for p in per_rank) / WORLD, ref_loss, **TOL)
        d_queries = torch.cat([p["d_queries"] for p in per_rank]) / WORLD
        torch.testing.assert_close(d_queries, ref_dq, **TOL, msg=f"chunk {chunk}: d queries")
        for p in per_rank:
            a, z = p["bounds"]
            torch.testing.assert_close(p["d_slice"] / WORLD, ref_dx[a:z], **TOL,
                                       msg=f"chunk {chunk}: d table[{a}:{z}]")
    ids, proj = _tiny_model_inputs()
    t, w = table.clone().requires_grad_(), proj.clone().requires_grad_()
    ref_loss = tiny_model_loss(F.embedding(ids, t), w, t, target, lambda h, x, y: reference_loss(h, x, y))
    ref_loss.backward()
    model = [r["model"] for r in results]
    torch.testing.assert_close(sum(m["loss"] for m in model) / WORLD, ref_loss.detach(), **TOL)
    # DeepSpeed's view: the replicated projection averaged over ranks, each slice local and / W
    torch.testing.assert_close(sum(m["d_proj"] for m in model) / WORLD, w.grad, **TOL)
    torch.testing.assert_close(torch.cat([m["d_slice"] for m in model]) / WORLD, t.grad, **TOL)
    assert t.grad[1:6].abs().sum() > 0 and t.grad[6:].abs().sum() > 0

    expected_ranks = target_ranks(queries, table, target)
    ref_scores = queries @ table.T
    ref_scores[:, 0] = float("-inf")
    ref_best, ref_ids = ref_scores.topk(K, dim=1)
    for r in results:
        assert torch.equal(r["ranks"], expected_ranks)
        torch.testing.assert_close(r["topk"][0], ref_best, rtol=0, atol=1e-12)
        assert torch.equal(r["topk"][1], ref_ids)      # random float64 scores: no ties


# -- the integration route of docs/scaling.md ("Vocabulary-parallel"), with a real DeepSpeed engine ----------

ENGINE_STAGES = (0,)        # (0, 2) passes too; ZeRO-2's engine costs 15 s more on a busy machine
STEPS, LR, WD = 3, 0.05, 0.5       # weight decay makes Adam's step depend on the gradient's scale
TOL32 = dict(rtol=1e-5, atol=1e-5)          # DeepSpeed reduces float32 gradients only


def _engine_inputs():
    _, table, target = _inputs(b=WORLD * ROWS_PER_RANK, n_items=N_ITEMS, width=WIDTH)
    ids, proj = _tiny_model_inputs()
    return table.float(), target, ids, proj.float()


class _TinyObjective(torch.nn.Module):
    """What the engine wraps: replicated weights only. The table slice is handed in (outside the
    engine): sharded lookup of the input items -> tanh encoder -> sharded eq. 20."""

    def __init__(self, proj, exchange):
        super().__init__()
        self.proj = torch.nn.Parameter(proj.clone())
        self.exchange = exchange
        self.main_loss = VocabParallelCrossEntropy(N_ITEMS + 1, exchange, chunk_size=3)

    def forward(self, ids, item_slice, start, target):
        b, rank = ids.shape[0], self.exchange.rank
        embedded = vocab_parallel_lookup(self.exchange.all_gather(ids), item_slice, start)
        embedded = embedded[rank * b:(rank + 1) * b]                    # this rank's rows
        return tiny_model_loss(embedded, self.proj, item_slice, target, self.main_loss)


def _engine_worker(rank, port, out_file):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    import deepspeed

    table, target, ids, proj = _engine_inputs()
    rows = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
    out = {}
    for stage in ENGINE_STAGES:
        objective = _TinyObjective(proj, DistributedExchange())
        engine, _, _, _ = deepspeed.initialize(
            model=objective, optimizer=torch.optim.Adam(objective.parameters(), lr=LR, weight_decay=WD),
            dist_init_required=False,
            config={"train_batch_size": WORLD * ROWS_PER_RANK,
                    "train_micro_batch_size_per_gpu": ROWS_PER_RANK,
                    "zero_optimization": {"stage": stage}, "gradient_clipping": 0.0,
                    "steps_per_print": 1 << 30})
        shard = ItemTableShard.from_full(table, rank, WORLD)             # outside the engine
        shard_opt = torch.optim.Adam(shard.parameters(), lr=LR, weight_decay=WD)
        losses = []
        for _ in range(STEPS):
            loss = engine(ids[rows], shard.weight, shard.start, target[rows])
            engine.backward(loss)
            engine.step()
            shard_opt.step()
            shard_opt.zero_grad()
            losses.append(loss.detach())
        out[stage] = {"losses": torch.stack(losses), "proj": engine.module.proj.detach().clone(),
                      "slice": shard.weight.detach().clone(), "bounds": (shard.start, shard.stop)}
    torch.save(out, f"{out_file}.{rank}")
    dist.destroy_process_group()


def test_deepspeed_engine_plus_shard_outside_it_trains_like_one_process(tmp_path):
    """Three Adam steps through a DeepSpeed engine holding only the replicated weights, each rank's
    table slice outside it with its own Adam (gradient / W): the losses and weights equal one
    process with the whole table (float32: DeepSpeed reduces no float64 gradients)."""
    table, target, ids, proj = _engine_inputs()
    t, w = table.clone().requires_grad_(), proj.clone().requires_grad_()
    opt = torch.optim.Adam([w, t], lr=LR, weight_decay=WD)
    ref_losses = []
    for _ in range(STEPS):
        loss = tiny_model_loss(F.embedding(ids, t), w, t, target, reference_loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ref_losses.append(loss.detach())
    # the reference first: its Adam imports torch._dynamo (15 s on a busy machine), which the
    # forked ranks then inherit, as they inherit deepspeed imported here
    import deepspeed  # noqa: F401

    results = _spawn(tmp_path, worker=_engine_worker, timeout=240)
    for stage in ENGINE_STAGES:
        per_rank = [r[stage] for r in results]
        mean_losses = sum(p["losses"] for p in per_rank) / WORLD
        torch.testing.assert_close(mean_losses, torch.stack(ref_losses), **TOL32)
        for p in per_rank:
            torch.testing.assert_close(p["proj"], w.detach(), **TOL32, msg=f"ZeRO {stage}: proj")
            a, z = p["bounds"]
            torch.testing.assert_close(p["slice"], t.detach()[a:z], **TOL32, msg=f"ZeRO {stage}: slice")
    assert not torch.allclose(t.detach(), table)                         # the steps moved the table
