"""`loss.main_loss=vocab_parallel` in real training: HM4SR's objective, a DeepSpeed engine, each
rank's ID-table slice outside it (docs/scaling.md, "Vocabulary-parallel").

Two gloo ranks (started as tests/parallel/test_vocab_parallel.py starts them) run the production
pieces: `build_vocab_parallel`, `build_objective(table=...)`, `build_engine`, `engine_step`,
`save_table_shard` / `load_table_shard`, `distributed_metrics`. The model is HM4SR with ID + text,
both MoEs (so time), CP, IDCL and PCL on (dropout off; PCL's placeholder positions drawn from each
row's own content, as in test_global_negatives.py, so both runs see the same views). One process with
the whole table, the full softmax and a plain Adam is the reference:

- three optimizer steps (the learning rate changed before the third, so the slice must follow the
  engine's): the ranks' mean loss terms and the weights (slices concatenated) equal the reference;
- two steps of two accumulated micro-batches each: likewise;
- a checkpoint after the first step, loaded into freshly built engines and slices, then the last two
  steps: the same losses and weights as the uninterrupted run;
- evaluation from the shared initial weights: the metrics and every user's rank equal the unsharded
  evaluation exactly.

In one process: checkpoint slices re-cut for another number of ranks equal a one-process Adam on
the whole table; missing slices are an error that says why.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from hm4sr_dist.config import ExperimentConfig
from hm4sr_dist.data.reader import EvalBatch, collate
from hm4sr_dist.evaluate import evaluate_sums
from hm4sr_dist.metrics import finalize
from hm4sr_dist.model import hm4sr as hm4sr_module
from hm4sr_dist.objective import build_objective
from hm4sr_dist.parallel.vocab import (ItemTableShard, ShardAdam, build_vocab_parallel, reslice_states,
                                       shard_bounds)
from hm4sr_dist.synthetic import generate_log, log_samples
from hm4sr_dist.train.state import load_table_shard, save_table_shard
from test_global_negatives import row_deterministic_mask
from test_vocab_parallel import WORLD, _spawn

LR, WD = 0.01, 0.5                 # weight decay: Adam's step then depends on the gradient's scale
MICRO = 4                          # rows per rank per forward pass
STEPS, SAVE_AFTER, LR_DROP_AT = 3, 1, 2
ACCUM_STEPS = 2
KS, EVAL_BATCH, EVAL_CHUNK = [1, 3, 5], 7, 4
TOL32 = dict(rtol=1e-4, atol=1e-5)   # float32, other reduction orders (DeepSpeed reduces no float64)
MAX_LEN = 12


def make_log():
    return generate_log(n_users=40, n_clusters=3, items_per_cluster=6, min_len=6, max_len=12,
                        text_width=6, image_width=5, seed=11)


def config(main_loss: str, accum: int = 1) -> ExperimentConfig:
    cfg = ExperimentConfig()
    m = cfg.model
    m.hidden_size, m.inner_size, m.max_seq_len, m.modalities = 8, 16, MAX_LEN, ["id", "text"]
    m.hidden_dropout = m.attn_dropout = 0.0
    cfg.loss.main_loss, cfg.loss.item_chunk_size = main_loss, 4        # slices of 10 and 9 rows
    cfg.loss.cp_weight = cfg.loss.idcl_weight = cfg.loss.pcl_weight = 1.0
    cfg.optim.lr, cfg.optim.weight_decay = LR, WD
    cfg.optim.batch_size, cfg.train.grad_accum_steps = WORLD * MICRO * accum, accum
    cfg.train.num_workers, cfg.train.precision = WORLD, "fp32"
    return cfg.validate()


def train_batches(log, n: int) -> list:
    """n global micro-batches of WORLD * MICRO rows (rank-major: rank r holds rows r*MICRO..)."""
    samples = log_samples(log, "train")
    order = np.random.default_rng(0).permutation(len(samples))
    rows = WORLD * MICRO
    return [collate([samples[i] for i in order[k * rows:(k + 1) * rows]], MAX_LEN) for k in range(n)]


def rank_rows(batch, rank: int):
    rows = slice(rank * MICRO, (rank + 1) * MICRO)
    return type(batch)(batch.item_seq[rows], batch.time_seq[rows], batch.seq_len[rows], batch.target[rows])


def eval_batches(log, rank: int, world: int) -> list[EvalBatch]:
    """This rank's share of the validation users in equal batches, the last one padded (masked)."""
    samples = log_samples(log, "valid")
    users = np.array_split(np.arange(len(samples)), world)[rank]
    out = []
    for start in range(0, len(users), EVAL_BATCH):
        ids = list(users[start:start + EVAL_BATCH])
        mask = torch.zeros(EVAL_BATCH, dtype=torch.bool)
        mask[:len(ids)] = True
        user = torch.full((EVAL_BATCH,), -1, dtype=torch.long)
        user[:len(ids)] = torch.tensor(ids, dtype=torch.long)
        rows = [samples[i] for i in ids] + [samples[ids[0]]] * (EVAL_BATCH - len(ids))
        out.append(EvalBatch(collate(rows, MAX_LEN), mask, user))
    return out


