"""The production training path on fake CUDA (`FakeTensorMode`): no GPU needed, every CPU machine
runs it. A mixed-device op, or a read of a tensor value on the host inside a step, raises.
The same path on a real GPU: `test_gpu.py` (`pytest -m gpu`). See `device_tier.py`.
"""

from __future__ import annotations

import pytest
import torch

from device_tier import (MAX_LEN, Device, assert_on, catalog, config, graph_backward, train_steps,
                         write_prepared)
from hm4sr_dist.batch import Batch
from hm4sr_dist.data import ShardReader
from hm4sr_dist.data.placement import BatchPlacement
from hm4sr_dist.diagnostics import MoEStats
from hm4sr_dist.evaluate import evaluate_sums
from hm4sr_dist.objective import build_objective
from hm4sr_dist.train.evaluation import fp32_model

FAKE = Device("cuda", fake=True)
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return write_prepared(tmp_path_factory.mktemp("device-tier"))


def test_graph_backward_matches_the_engine():
    """The fake tier's stand-in for the autograd engine gives the engine's gradients (CPU, fp64)."""
    cfg = config(**{"model.hidden_dropout": 0.0, "model.attn_dropout": 0.0})
    from hm4sr_dist.data.reader import collate
    import numpy as np
    rng = np.random.default_rng(0)
    samples = [(rng.integers(1, 41, 9), 1_600_000_000 + np.cumsum(rng.integers(0, 90000, 9)), int(n))
               for n in (3, 8, 5, 1, 6, 2, 7, 4)]
    batch = collate(samples, MAX_LEN)
    objective = build_objective(cfg.model, cfg.loss, catalog()).double()
    grads = []
    for backward in (torch.Tensor.backward, graph_backward):
        objective.zero_grad(set_to_none=True)
        torch.manual_seed(3)                              # the same PCL placeholders both times
        backward(objective(batch).total)
        grads.append({n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 20
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_steps_run_on_cuda(prepared, monkeypatch, precision):
    """Reader -> placement -> `run_epoch` -> `optimizer_step`: batches reach the device (finding 1 of
    issue 21: they never did), all four loss terms, backward and Adam on it, no host read."""
    run = train_steps(FAKE, prepared, monkeypatch, precision)
    assert len(run.steps) == 3
    for result, batch in run.steps:
        for name in ("item_seq", "time_seq", "seq_len", "target"):
            assert_on(getattr(batch, name), CUDA, torch.int64, name)
        terms = result.terms
        for name in ("total", "main", "cp", "idcl", "pcl"):      # losses and log-sum-exp in fp32
            assert_on(getattr(terms, name), CUDA, torch.float32, name)
        compute = torch.bfloat16 if precision == "bf16" else torch.float32
        assert_on(terms.output.cp_logits, CUDA, compute, "CP logits (a Linear: bf16 under autocast)")
        assert_on(terms.output.seq_repr, CUDA, torch.float32, "H (after LayerNorm: fp32 under autocast)")
        assert_on(result.grad_norm, CUDA, None, "grad norm")      # not read back per step
    for name, p in run.objective.named_parameters():              # fp32 weights, gradients, Adam
        assert_on(p, CUDA, torch.float32, name)
        if p.grad is not None:
            assert_on(p.grad, CUDA, torch.float32, f"{name}.grad")
    states = list(run.optimizer.state.values())
    assert states and all(s["exp_avg"].device.type == "cuda" for s in states)
    assert all(v.device.type == "cuda" for v in run.progress.sums.values())   # summed on the device


def test_placement_pads_to_the_run_widths(prepared, monkeypatch):
    """With data.length_widths, every batch is cut or padded to one of them (compile's shapes)."""
    run = train_steps(FAKE, prepared, monkeypatch, steps=4, **{"data.length_widths": [4, 8, MAX_LEN]})
    assert {b.item_seq.shape[1] for _, b in run.steps} <= {4, 8, MAX_LEN}
    assert all(b.item_seq.shape == (8, b.item_seq.shape[1]) for _, b in run.steps)


def test_evaluation_and_diagnostics_on_cuda_use_an_fp32_copy(prepared, monkeypatch):
    """Evaluation of a bf16-weight model: an fp32 copy on the device scores the placed batches;
    the metric sums and MoE statistics stay on the device, the user ids on the host."""
    cfg = config()
    model = build_objective(cfg.model, cfg.loss, catalog()).model.to(torch.bfloat16)
    with FAKE.mode(monkeypatch):
        model = model.to("cuda")
        from hm4sr_dist.train.acceleration import placement_for
        placement = placement_for(cfg, "cuda")
        reader = ShardReader(prepared, "valid", 8, max_len=MAX_LEN, placement=placement)
        evaluated = fp32_model(model)
        assert evaluated is not model and next(model.parameters()).dtype == torch.bfloat16
        stats, rows = MoEStats(model.modalities), []
        weight = evaluated.temporal_moe.expert_weight
        sums = evaluate_sums(evaluated, reader, [5, 10], 0, placement, rows_out=rows,
                             observe=lambda out, batch, w: stats.add(out, batch.time_seq, weight, w))
        reader.close()
    for name, p in evaluated.named_parameters():
        assert_on(p, CUDA, torch.float32, name)
    assert sums and all(v.device.type == "cuda" for v in sums.values())
    assert {"interactive_gates", "temporal_gates", "mult_sum"} <= stats.sums.keys()
    assert all(v.device.type == "cuda" for v in stats.sums.values())
    assert rows and all(u.device.type == "cpu" and r.device.type == "cpu" for u, r in rows)


def test_checkpoint_loads_onto_cuda(prepared, monkeypatch, tmp_path):
    """A checkpoint written on the CPU (the worker's files, a vocabulary-parallel slice with Adam
    state) loads onto the device: every load maps to the CPU first, then the weights are copied."""
    from hm4sr_dist.parallel.vocab import ItemTableShard, ShardAdam
    from hm4sr_dist.train.state import (TrainState, load_table_shard, load_worker_files,
                                        save_table_shard, save_worker_files)
    cfg = config()
    source = build_objective(cfg.model, cfg.loss, catalog())
    best = {k: v.detach().clone() for k, v in source.model.state_dict().items()}
    shard = ShardAdam(ItemTableShard(torch.randn(41, 8), 0, 1), 41, 1, 1e-3, 0.0)
    shard.weight.grad = torch.ones_like(shard.weight)
    shard.step()
    save_worker_files(tmp_path, 0, TrainState(epoch=2), best)
    save_table_shard(tmp_path, 0, shard.state_dict(best=shard.weight))
    target = build_objective(cfg.model, cfg.loss, catalog())
    cpu_shard = ShardAdam(ItemTableShard(torch.zeros(41, 8), 0, 1), 41, 1, 1e-3, 0.0)
    # read on the host (a fake mode would make the loaded tensors fake too), mapped to the CPU
    state, best_model, _ = load_worker_files(tmp_path, 0)
    slice_state = load_table_shard(tmp_path, 0, 1)
    assert state.epoch == 2 and all(v.device.type == "cpu" for v in best_model.values())
    with FAKE.mode(monkeypatch):
        model = target.model.to("cuda")
        model.load_state_dict({k: v.to("cuda") for k, v in best_model.items()})
        moved = ShardAdam(ItemTableShard(cpu_shard.weight.detach().to("cuda"), 0, 1), 41, 1, 1e-3, 0.0)
        best_slice = moved.load_state_dict(slice_state)
        moved.weight.grad = torch.ones_like(moved.weight)
        moved.step()                                    # Adam state restored from the CPU file
        assert_on(best_slice, CUDA, torch.float32, "best slice")
        assert all(t.device.type == "cuda" for s in moved.optimizer.state.values() for t in s.values()
                   if isinstance(t, torch.Tensor) and t.dim())
    assert all(p.device.type == "cuda" for p in model.parameters())


def test_vocab_parallel_path_on_cuda(prepared, monkeypatch):
    """loss.main_loss=vocab_parallel (one worker): the sharded lookup, eq. 20 over the slice and
    their hand-written backward passes, the slice's own Adam, all on the device."""
    from hm4sr_dist.objective import BatchExchange
    from hm4sr_dist.parallel.vocab import ItemTableShard, ShardAdam, build_vocab_parallel
    cfg = config()
    cfg.loss.main_loss = "vocab_parallel"                # (needs 2+ workers in a config; one here)
    exchange = BatchExchange()
    table, cpu_shard = build_vocab_parallel(cfg.model, cfg.optim, 16, catalog().n_items, exchange)
    objective = build_objective(cfg.model, cfg.loss, catalog(), exchange, table=table)
    host_batch = next(iter(ShardReader(prepared, "train", 8, seed=1, max_len=MAX_LEN, prefetch_batches=0)))
    with FAKE.mode(monkeypatch):
        objective = objective.to("cuda")
        # the rows are drawn on the CPU (seeded generators), then moved, as build_vocab_parallel does
        rows = cpu_shard.weight.detach().to("cuda")
        table_shard = ShardAdam(ItemTableShard(rows, table.start, 1), table.n_rows, 1, 1e-3, 0.0)
        batch = BatchPlacement("cuda")(host_batch)
        terms = objective(batch, table_shard.weight)
        terms.total.backward()
        table_shard.step(lr=1e-3)
        norm_sq = table_shard.grad_norm_sq()
    for name in ("main", "cp", "idcl", "pcl"):
        assert_on(getattr(terms, name), CUDA, torch.float32, name)
    assert_on(table_shard.weight, CUDA, torch.float32, "slice")
    assert_on(norm_sq, CUDA, torch.float64, "slice norm")
    assert all(p.grad is not None and p.grad.device.type == "cuda"
               for n, p in objective.named_parameters() if n.startswith("model.encoders.id"))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_chunked_main_loss_on_cuda(prepared, monkeypatch, precision):
    """loss.main_loss=chunked: its custom backward (recomputed blocks) on the device; under bf16
    autocast its forward runs in fp32, as its backward does (`custom_fwd`)."""
    run = train_steps(FAKE, prepared, monkeypatch, precision, steps=2,
                      **{"loss.main_loss": "chunked", "loss.item_chunk_size": 16})
    assert all(r.terms.main.device.type == "cuda" and r.terms.main.dtype == torch.float32
               for r, _ in run.steps)


def test_a_cpu_batch_on_a_cuda_model_is_the_error_the_placement_prevents(monkeypatch):
    """The tier sees finding 1: a host batch given to the model on the device raises."""
    from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError
    cfg = config()
    objective = build_objective(cfg.model, cfg.loss, catalog())
    batch = Batch(torch.ones(2, 3, dtype=torch.long), torch.full((2, 3), 1_600_000_000),
                  torch.tensor([3, 2]), torch.tensor([4, 5]))
    with FAKE.mode(monkeypatch):
        objective = objective.to("cuda")
        with pytest.raises(FakeTensorDeviceMismatchError):
            objective(batch)
