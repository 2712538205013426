"""Spec §3: 2 workers with batch b give the same loss and gradients as 1 worker with batch 2b.

Two real gloo ranks in spawned processes, IDCL, PCL and CP all on. Dropout is off and the PCL
placeholder positions are drawn per row from the row's own content, so both runs see identical
augmentations; everything else is the production code path.
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hm4sr_dist.config import ExperimentConfig
from hm4sr_dist.parallel import DistributedExchange
from hm4sr_dist.model import hm4sr as hm4sr_module
from hm4sr_dist.objective import build_objective
from hm4sr_dist.data.reader import collate
from hm4sr_dist.synthetic import generate_log, log_samples

ROWS = 12                      # global batch; each of 2 ranks takes 6
TOLERANCE = dict(rtol=1e-4, atol=1e-6)   # float32, different reduction orders


def row_deterministic_mask(real, seq_len, ratio, generator=None):
    """floor(ratio*len) real positions per row, chosen from the row's length only."""
    positions = torch.arange(real.shape[1]).unsqueeze(0)
    n_replace = torch.floor(seq_len.double() * ratio + 1e-9).long().unsqueeze(1)
    return ((positions * 7 + seq_len.unsqueeze(1)) % seq_len.unsqueeze(1) < n_replace) & real


def setup():
    torch.manual_seed(0)
    log = generate_log(n_users=40, n_clusters=3, items_per_cluster=6, min_len=6, max_len=12,
                       text_width=6, image_width=5, seed=11)
    # Pick rows whose targets repeat, so same-target masking across ranks is exercised.
    samples = log_samples(log, "train")[:ROWS]
    cfg = ExperimentConfig()
    cfg.model.hidden_size, cfg.model.inner_size, cfg.model.max_seq_len = 8, 16, 12
    cfg.model.hidden_dropout = cfg.model.attn_dropout = 0.0
    cfg.loss.idcl_weight, cfg.loss.pcl_weight, cfg.loss.cp_weight = 1.0, 1.0, 1.0
    return cfg, log, collate(samples, 12)


def run(exchange=None, rows=slice(None)):
    cfg, log, batch = setup()
    objective = build_objective(cfg.model, cfg.loss, log.catalog, exchange)
    part = type(batch)(batch.item_seq[rows], batch.time_seq[rows], batch.seq_len[rows], batch.target[rows])
    terms = objective(part)
    terms.total.backward()
    grads = {n: p.grad.detach().clone() for n, p in objective.named_parameters() if p.grad is not None}
    return {k: float(v) for k, v in terms.scalars().items()}, grads


def worker(rank, world_size, init_file, out_file):
    hm4sr_module.placeholder_mask = row_deterministic_mask       # this process only
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    share = ROWS // world_size
    losses, grads = run(DistributedExchange(), slice(rank * share, (rank + 1) * share))
    for g in grads.values():                          # what DDP / DeepSpeed do: average over ranks
        dist.all_reduce(g)
        g /= world_size
    for name in list(losses):
        t = torch.tensor(losses[name])
        dist.all_reduce(t)
        losses[name] = float(t) / world_size
    if rank == 0:
        torch.save({"losses": losses, "grads": grads}, out_file)
    dist.destroy_process_group()


@pytest.fixture
def row_masks(monkeypatch):
    """The row-deterministic PCL mask in this process, undone after the test (other tests check
    the real one)."""
    monkeypatch.setattr(hm4sr_module, "placeholder_mask", row_deterministic_mask)


def test_two_workers_equal_one_worker_with_double_batch(tmp_path, row_masks):
    single_losses, single_grads = run()
    mp.spawn(worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out.pt")), nprocs=2, join=True)
    dual = torch.load(tmp_path / "out.pt")
    assert set(single_losses) == {"total", "main", "cp", "idcl", "pcl"}
    for name, value in single_losses.items():
        torch.testing.assert_close(torch.tensor(dual["losses"][name]), torch.tensor(value), **TOLERANCE)
    assert set(dual["grads"]) == set(single_grads)
    for name, grad in single_grads.items():
        torch.testing.assert_close(dual["grads"][name], grad, **TOLERANCE, msg=lambda m: f"{name}: {m}")


def test_without_the_gather_the_gradients_differ(tmp_path, row_masks):
    """Guards the test itself: local-only negatives must NOT reproduce the big-batch step."""
    single_losses, _ = run()
    local = [run(None, slice(0, 6))[0]["idcl"], run(None, slice(6, 12))[0]["idcl"]]
    assert abs(sum(local) / 2 - single_losses["idcl"]) > 1e-3
