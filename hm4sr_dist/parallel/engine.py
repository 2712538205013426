"""Wrap the HM4SR objective in a DeepSpeed engine (one per Ray Train worker).

The engine gets a plain torch Adam (no fused-Adam JIT build), our gradient clipping, ZeRO stage and
precision. fp32 on the CPU (bf16 is emulated and slow there), bf16 by default on GPUs.
"""

from __future__ import annotations

import torch

from hm4sr_dist.config import ExperimentConfig
from hm4sr_dist.objective import HM4SRObjective


def resolve_precision(cfg: ExperimentConfig, on_gpu: bool) -> str:
    if cfg.train.precision == "auto":
        return "bf16" if on_gpu else "fp32"
    if cfg.train.precision != "fp32" and not on_gpu:
        raise ValueError(f"train.precision={cfg.train.precision} needs a GPU; use fp32 on the CPU")
    return cfg.train.precision


def deepspeed_config(cfg: ExperimentConfig, world_size: int, on_gpu: bool) -> dict:
    precision = resolve_precision(cfg, on_gpu)
    return {
        "train_batch_size": cfg.optim.batch_size,
        "train_micro_batch_size_per_gpu": cfg.optim.batch_size // (world_size * cfg.train.grad_accum_steps),
        "gradient_accumulation_steps": cfg.train.grad_accum_steps,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
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


def engine_step(engine):
    """The training step of a DeepSpeed engine: forward through the engine (so its hooks see the
    whole graph), backward, step; see `hm4sr_dist.train.loop.StepResult`."""
    from hm4sr_dist.train.loop import StepResult
    from hm4sr_dist.train.monitor import grad_norm

    def step(batch):
        terms = engine(batch)
        engine.backward(terms.total)
        # The norm before clipping; under ZeRO gradients are sharded and only the engine knows it,
        # after its step has computed it.
        sharded = engine.zero_optimization_stage() > 0
        norm = None if sharded else grad_norm(engine.module.parameters())
        boundary = engine.is_gradient_accumulation_boundary()   # asked before step() advances it
        engine.step()
        if sharded:
            norm = engine.get_global_grad_norm()
        return StepResult(terms, float(norm if norm is not None else float("nan")), boundary)
    return step
