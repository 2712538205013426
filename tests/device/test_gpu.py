"""The device tier on a real GPU (`pytest -m gpu`; `benchmarks/gpu_acceptance.py` runs it): the paths
of `test_fake_cuda.py` with values, compared with the CPU, plus what fake tensors cannot show
(staged copies on a side stream, bf16 against fp32, DeepSpeed ZeRO steps over NCCL).
Skipped, with the reason, on a machine without CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch

from device_tier import MAX_LEN, Device, catalog, config, train_steps, write_prepared
from hm4sr_dist.data import ShardReader
from hm4sr_dist.data.placement import BatchPlacement
from hm4sr_dist.objective import build_objective

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA GPU: run `pytest -m gpu` on a GPU machine "
                                        "(tests/device/test_fake_cuda.py covers the device paths here)")]

GPU, CPU = Device("cuda", fake=False), Device("cpu", fake=False)
# deterministic for a CPU/GPU comparison: no dropout, no placeholder positions (their masks come
# from each device's own random stream)
SAME_ON_BOTH = {"model.hidden_dropout": 0.0, "model.attn_dropout": 0.0, "loss.pcl_ratio": 0.0}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return write_prepared(tmp_path_factory.mktemp("device-tier-gpu"))


def _objective(**overrides):
    cfg = config(**overrides)
    torch.manual_seed(0)
    return build_objective(cfg.model, cfg.loss, catalog())


def _losses(run) -> list[float]:
    return [float(result.terms.total) for result, _ in run.steps]


def test_training_steps_on_the_gpu_match_the_cpu(prepared):
    cpu = train_steps(CPU, prepared, objective=_objective(**SAME_ON_BOTH), **SAME_ON_BOTH)
    gpu = train_steps(GPU, prepared, objective=_objective(**SAME_ON_BOTH), **SAME_ON_BOTH)
    assert all(b.item_seq.is_cuda for _, b in gpu.steps)
    assert _losses(gpu) == pytest.approx(_losses(cpu), rel=1e-4)
    for (name, p), q in zip(cpu.objective.named_parameters(), gpu.objective.parameters()):
        torch.testing.assert_close(q.detach().cpu(), p.detach(), rtol=1e-3, atol=1e-5, msg=name)


def test_bf16_autocast_loss_agrees_with_fp32(prepared):
    fp32 = train_steps(GPU, prepared, objective=_objective(**SAME_ON_BOTH), steps=1, **SAME_ON_BOTH)
    bf16 = train_steps(GPU, prepared, objective=_objective(**SAME_ON_BOTH), precision="bf16", steps=1,
                       **SAME_ON_BOTH)
    for name in ("total", "main", "cp", "idcl", "pcl"):
        a, b = getattr(fp32.steps[0][0].terms, name), getattr(bf16.steps[0][0].terms, name)
        assert b.dtype == torch.float32
        assert float(b) == pytest.approx(float(a), rel=2e-2), name


def test_staged_copies_deliver_the_readers_batches(prepared):
    """The side-stream copies of the prefetch thread give exactly the host reader's batches."""
    placement = BatchPlacement("cuda")
    assert placement.stages_copies
    kw = {"seed": 5, "max_len": MAX_LEN, "prefetch_batches": 3}
    host = list(ShardReader(prepared, "train", 8, placement=BatchPlacement("cpu"), **kw))
    staged = list(ShardReader(prepared, "train", 8, placement=placement, **kw))
    assert len(host) == len(staged) > 3
    for a, b in zip(host, staged):
        assert b.item_seq.is_cuda
        for name in ("item_seq", "time_seq", "seq_len", "target"):
            assert torch.equal(getattr(b, name).cpu(), getattr(a, name)), name
    evals = [list(ShardReader(prepared, "test", 8, placement=p, max_len=MAX_LEN, prefetch_batches=2))
             for p in (BatchPlacement("cpu"), placement)]
    for a, b in zip(*evals):
        assert torch.equal(b.batch.item_seq.cpu(), a.batch.item_seq) and torch.equal(b.mask.cpu(), a.mask)
        assert b.users.device.type == "cpu"