def reference_objective(log, seed: int = 0):
    """The unsharded objective every run starts from (same weights on every process). Every
    parameter is moved off its initial value: a zero-initialised bias whose gradient is zero in
    exact arithmetic (the key bias of attention: softmax ignores a per-row constant) would get a
    rounding-noise gradient, and Adam's step on noise is +-lr by its sign, different per run;
    with weight decay on a non-zero value the step is decided by the decay, not by the noise."""
    torch.manual_seed(seed)
    cfg = config("full")
    objective = build_objective(cfg.model, cfg.loss, log.catalog).train()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in objective.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        objective.model.items.id_table.weight[0].zero_()          # the padding item
    return objective


def lr_at(step: int) -> float:
    return LR / 2 if step >= LR_DROP_AT else LR


# -- the two ranks ----------------------------------------------------------------------------------

def _vocab_setup(log, accum: int, seed: int = 0):
    """The production build of one rank, its replicated weights and slice set from the reference."""
    from hm4sr_dist.parallel import DistributedExchange
    from hm4sr_dist.train.engine import build_engine

    cfg = config("vocab_parallel", accum)
    exchange = DistributedExchange()
    table, shard = build_vocab_parallel(cfg.model, cfg.optim, cfg.loss.item_chunk_size, log.catalog.n_items,
                                        exchange)
    objective = build_objective(cfg.model, cfg.loss, log.catalog, exchange, table=table).train()
    reference = reference_objective(log, seed).state_dict()
    whole = reference.pop("model.items.id_table.weight")
    objective.load_state_dict(reference)                     # strict: everything but the ID table
    with torch.no_grad():
        shard.weight.copy_(whole[table.start:table.stop])
    return cfg, table, shard, objective, build_engine(objective, cfg, WORLD, on_gpu=False)


def _run_steps(engine, shard, batches, rank, first: int, last: int, accum: int = 1) -> list[dict]:
    from hm4sr_dist.train.engine import engine_step

    step, terms = engine_step(engine, shard), []
    for k in range(first, last):
        for group in engine.optimizer.param_groups:       # a schedule: the slice must follow it
            group["lr"] = lr_at(k)
        for m in range(accum):
            result = step(rank_rows(batches[k * accum + m], rank).trimmed())
            assert result.boundary == (m == accum - 1)
            terms.append(result.terms.scalars())
    return terms


def _weights(engine, shard) -> dict:
    return {"replicated": {k: v.detach().clone() for k, v in engine.module.state_dict().items()},
            "slice": shard.weight.detach().clone(), "bounds": (shard.shard.start, shard.shard.stop)}


