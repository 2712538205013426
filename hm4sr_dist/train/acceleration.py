"""What a device adds to the training step, applied to an already-built objective by named steps
(the model never knows): bf16 autocast (`apply_precision`), `torch.compile` (`apply_compile`), and
the few sequence widths that give compile static shapes (`length_widths`, `placement_for`).

`accelerate` applies all of them for a run; the Ray Train worker and `fit_in_process` (tests,
benchmarks, the GPU acceptance script) both call it, so both run the same step.
"""

from __future__ import annotations

import torch

from hm4sr_dist.config import ExperimentConfig
from hm4sr_dist.data.placement import BatchPlacement

COMPILE_WIDTHS = (8, 16, 32)       # with train.compile and no data.length_widths: these + max_len


def compile_enabled(cfg: ExperimentConfig) -> bool:
    """train.compile: 'true' / 'false'; 'auto' is off on every device for now (on the CPU it was
    measured slower, benchmarks/compile_bench.py; on CUDA it waits for a GPU measurement)."""
    return cfg.train.compile == "true"


def length_widths(cfg: ExperimentConfig, compiled: bool) -> list[int]:
    """data.length_widths (with model.max_seq_len added, so no batch keeps a width of its own), or,
    compiled and none given, powers of two and model.max_seq_len (a handful of shapes: one graph
    each); [] = each batch at its longest sequence."""
    longest = cfg.model.max_seq_len
    if cfg.data.length_widths:
        return sorted(set(cfg.data.length_widths) | {longest})
    return [w for w in COMPILE_WIDTHS if w < longest] + [longest] if compiled else []


def placement_for(cfg: ExperimentConfig, device: torch.device | str) -> BatchPlacement:
    """The `BatchPlacement` of a run on `device` (readers, the epoch loop and evaluation share it)."""
    return BatchPlacement(device, length_widths(cfg, compile_enabled(cfg)))


def resolve_precision(cfg: ExperimentConfig, on_gpu: bool) -> str:
    """train.precision on this device: 'auto' is bf16 on a GPU, fp32 on the CPU (where bf16 is
    emulated and slow); half precision on the CPU is refused."""
    if cfg.train.precision == "auto":
        return "bf16" if on_gpu else "fp32"
    if cfg.train.precision != "fp32" and not on_gpu:
        raise ValueError(f"train.precision={cfg.train.precision} needs a GPU; use fp32 on the CPU")
    return cfg.train.precision


def apply_precision(objective, precision: str):
    """'bf16': the objective's forward runs under bf16 autocast (weights, gradients, optimiser
    state and the losses' log-sum-exp stay fp32); 'fp32' (and 'fp16', DeepSpeed's own mode):
    no autocast."""
    objective.compute_dtype = torch.bfloat16 if precision == "bf16" else None
    return objective


def accelerate(objective, cfg: ExperimentConfig, device: torch.device) -> BatchPlacement:
    """Set up `objective` (already on `device`) for a run of `cfg`: its precision and compilation;
    returns the run's `BatchPlacement`. `train.precision` is resolved for this device."""
    apply_precision(objective, resolve_precision(cfg, device.type == "cuda"))
    apply_compile(objective, compile_enabled(cfg))
    return placement_for(cfg, device)


def apply_compile(objective, enabled: bool = True):
    """Compile the objective's forward in place (`nn.Module.compile`: parameter names and the
    state dict are unchanged, so checkpoints do not depend on it). Shapes are static: the batch
    dimension is fixed by the reader, the width by `length_widths`, so each width compiles once."""
    if enabled:
        objective.compile(dynamic=False)
    return objective
