"""The function every Ray Train worker runs: stream this rank's shards through a DeepSpeed-wrapped
HM4SR, evaluate on all ranks, checkpoint, early-stop, and finally test the best weights.

Checkpoints (pitfalls: ray#33369, PR#57118): every rank writes its DeepSpeed state into its own
local folder, a barrier, then every rank calls `ray.train.report` with its folder; Ray merges them
in storage. Restoring, every rank loads inside `checkpoint.as_directory()` and waits at a barrier
before leaving it. Checkpoints are taken at epoch ends, with each rank's RNG state and the reader
position (seed, epoch), so a resumed run continues exactly where the stopped one was.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from hm4sr_dist.config import ExperimentConfig, from_dict, to_dict
from hm4sr_dist.data import ShardReader, load_catalog
from hm4sr_dist.parallel import DistributedExchange
from hm4sr_dist.evaluate import evaluate_sums
from hm4sr_dist.metrics import finalize
from hm4sr_dist.objective import build_objective
from hm4sr_dist.parallel.engine import build_engine
from hm4sr_dist.train.monitor import Monitor, grad_norm, routing_summary, say
from hm4sr_dist.train.state import TrainState, load_worker_files, save_worker_files, seed_everything

DS_TAG = "engine"


def distributed_metrics(model, reader: ShardReader, cfg: ExperimentConfig, device) -> dict[str, float]:
    """Full-ranking metrics over every user of the split, summed across ranks (exact global mean)."""
    sums = evaluate_sums(model, reader, cfg.eval.ks, cfg.eval.item_chunk_size, device)
    for value in sums.values():
        dist.all_reduce(value)
    return finalize(sums, cfg.eval.ks)


def _inject_fault(cfg: ExperimentConfig, rank: int, step: int, run_dir: Path) -> None:
    """Test hook (train.fail_at_step): rank 1 dies once, as a crashed worker process would."""
    marker = run_dir / "fault_injected"
    if cfg.train.fail_at_step == step and rank == 1 and not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"killed rank {rank} at step {step}\n")
        say(f"[fault injection] rank {rank} exits at global step {step}")
        os._exit(1)


def train_loop_per_worker(loop_config: dict) -> None:
    cfg: ExperimentConfig = from_dict(ExperimentConfig, loop_config["config"]).validate()
    run_dir = Path(loop_config["run_dir"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    if not on_gpu:
        torch.set_num_threads(cfg.train.cpus_per_worker)
    seed_everything(cfg.optim.seed + rank)

    catalog = load_catalog(cfg.data.prepared_dir, mu=cfg.model.interval_scale)
    objective = build_objective(cfg.model, cfg.loss, catalog, DistributedExchange()).to(device)
    engine = build_engine(objective, cfg, world, on_gpu)
    model = engine.module.model

    state, best_model = TrainState(), None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            engine.load_checkpoint(folder, tag=DS_TAG)
            state, best_model = load_worker_files(Path(folder), rank)
            dist.barrier()                           # nobody leaves (and deletes) the folder early
        if rank == 0:
            say(f"resumed from checkpoint at epoch {state.epoch} (global step {state.global_step})")

    micro = cfg.micro_batch_size
    reader = lambda split, b: ShardReader(cfg.data.prepared_dir, split, b, rank=rank, world_size=world,  # noqa: E731
                                          seed=cfg.optim.seed, shuffle_buffer=cfg.data.shuffle_buffer,
                                          equalize=cfg.data.equalize, max_len=cfg.model.max_seq_len,
                                          bucket_pool_batches=cfg.data.bucket_pool_batches)
    train_reader = reader("train", micro)
    valid_reader, test_reader = reader("valid", cfg.eval.batch_size), reader("test", cfg.eval.batch_size)
    logdir = cfg.train.tensorboard_dir or str(run_dir / "tensorboard")
    monitor = Monitor(rank, logdir, to_dict(cfg), len(train_reader))

    for epoch in range(state.epoch, cfg.optim.epochs):
        if state.epochs_without_improvement >= cfg.eval.patience:
            break                                     # a resumed run that had already stopped early
        train_reader.set_epoch(epoch)
        started, sums, n = time.perf_counter(), {}, 0
        for step_in_epoch, batch in enumerate(train_reader, start=1):
            _inject_fault(cfg, rank, state.global_step, run_dir)
            batch = batch.to(device).trimmed()
            terms = engine(batch)
            engine.backward(terms.total)
            norm = engine.get_global_grad_norm() if cfg.train.zero_stage > 0 else grad_norm(objective.parameters())
            engine.step()
            monitor.count(len(batch) * world)
            for name, value in terms.scalars().items():
                sums[name] = sums.get(name, 0.0) + value
            n += 1
            if engine.is_gradient_accumulation_boundary():
                state.global_step += 1
                if state.global_step % cfg.train.log_every_steps == 0 or step_in_epoch == len(train_reader):
                    scalars = {f"loss/{k}": v for k, v in terms.scalars().items()}
                    scalars |= {"train/lr": engine.get_lr()[0], "train/grad_norm": float(norm or 0.0)}
                    scalars |= routing_summary(terms.output, batch.time_seq, model.modalities)
                    monitor.step(state.global_step, epoch, step_in_epoch, scalars)
        seconds = time.perf_counter() - started
        valid = distributed_metrics(model, valid_reader, cfg, device)
        metrics = {f"train/{k}": v / max(n, 1) for k, v in sums.items()}
        metrics |= {f"valid/{k}": v for k, v in valid.items()}
        metrics |= {"epoch": epoch, "epoch_seconds": seconds,
                    "train/sequences_per_s": n * micro * world / max(seconds, 1e-9)}
        score = valid[cfg.eval.valid_metric]
        if score > state.best_metric:
            state.best_metric, state.best_epoch, state.epochs_without_improvement = score, epoch, 0
            best_model = {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}
        else:
            state.epochs_without_improvement += 1
        state.epoch = epoch + 1
        state.history.append(metrics)
        metrics |= {"best_epoch": state.best_epoch, "best_valid": state.best_metric}
        monitor.epoch(epoch, metrics)
        stop = state.epochs_without_improvement >= cfg.eval.patience
        with tempfile.TemporaryDirectory() as folder:
            engine.save_checkpoint(folder, tag=DS_TAG)
            save_worker_files(Path(folder), rank, state, best_model)
            dist.barrier()                            # every shard is on disk before anyone reports
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
        if stop:
            if rank == 0:
                say(f"early stop: no {cfg.eval.valid_metric} gain for {cfg.eval.patience} epochs")
            break

    # The final checkpoint: the engine state as training left it (so a re-run with more epochs goes
    # on from the last weights, not the best), plus the plain fp32 best weights (ZeRO shards are no
    # usable weights file, pitfalls ray#43285); a re-run of a finished run stops at once.
    with tempfile.TemporaryDirectory() as folder:
        engine.save_checkpoint(folder, tag=DS_TAG)
        # Test with the best validation weights (every rank holds the same copy).
        if best_model is not None:
            model.load_state_dict({k: v.to(device) for k, v in best_model.items()})
        test = distributed_metrics(model, test_reader, cfg, device)
        final = {f"test/{k}": v for k, v in test.items()} | {
            "best_epoch": state.best_epoch, "best_valid": state.best_metric, "epochs_run": state.epoch,
            "global_step": state.global_step, "finished": True}
        monitor.epoch(state.epoch, {k: v for k, v in final.items() if k.startswith("test/")})
        monitor.close()
        save_worker_files(Path(folder), rank, state, best_model)
        if rank == 0:
            torch.save(best_model, Path(folder) / "model.pt")
            (Path(folder) / "final_metrics.json").write_text(json.dumps(final, indent=2))
        dist.barrier()
        ray.train.report(final, checkpoint=ray.train.Checkpoint.from_directory(folder))