def _training_worker(rank, port, out_file):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    from hm4sr_dist.train.evaluation import distributed_metrics

    hm4sr_module.placeholder_mask = row_deterministic_mask
    log, out = make_log(), {}
    ckpt = Path(out_file).parent / "checkpoint"

    # evaluation from the initial weights, then three steps with a checkpoint after the first
    cfg, table, shard, objective, engine = _vocab_setup(log, accum=1)
    metrics, rows = distributed_metrics(engine.module.model, eval_batches(log, rank, WORLD), KS, EVAL_CHUNK,
                                        per_user=True, table=table, id_rows=shard.weight)
    out["eval"] = {"metrics": metrics,
                   "rows": None if rows is None else {k: v.tolist() for k, v in rows.items()}}
    batches = train_batches(log, STEPS)
    out["terms"] = _run_steps(engine, shard, batches, rank, 0, SAVE_AFTER)
    ckpt.mkdir(exist_ok=True)
    engine.save_checkpoint(str(ckpt), tag="t")
    save_table_shard(ckpt, rank, shard.state_dict())
    dist.barrier()
    out["terms"] += _run_steps(engine, shard, batches, rank, SAVE_AFTER, STEPS)
    out["weights"] = _weights(engine, shard)

    # resume: fresh engine and slice (other initial weights), the checkpoint loaded, the last steps
    _, _, shard, _, engine = _vocab_setup(log, accum=1, seed=1)
    engine.load_checkpoint(str(ckpt), tag="t")
    shard.load_state_dict(load_table_shard(ckpt, rank, WORLD))
    out["resumed_terms"] = _run_steps(engine, shard, batches, rank, SAVE_AFTER, STEPS)
    out["resumed_weights"] = _weights(engine, shard)

    # gradient accumulation: the slice steps at the engine's boundaries only
    _, _, shard, _, engine = _vocab_setup(log, accum=ACCUM_STEPS)
    batches = train_batches(log, 2 * ACCUM_STEPS)
    out["accum_terms"] = _run_steps(engine, shard, batches, rank, 0, 2, ACCUM_STEPS)
    out["accum_weights"] = _weights(engine, shard)
    torch.save(out, f"{out_file}.{rank}")
    dist.destroy_process_group()


# -- the reference: one process, the whole table ----------------------------------------------------

def reference_run(log, batches, steps: int, accum: int = 1):
    """Per micro-batch loss terms and the final state of one process with the whole global batch:
    plain Adam over every parameter, the micro-batches' losses averaged, as DeepSpeed does."""
    objective = reference_objective(log)
    optimizer = torch.optim.Adam(objective.parameters(), lr=LR, weight_decay=WD)
    terms = []
    for k in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(k)
        optimizer.zero_grad(set_to_none=True)
        for m in range(accum):
            result = objective(batches[k * accum + m].trimmed())
            (result.total / accum).backward()
            terms.append(result.scalars())
        for p in objective.parameters():            # DeepSpeed reduces a zero gradient for these
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        optimizer.step()
    return terms, objective.state_dict()


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    import deepspeed  # noqa: F401  (imported here, so that forked ranks inherit it)

    original = hm4sr_module.placeholder_mask
    hm4sr_module.placeholder_mask = row_deterministic_mask
    try:
        log = make_log()
        reference = {"plain": reference_run(log, train_batches(log, STEPS), STEPS),
                     "accum": reference_run(log, train_batches(log, 2 * ACCUM_STEPS), 2, ACCUM_STEPS)}
        results = _spawn(tmp_path_factory.mktemp("vocab_training"), worker=_training_worker, timeout=300)
    finally:
        hm4sr_module.placeholder_mask = original
    return log, reference, results


def _assert_terms_equal(per_rank: list[list[dict]], expected: list[dict]):
    assert len(per_rank[0]) == len(expected)
    for step, want in enumerate(expected):
        assert set(per_rank[0][step]) == set(want) == {"total", "main", "cp", "idcl", "pcl"}
        for name, value in want.items():
            mean = sum(r[step][name] for r in per_rank) / WORLD
            torch.testing.assert_close(torch.tensor(mean), torch.tensor(value), **TOL32,
                                       msg=f"step {step}: {name}")


