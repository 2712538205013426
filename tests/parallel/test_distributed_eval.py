"""Distributed full-ranking evaluation equals single-process evaluation exactly.

Two gloo ranks each read their share of the prepared validation and test users (padded rows
masked), sum the metric sums with an all-reduce and divide once.
"""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hm4sr_dist.config import ExperimentConfig
from hm4sr_dist.data import ShardReader, load_catalog
from hm4sr_dist.evaluate import evaluate_sums
from hm4sr_dist.metrics import finalize
from hm4sr_dist.objective import build_objective


def metrics(prepared, split, rank, world, batch_size):
    torch.manual_seed(0)                             # the same weights on every rank
    cfg = ExperimentConfig()
    cfg.model.hidden_size, cfg.model.inner_size, cfg.model.modalities = 16, 32, ["id"]
    cfg.loss.cp_weight = cfg.loss.pcl_weight = 0.0
    model = build_objective(cfg.model, cfg.loss, load_catalog(prepared)).model
    reader = ShardReader(prepared, split, batch_size, rank=rank, world_size=world)
    sums = evaluate_sums(model, reader, [5, 10, 20])
    if world > 1:
        for value in sums.values():
            dist.all_reduce(value)
    return finalize(sums, [5, 10, 20])


def worker(rank, world, prepared, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    result = {split: metrics(prepared, split, rank, world, 7) for split in ("valid", "test")}
    if rank == 0:
        torch.save(result, out_file)
    dist.destroy_process_group()


def test_two_rank_evaluation_equals_single_process(prepared_sequences, tmp_path):
    single = {split: metrics(str(prepared_sequences), split, 0, 1, 16) for split in ("valid", "test")}
    mp.spawn(worker, args=(2, str(prepared_sequences), str(tmp_path / "init"), str(tmp_path / "out.pt")),
             nprocs=2, join=True)
    dual = torch.load(tmp_path / "out.pt")
    for split in ("valid", "test"):
        assert single[split]["count"] == 60                   # every user exactly once
        assert dual[split] == single[split], split             # exact, not approximately
