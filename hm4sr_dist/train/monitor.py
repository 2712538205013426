"""What a person watches: progress lines for `ray job logs` and TensorBoard events (rank 0 only).

Per logged step: each loss term, learning rate, sequences/s, gradient norm, and expert routing —
the mean gate weight of every Interactive-MoE expert per target modality, and of every Temporal-MoE
expert per range of the interval before the item. Per epoch: validation metrics.
"""

from __future__ import annotations

import time

import torch
import yaml
from torch import Tensor

from hm4sr_dist.model.hm4sr import HM4SROutput
from hm4sr_dist.model.time import intervals

# Interval ranges for the Temporal-MoE routing view (upper bounds in seconds).
INTERVAL_RANGES = (("same_time", 0), ("under_1h", 3600), ("under_1d", 86400), ("under_1w", 7 * 86400),
                   ("under_30d", 30 * 86400), ("over_30d", None))


def routing_summary(out: HM4SROutput, time_seq: Tensor, modalities: list[str]) -> dict[str, float]:
    """Mean gate weights over real positions, as flat `routing/...` scalars."""
    stats: dict[str, float] = {}
    real = out.real
    if out.interactive_gates is not None:
        gates = out.interactive_gates[real]                                    # (n, M, k1)
        for i, mod in enumerate(modalities):
            for e, w in enumerate(gates[:, i].mean(0).tolist()):
                stats[f"routing/interactive_{mod}/expert{e}"] = w
    if out.temporal_gates is not None:
        gates = out.temporal_gates[real]                                       # (n, k2)
        gaps = intervals(time_seq, real.long())[real]
        lower = -1
        for name, upper in INTERVAL_RANGES:
            sel = gaps > lower if upper is None else (gaps > lower) & (gaps <= upper)
            if bool(sel.any()):
                for e, w in enumerate(gates[sel].mean(0).tolist()):
                    stats[f"routing/temporal_{name}/expert{e}"] = w
            lower = upper if upper is not None else lower
    return stats


def say(message: str) -> None:
    """One progress line for the driver's output and `ray job logs`."""
    print(message, flush=True)


class Monitor:
    """Progress printing and TensorBoard writing; a no-op on ranks other than 0."""

    def __init__(self, rank: int, logdir: str | None, config: dict, steps_per_epoch: int):
        self.active = rank == 0
        self.steps_per_epoch = steps_per_epoch
        self.writer = None
        self._last_time, self._last_step, self._sequences = time.perf_counter(), 0, 0
        if self.active and logdir:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(logdir)
            self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "\n```")

    def count(self, sequences: int) -> None:
        self._sequences += sequences

    def step(self, global_step: int, epoch: int, step_in_epoch: int, scalars: dict[str, float]) -> None:
        if not self.active:
            return
        now = time.perf_counter()
        rate = self._sequences / max(now - self._last_time, 1e-9)
        self._last_time, self._sequences = now, 0
        scalars = scalars | {"throughput/sequences_per_s": rate}
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, global_step)
        losses = "  ".join(f"{k.split('/')[1]} {v:.4f}" for k, v in scalars.items() if k.startswith("loss/"))
        say(f"epoch {epoch} step {step_in_epoch}/{self.steps_per_epoch} (global {global_step})  {losses}  "
              f"grad_norm {scalars.get('train/grad_norm', float('nan')):.3f}  {rate:.0f} seq/s")

    def epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        if self.writer is not None:
            for name, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(name, value, epoch)
            self.writer.flush()
        shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        say(f"epoch {epoch} done: {shown}")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def grad_norm(parameters) -> float:
    norms = [p.grad.detach().norm() for p in parameters if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else float("nan")
