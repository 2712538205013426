"""The function every Ray Train worker runs: stream this rank's shards through a DeepSpeed-wrapped
HM4SR, evaluate on all ranks, checkpoint, early-stop, and finally test the best weights.

Checkpoints (pitfalls: ray#33369, PR#57118): every rank writes its DeepSpeed state into its own
local folder, a barrier, then every rank calls `ray.train.report` with its folder; Ray merges them
in storage. Restoring, every rank loads inside `checkpoint.as_directory()` and waits at a barrier
before leaving it. Checkpoints are taken at epoch ends and every `train.checkpoint_every_steps`
optimiser steps inside an epoch, with each rank's RNG state and reader position, so a resumed or
failure-recovered run continues at the step where it stopped and sees exactly the batches (and
dropout masks) the uninterrupted run would have seen.

Under `loss.main_loss=vocab_parallel` each rank holds a slice of the ID table outside the engine
(`parallel.vocab`): it is stepped with the engine, saved by every rank next to its DeepSpeed state
(re-cut on a resume with another number of ranks), used by evaluation, and gathered into the final
`model.pt`, which is therefore the same plain state dict as an unsharded run's.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from hm4sr_dist.config import ExperimentConfig, from_dict, to_dict
from hm4sr_dist.data import ShardReader, load_catalog
from hm4sr_dist.diagnostics import MoEStats, batch_diagnostics, moe_parameters
from hm4sr_dist.objective import build_objective
from hm4sr_dist.parallel import DistributedExchange
from hm4sr_dist.train.engine import build_engine, engine_step
from hm4sr_dist.train.evaluation import distributed_metrics
from hm4sr_dist.parallel.vocab import build_vocab_parallel, gather_table
from hm4sr_dist.run_folder import FINAL_METRICS_FILE, PER_USER_FILE
from hm4sr_dist.train.acceleration import accelerate
from hm4sr_dist.train.loop import EpochProgress, run_epoch
from hm4sr_dist.train.monitor import Monitor, say
from hm4sr_dist.train.state import (TrainState, epoch_cap_error, has_table_shards, load_table_shard,
                                    load_worker_files, save_table_shard, save_worker_files, seed_everything)
from hm4sr_dist.train.stop import stop_request, worker_stop_file
from hm4sr_dist.train.tracking_run import open_for_worker

DS_TAG = "engine"


def _inject_fault(cfg: ExperimentConfig, rank: int, step: int, run_dir: Path) -> None:
    """Test hook (train.fail_at_step): rank 1 dies once, as a crashed worker process would.

    It first waits two of the controller's polling intervals: Ray Train registers a reported
    checkpoint only when it polls the workers (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s), so a process
    that dies sooner after a report loses that checkpoint and recovery starts from the one before
    (still exact, only more steps repeat)."""
    marker = run_dir / "fault_injected"
    if cfg.train.fail_at_step == step and rank == 1 and not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"killed rank {rank} at step {step}\n")
        time.sleep(2 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2.0)) + 1)
        say(f"[fault injection] rank {rank} exits at global step {step}")
        os._exit(1)


def _all_ranks_agree(flag: bool, device) -> bool:
    value = torch.tensor([1 if flag else 0], device=device)      # NCCL reduces device tensors only
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def evaluate(model, reader, cfg: ExperimentConfig, placement, per_user: bool = False, table=None, id_rows=None):
    """Metrics (and MoE diagnostics) of the whole split, summed over ranks; `placement` takes the
    batches to the device (`BatchPlacement`; the reader's already did). `table`, `id_rows`: the
    sharded item table and this rank's ID rows under loss.main_loss=vocab_parallel."""
    stats = MoEStats(model.modalities)
    weight = model.temporal_moe.expert_weight if model.temporal_moe is not None else None
    observe = lambda out, batch, w: stats.add(out, batch.time_seq, weight, w)     # noqa: E731
    metrics, rows = distributed_metrics(model, reader, cfg.eval.ks, cfg.eval.item_chunk_size, placement,
                                        per_user=per_user, observe=observe, table=table, id_rows=id_rows)
    stats.all_reduce()
    return metrics, stats.result() | moe_parameters(model), rows


def _stop_requested(path: str, device) -> dict | None:
    """A Tune stop request (hm4sr_dist.train.stop), agreed by all ranks: any rank that sees the
    marker stops them all, so nobody waits in a collective for a rank that left."""
    flag = torch.tensor([0.0 if stop_request(path) is None else 1.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return (stop_request(path) or {}) if flag.item() else None


def _quiet_ray_report_log() -> None:
    """Ray Train logs every report's whole metrics dict at INFO (hundreds of routing/MoE keys per
    epoch); our own progress lines say what matters. Its logger is named after its file."""
    try:
        from ray.train.v2._internal.execution import context
        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except ImportError:                                   # another Ray layout: keep its logging
        pass


def train_loop_per_worker(loop_config: dict) -> None:
    _quiet_ray_report_log()
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
    exchange = DistributedExchange()
    # vocab_parallel: this rank's rows of the item table; the ID rows (table_shard) outside the engine
    table, table_shard = None, None
    if cfg.loss.main_loss == "vocab_parallel":
        table, table_shard = build_vocab_parallel(cfg.model, cfg.optim, cfg.loss.item_chunk_size,
                                                  catalog.n_items, exchange, device)
    objective = build_objective(cfg.model, cfg.loss, catalog, exchange, table=table).to(device)
    # one placement for every batch: the readers stage copies to the GPU, the loop and evaluation
    # pass the placed batches through
    placement = accelerate(objective, cfg, device)
    engine = build_engine(objective, cfg, world, on_gpu)
    model = engine.module.model
    id_rows = table_shard.weight if table_shard is not None else None

    micro = cfg.micro_batch_size
    reader = lambda split, b: ShardReader(cfg.data.prepared_dir, split, b, rank=rank, world_size=world,  # noqa: E731
                                          seed=cfg.optim.seed, shuffle_buffer=cfg.data.shuffle_buffer,
                                          equalize=cfg.data.equalize, max_len=cfg.model.max_seq_len,
                                          bucket_pool_batches=cfg.data.bucket_pool_batches,
                                          prefetch_batches=cfg.data.prefetch_batches,
                                          placement=placement)
    train_reader = reader("train", micro)
    valid_reader, test_reader = reader("valid", cfg.eval.batch_size), reader("test", cfg.eval.batch_size)

    state, best_model, reader_state = TrainState(), None, None
    best_slice = None                                # this rank's ID rows of best_model (vocab_parallel)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            if (table_shard is not None) != has_table_shards(Path(folder)):
                raise ValueError(f"loss.main_loss={cfg.loss.main_loss}: the checkpoint "
                                 f"{'has no' if table_shard is not None else 'holds'} per-rank item-table "
                                 "slices; a run cannot switch to or from vocab_parallel on resume")
            engine.load_checkpoint(folder, tag=DS_TAG)
            state, best_model, reader_state = load_worker_files(Path(folder), rank)
            if table_shard is not None:               # re-cut when the number of ranks changed
                best_slice = table_shard.load_state_dict(load_table_shard(Path(folder), rank, world))
            dist.barrier()                           # nobody leaves (and deletes) the folder early
    refusal = epoch_cap_error(cfg, state)           # the driver checked too; a race can pass it
    if refusal:
        raise ValueError(refusal)
    resume_progress = state.epoch_progress()
    if resume_progress is not None:
        train_reader.set_epoch(state.epoch)
        reason = "no reader position for this rank"
        try:
            if reader_state is not None:
                train_reader.load_state_dict(reader_state)
                reason = ""
        except ValueError as exc:                     # e.g. a worker group of another size
            reason = str(exc)
        if not _all_ranks_agree(not reason, device):
            resume_progress = None
            train_reader.set_epoch(state.epoch)       # back to the epoch's first batch
            say(f"rank {rank}: the mid-epoch reader position does not fit this worker group "
                f"({reason or 'another rank'}): epoch {state.epoch} restarts from its first batch")
    if checkpoint:
        state.resumed_at.append(state.global_step)
    if checkpoint and rank == 0:
        where = (f"epoch {state.epoch} step {resume_progress.batches}/{len(train_reader)}"
                 if resume_progress else f"the start of epoch {state.epoch}")
        say(f"resumed from checkpoint at global step {state.global_step}: continuing at {where}")

    logdir = cfg.train.tensorboard_dir or str(run_dir / "tensorboard")
    monitor = Monitor(rank, logdir, to_dict(cfg), len(train_reader), resumed_at_step=state.global_step,
                      tracker=open_for_worker(loop_config.get("tracking"), rank))
    step = engine_step(engine, table_shard)
    every = cfg.train.checkpoint_every_steps
    stop_at, stopped = worker_stop_file(cfg.train.storage_path, cfg.train.run_name, run_dir), None

    def save_checkpoint(metrics: dict, reader_position: dict | None) -> None:
        with tempfile.TemporaryDirectory() as folder:
            engine.save_checkpoint(folder, tag=DS_TAG)
            save_worker_files(Path(folder), rank, state, best_model, reader_position)
            if table_shard is not None:
                save_table_shard(Path(folder), rank, table_shard.state_dict(best_slice))
            dist.barrier()                            # every shard is on disk before anyone reports
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))

    for epoch in range(state.epoch, cfg.optim.epochs):
        if state.epochs_without_improvement >= cfg.eval.patience:
            break                                     # a resumed run that had already stopped early
        if resume_progress is None:
            train_reader.set_epoch(epoch)
        progress, resume_progress = resume_progress, None

        def on_step(result, batch, progress: EpochProgress, epoch=epoch) -> None:
            monitor.count(len(batch) * world)
            if not result.boundary:
                return
            state.global_step += 1
            if state.global_step % cfg.train.log_every_steps == 0 or progress.batches == len(train_reader):
                scalars = {f"loss/{k}": v for k, v in result.terms.scalars().items()}
                scalars |= {"train/lr": engine.get_lr()[0], "train/grad_norm": float(result.grad_norm)}
                # under `batch/`: the epoch's validation pass writes the same names at its last step
                scalars |= {f"batch/{k}": v for k, v in
                            batch_diagnostics(model, result.terms.output, batch.time_seq).items()}
                monitor.step(state.global_step, epoch, progress.batches, scalars)
            if every and state.global_step % every == 0 and progress.batches < len(train_reader):
                state.epoch, state.progress = epoch, progress.as_dict()
                save_checkpoint({"global_step": state.global_step, "epoch": epoch,
                                 "step_in_epoch": progress.batches, "checkpoint_kind": "step"},
                                train_reader.state_dict())
                state.progress = None
            _inject_fault(cfg, rank, state.global_step, run_dir)

        progress = run_epoch(step, train_reader, progress, on_step, sequences_per_batch=micro * world,
                             placement=placement)
        valid, diagnostics, _ = evaluate(model, valid_reader, cfg, placement, table=table, id_rows=id_rows)
        metrics = {f"epoch/{k}": v for k, v in progress.means().items()}
        metrics |= {f"valid/{k}": v for k, v in valid.items()} | diagnostics
        metrics |= {"epoch": epoch, "global_step": state.global_step, "epoch/seconds": progress.seconds,
                    "epoch/sequences_per_s": progress.sequences / max(progress.seconds, 1e-9)}
        score = valid[cfg.eval.valid_metric]
        if score > state.best_metric:
            state.best_metric, state.best_epoch, state.epochs_without_improvement = score, epoch, 0
            best_model = {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}
            best_slice = id_rows.detach().cpu().clone() if id_rows is not None else None
        else:
            state.epochs_without_improvement += 1
        state.epoch, state.progress = epoch + 1, None
        state.history.append(metrics)
        metrics |= {"best_epoch": state.best_epoch, "best_valid": state.best_metric}
        monitor.epoch(epoch, state.global_step, metrics)
        save_checkpoint(metrics | {"checkpoint_kind": "epoch"}, None)
        if state.epochs_without_improvement >= cfg.eval.patience:
            if rank == 0:
                say(f"early stop: no {cfg.eval.valid_metric} gain for {cfg.eval.patience} epochs")
            break
        if epoch + 1 < cfg.optim.epochs and (stopped := _stop_requested(stop_at, device)) is not None:
            if rank == 0:
                say(f"stopped after epoch {epoch} by {stopped.get('by', 'a stop request')}")
            break

    # The final checkpoint: the engine state as training left it (so a re-run with more epochs goes
    # on from the last weights, not the best), plus the plain fp32 best weights (ZeRO shards are no
    # usable weights file, pitfalls ray#43285) and every test user's rank (for paired comparisons);
    # a re-run of a finished run stops at once.
    with tempfile.TemporaryDirectory() as folder:
        engine.save_checkpoint(folder, tag=DS_TAG)
        if table_shard is not None:                   # the slice as training left it, like the engine
            save_table_shard(Path(folder), rank, table_shard.state_dict(best_slice))
        if best_model is not None:                    # test with the best validation weights
            model.load_state_dict({k: v.to(device) for k, v in best_model.items()})
            if best_slice is not None:
                with torch.no_grad():
                    id_rows.copy_(best_slice)
        test, diagnostics, rows = evaluate(model, test_reader, cfg, placement, per_user=True, table=table,
                                           id_rows=id_rows)
        weights = best_model
        if best_slice is not None:                    # model.pt: the whole ID table, as unsharded runs
            whole = gather_table(best_slice.to(device), table.n_rows)
            if whole is not None:
                weights = best_model | {"items.id_table.weight": whole.cpu()}
        final = {f"test/{k}": v for k, v in test.items()} | diagnostics | {
            "best_epoch": state.best_epoch, "best_valid": state.best_metric, "epochs_run": state.epoch,
            "global_step": state.global_step, "resumed_at_steps": list(state.resumed_at), "finished": True}
        if stopped is not None:                       # ended early on a Tune stop request
            final |= {"stopped_early": True, "stopped_by": str(stopped.get("by", "tune"))}
        monitor.final(state.global_step, final)
        monitor.close()
        save_worker_files(Path(folder), rank, state, best_model)
        if rank == 0:
            torch.save(weights, Path(folder) / "model.pt")
            np.savez(Path(folder) / PER_USER_FILE, **rows)
            (Path(folder) / FINAL_METRICS_FILE).write_text(json.dumps(final, indent=2))
        dist.barrier()
        ray.train.report(final, checkpoint=ray.train.Checkpoint.from_directory(folder))
