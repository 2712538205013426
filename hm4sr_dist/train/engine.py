"""Wrap the HM4SR objective in a DeepSpeed engine (one per Ray Train worker).

The engine gets a plain torch Adam (no fused-Adam JIT build), our gradient clipping, ZeRO stage and
precision. fp32 on the CPU (bf16 is emulated and slow there), bf16 by default on GPUs: bf16 is
autocast inside the objective's forward (`hm4sr_dist.train.acceleration.apply_precision`), so the
engine keeps fp32 weights, gradients and Adam state (DeepSpeed's own bf16 mode stays off); fp16 is
DeepSpeed's fp16 mode (fp16 weights with its loss scaler).

Under `loss.main_loss=vocab_parallel` each rank's ID-table slice is NOT in the engine (it would be
broadcast from rank 0 and averaged): `engine_step` hands it to the objective's forward through the
engine and steps its own Adam (`vocab.ShardAdam`) right after the engine's, at the same
accumulation boundaries and learning rate.
"""

from __future__ import annotations

import torch

from hm4sr_dist.config import ConfigError, ExperimentConfig
from hm4sr_dist.objective import HM4SRObjective
from hm4sr_dist.train.acceleration import resolve_precision


def check_precision(cfg: ExperimentConfig, on_gpu: bool) -> str:
    """`resolve_precision`, refusing half precision under loss.main_loss=vocab_parallel (its
    hand-written autograd functions are checked in fp32 only; `auto` means bf16 on a GPU)."""
    precision = resolve_precision(cfg, on_gpu)
    if cfg.loss.main_loss == "vocab_parallel" and precision != "fp32":
        raise ConfigError(key="train.precision", expected="fp32 with loss.main_loss=vocab_parallel",
                          got=f"{cfg.train.precision} ({precision} here)",
                          why="the sharded lookup and eq. 20 (parallel/vocab.py) are hand-written autograd "
                              "functions not checked under autocast; set train.precision=fp32")
    return precision


def deepspeed_config(cfg: ExperimentConfig, world_size: int, on_gpu: bool) -> dict:
    precision = check_precision(cfg, on_gpu)
    return {
        "train_batch_size": cfg.optim.batch_size,
        "train_micro_batch_size_per_gpu": cfg.optim.batch_size // (world_size * cfg.train.grad_accum_steps),
        "gradient_accumulation_steps": cfg.train.grad_accum_steps,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "bf16": {"enabled": False},          # bf16 = autocast in the objective, fp32 weights
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 1 << 30,          # our own progress lines instead
        "wall_clock_breakdown": False,
    }


def build_engine(objective: HM4SRObjective, cfg: ExperimentConfig, world_size: int, on_gpu: bool):
    """deepspeed.initialize over an already-initialised process group (Ray Train made it)."""
    import deepspeed

    optimizer = torch.optim.Adam(objective.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    engine, _, _, _ = deepspeed.initialize(model=objective, optimizer=optimizer,
                                           config=deepspeed_config(cfg, world_size, on_gpu),
                                           dist_init_required=False)
    return engine


def engine_step(engine, table_shard=None):
    """The training step of a DeepSpeed engine: forward through the engine (so its hooks see the
    whole graph), backward, step; see `hm4sr_dist.train.loop.StepResult`.

    `table_shard` (`vocab.ShardAdam`, loss.main_loss=vocab_parallel): this rank's ID rows, handed to
    the objective through the engine's forward and stepped after the engine, at its boundaries, with
    its learning rate; the reported norm then includes every rank's slice (one all-reduce)."""
    from hm4sr_dist.train.loop import StepResult
    from hm4sr_dist.train.monitor import grad_norm

    def step(batch):
        terms = engine(batch) if table_shard is None else engine(batch, table_shard.weight)
        engine.backward(terms.total)
        # The norm before clipping; under ZeRO gradients are sharded and only the engine knows it,
        # after its step has computed it.
        sharded = engine.zero_optimization_stage() > 0
        norm = None if sharded else grad_norm(engine.module.parameters())    # a device tensor
        slice_sq = table_shard.grad_norm_sq() if table_shard is not None else None
        boundary = engine.is_gradient_accumulation_boundary()   # asked before step() advances it
        engine.step()
        if sharded:
            norm = engine.get_global_grad_norm()
            norm = None if norm is None else torch.as_tensor(norm, dtype=torch.float64)
        if table_shard is not None:
            if boundary:
                table_shard.step(lr=engine.get_lr()[0])
            if norm is not None:
                norm = (norm.double().to(slice_sq.device) ** 2 + slice_sq) ** 0.5
        return StepResult(terms, float("nan") if norm is None else norm, boundary)
    return step