def _assert_weights_equal(per_rank: list[dict], expected: dict):
    whole = expected["model.items.id_table.weight"]
    assert [r["bounds"] for r in per_rank] == [shard_bounds(whole.shape[0], r, WORLD) for r in range(WORLD)]
    torch.testing.assert_close(torch.cat([r["slice"] for r in per_rank]), whole, **TOL32, msg="ID table")
    replicated = {k: v for k, v in expected.items() if k != "model.items.id_table.weight"}
    for r in per_rank:
        assert r["replicated"].keys() == replicated.keys()
        for name, value in replicated.items():
            torch.testing.assert_close(r["replicated"][name], value, **TOL32, msg=name)


def test_vocab_parallel_training_steps_equal_the_unsharded_objective(two_rank_runs):
    log, reference, results = two_rank_runs
    terms, state = reference["plain"]
    _assert_terms_equal([r["terms"] for r in results], terms)
    _assert_weights_equal([r["weights"] for r in results], state)
    start = reference_objective(log).state_dict()["model.items.id_table.weight"]
    assert (state["model.items.id_table.weight"] - start).abs().amax(1)[1:].min() > 1e-4   # every row moved
    targets = torch.cat([b.target for b in train_batches(log, STEPS)])
    n_rows = log.catalog.n_items + 1
    first, second = shard_bounds(n_rows, 0, WORLD), shard_bounds(n_rows, 1, WORLD)
    assert (targets < first[1]).any() and (targets >= second[0]).any()


def test_vocab_parallel_gradient_accumulation_equals_the_unsharded_objective(two_rank_runs):
    _, reference, results = two_rank_runs
    terms, state = reference["accum"]
    _assert_terms_equal([r["accum_terms"] for r in results], terms)
    _assert_weights_equal([r["accum_weights"] for r in results], state)


def test_vocab_parallel_resume_from_a_checkpoint_equals_the_uninterrupted_run(two_rank_runs):
    _, _, results = two_rank_runs
    for r in results:
        assert r["resumed_terms"] == r["terms"][SAVE_AFTER:]               # same values, bit for bit
        assert torch.equal(r["resumed_weights"]["slice"], r["weights"]["slice"])
        for name, value in r["weights"]["replicated"].items():
            assert torch.equal(r["resumed_weights"]["replicated"][name], value), name


def test_vocab_parallel_evaluation_equals_the_unsharded_evaluation(two_rank_runs):
    log, _, results = two_rank_runs
    model = reference_objective(log).model
    batches = [b for r in range(WORLD) for b in eval_batches(log, r, WORLD)]
    rows = []
    expected = finalize(evaluate_sums(model, batches, KS, rows_out=rows), KS)
    got = results[0]["eval"]
    assert got["metrics"] == expected and results[1]["eval"]["metrics"] == expected
    assert expected["count"] == len(log_samples(log, "valid"))
    users = torch.cat([u for u, _ in rows])
    ranks = torch.cat([k for _, k in rows])[users.argsort()]
    assert got["rows"]["user"] == sorted(users.tolist())
    assert got["rows"]["rank"] == ranks.tolist()
    assert results[1]["eval"]["rows"] is None
    # the sharded ranks are not trivially equal: the targets spread over both slices and rank > 0
    assert (ranks > 0).any() and len(set(ranks.tolist())) > 2


# -- in one process: re-cutting a checkpoint for another number of ranks ----------------------------

def _unscaled_shard(table: torch.Tensor, rank: int, world: int) -> ItemTableShard:
    """Rank's slice without the 1/W gradient hook (these tests set the gradients themselves)."""
    start, stop = shard_bounds(table.shape[0], rank, world)
    return ItemTableShard(table[start:stop].clone(), start, world_size=1)