def test_evaluation_on_the_gpu_matches_the_cpu(prepared):
    from hm4sr_dist.train.evaluation import distributed_metrics
    model = _objective(**SAME_ON_BOTH).model.eval()
    results = []
    for device in ("cpu", "cuda"):
        placement = BatchPlacement(device)
        reader = ShardReader(prepared, "test", 8, max_len=MAX_LEN, placement=placement)
        results.append(distributed_metrics(model.to(device), reader, [5, 10], 0, placement, per_user=True))
    (cpu_metrics, cpu_rows), (gpu_metrics, gpu_rows) = results
    assert gpu_metrics["count"] == cpu_metrics["count"]
    for key, value in cpu_metrics.items():
        assert gpu_metrics[key] == pytest.approx(value, abs=1e-6), key
    assert (gpu_rows["user"] == cpu_rows["user"]).all()


def test_a_checkpoint_written_on_the_gpu_loads_on_the_cpu(prepared, tmp_path):
    from hm4sr_dist.parallel.vocab import ItemTableShard, ShardAdam
    from hm4sr_dist.train.state import TrainState, load_table_shard, load_worker_files, save_table_shard, \
        save_worker_files
    run = train_steps(GPU, prepared, steps=1)
    best = {k: v.detach().clone() for k, v in run.objective.model.state_dict().items()}   # CUDA tensors
    assert all(v.is_cuda for v in best.values())
    shard = ShardAdam(ItemTableShard(torch.randn(41, 8, device="cuda"), 0, 1), 41, 1, 1e-3, 0.0)
    shard.weight.grad = torch.ones_like(shard.weight)
    shard.step()
    save_worker_files(tmp_path, 0, TrainState(epoch=1), best)
    save_table_shard(tmp_path, 0, shard.state_dict(best=shard.weight))
    _, best_model, _ = load_worker_files(tmp_path, 0)
    state = load_table_shard(tmp_path, 0, 1)
    assert all(v.device.type == "cpu" for v in best_model.values())
    adam = [t for s in state["adam"]["state"].values() for t in s.values() if isinstance(t, torch.Tensor)]
    assert adam and all(t.device.type == "cpu" for t in adam)      # mapped, though saved from CUDA


@pytest.fixture
def compile_workers_stopped():
    """Inductor may start a pool of compile workers for GPU kernels; stop it, so no process
    outlives the session (tests/suite_guards.py fails a run that leaves one)."""
    yield
    from torch._inductor import async_compile
    shutdown = getattr(async_compile, "shutdown_compile_workers", None)
    if shutdown is not None:
        shutdown()


@pytest.mark.parametrize("overrides", [{}, {"loss.main_loss": "chunked", "loss.item_chunk_size": 16}],
                         ids=["full", "chunked"])
def test_compiled_step_matches_eager_on_the_gpu(prepared, overrides, compile_workers_stopped):
    settings = {**SAME_ON_BOTH, **overrides, "data.length_widths": [8, MAX_LEN]}
    eager = train_steps(GPU, prepared, objective=_objective(**settings), steps=2, **settings)
    from hm4sr_dist.train.acceleration import apply_compile
    compiled = train_steps(GPU, prepared, objective=apply_compile(_objective(**settings)), steps=2, **settings)
    assert _losses(compiled) == pytest.approx(_losses(eager), rel=1e-4)


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_deepspeed_zero_step_over_nccl(prepared, zero_stage):
    """One DeepSpeed ZeRO step in a one-process NCCL group, through `engine_step`."""
    deepspeed = pytest.importorskip("deepspeed", reason="DeepSpeed is not installed here")
    import torch.distributed as dist
    from hm4sr_dist.train.engine import build_engine, engine_step
    from hm4sr_dist.train.acceleration import apply_precision
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533", "RANK": "0",
                       "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        os.environ.setdefault(key, value)
    if not dist.is_initialized():
        dist.init_process_group("nccl", rank=0, world_size=1)
    assert deepspeed is not None
    cfg = config(**{"train.zero_stage": zero_stage, "train.precision": "bf16"})
    objective = _objective().to("cuda")
    apply_precision(objective, "bf16")
    engine = build_engine(objective, cfg, 1, on_gpu=True)
    before = [p.detach().clone() for p in objective.parameters()]
    placement = BatchPlacement("cuda")
    batch = next(iter(ShardReader(prepared, "train", 8, seed=1, max_len=MAX_LEN, placement=placement)))
    result = engine_step(engine)(batch)
    assert torch.isfinite(result.terms.total) and float(result.grad_norm) > 0
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, objective.parameters()))