def _adam_states(table: torch.Tensor, grads: list[torch.Tensor], world: int) -> list[dict]:
    """Each of `world` ranks' ShardAdam state after steps with the given whole-table gradients."""
    states = []
    for rank in range(world):
        shard = _unscaled_shard(table, rank, world)
        adam = ShardAdam(shard, table.shape[0], world, lr=LR, weight_decay=WD)
        for grad in grads:
            shard.weight.grad = grad[shard.start:shard.stop].clone()
            adam.step()
        states.append(adam.state_dict(best=table[shard.start:shard.stop] * 2))
    return states


def test_checkpoint_slices_recut_for_another_world_size_equal_one_adam(tmp_path):
    g = torch.Generator().manual_seed(3)
    table = torch.randn(11, 4, generator=g)
    grads = [torch.randn(11, 4, generator=g) for _ in range(3)]
    (whole,) = _adam_states(table, grads[:2], 1)
    for old, new in ((2, 3), (3, 2), (2, 1), (1, 4)):
        saved = _adam_states(table, grads[:2], old)
        folder = tmp_path / f"{old}to{new}"
        folder.mkdir()
        for rank, state in enumerate(saved):
            save_table_shard(folder, rank, state)
        slices = []
        for rank in range(new):
            state = load_table_shard(folder, rank, new)
            assert state["world_size"] == new
            assert (state["start"], state["stop"]) == shard_bounds(11, rank, new)
            shard = _unscaled_shard(torch.zeros(11, 4), rank, new)
            adam = ShardAdam(shard, 11, new, lr=LR, weight_decay=WD)
            best = adam.load_state_dict(state)
            torch.testing.assert_close(best, whole["best"][shard.start:shard.stop], rtol=0, atol=0)
            shard.weight.grad = grads[2][shard.start:shard.stop].clone()
            adam.step()                                          # continue training after the re-cut
            slices.append(shard.weight.detach())
        one = _unscaled_shard(table, 0, 1)
        reference = ShardAdam(one, 11, 1, lr=LR, weight_decay=WD)
        for grad in grads:
            one.weight.grad = grad.clone()
            reference.step()
        torch.testing.assert_close(torch.cat(slices), one.weight.detach(), rtol=0, atol=0,
                                   msg=f"{old} -> {new}")


def test_missing_or_foreign_table_slices_are_errors_that_say_why(tmp_path):
    with pytest.raises(ValueError, match="no item-table slices.*not trained with loss.main_loss=vocab_par"):
        load_table_shard(tmp_path, 0, 2)
    table = torch.randn(11, 4)
    saved = _adam_states(table, [torch.randn(11, 4)], 3)
    for rank in (0, 2):                                          # rank 1's file lost
        save_table_shard(tmp_path, rank, saved[rank])
    with pytest.raises(ValueError, match="a rank's file is missing"):
        load_table_shard(tmp_path, 0, 2)
    adam = ShardAdam(_unscaled_shard(table, 1, 2), 11, 2, lr=LR, weight_decay=WD)
    with pytest.raises(ValueError, match=r"table slice \[0, 4\) of 11 rows for a rank holding \[6, 11\)"):
        adam.load_state_dict(saved[0])                           # another rank's (and world's) slice
    with pytest.raises(ValueError, match="a rank's file is missing"):
        reslice_states(saved[:1] + saved[2:], 1, 2)


def test_initial_table_is_the_same_for_any_number_of_ranks():
    """`initial_rows`: every slicing of the table draws the same values (blocks of 16384 rows, each
    from its own generator), the padding row is zero, the spread is initializer_range."""
    from hm4sr_dist.parallel.vocab import INIT_BLOCK_ROWS, initial_rows

    n_rows = 2 * INIT_BLOCK_ROWS + 5
    whole = initial_rows(0, n_rows, 3, 0.02, seed=7)
    for world in (2, 3, 5):
        parts = [initial_rows(*shard_bounds(n_rows, r, world), 3, 0.02, seed=7) for r in range(world)]
        assert torch.equal(torch.cat(parts), whole)
    assert whole[0].abs().sum() == 0 and abs(float(whole[1:].std()) - 0.02) < 1e-3
    assert not torch.equal(initial_rows(0, n_rows, 3, 0.02, seed=8), whole)
