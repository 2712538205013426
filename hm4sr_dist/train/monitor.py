"""What a person watches: progress lines for `ray job logs` and TensorBoard events (rank 0 only).

TensorBoard has one x-axis, the global optimiser step, for every tag:
- per logged step: `loss/*`, `train/lr`, `train/grad_norm`, `throughput/sequences_per_s`, and the MoE
  view of that training batch (`batch/routing/*`, `batch/moe/*`, see hm4sr_dist/diagnostics.py);
- per epoch, at the step the epoch ended: `valid/*` metrics, `epoch/*` (mean loss terms of the
  epoch, seconds, sequences/s), the MoE view of the validation pass (`routing/*`, `moe/*`: one
  point per tag and step, apart from the batches'), and the image `routing/heatmap`: the
  validation routing of each MoE (Temporal MoE per interval range, Interactive MoE per modality)
  drawn by `diagnostics.routing_figure`, the figure of a study's `routing_<setting>.png`;
- at the end: `test/*` of the best weights, and the run's hparams (config -> final metrics) for the
  HParams tab.
The same scalars go to the run's MLflow run when tracking is on (`train/tracking_run.py`).
Counts (`valid/count`) and the epoch index are printed, never drawn as curves. A resumed run opens
its writer with `purge_step` = the checkpoint's step + 1, so points that a crashed attempt wrote
after that checkpoint are dropped instead of overlapping the resumed ones.
"""

from __future__ import annotations

import time

import torch
import yaml

from hm4sr_dist.config import flatten

ROUTING_IMAGE = "routing/heatmap"
NOT_CURVES = ("count", "epoch", "global_step", "best_epoch", "epochs_run", "step_in_epoch")  # printed only


def say(message: str) -> None:
    """One progress line for the driver's output and `ray job logs`."""
    print(message, flush=True)


def say_tracking_stopped(error: BaseException) -> None:
    """The one line of a tracker dropped mid-run (training goes on without it)."""
    say(f"warning: experiment tracking stopped: {error} (training goes on; TensorBoard keeps logging)")


def _plotted(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k.rsplit("/", 1)[-1] not in NOT_CURVES}


class Monitor:
    """Progress printing and TensorBoard writing; a no-op on ranks other than 0."""

    def __init__(self, rank: int, logdir: str | None, config: dict, steps_per_epoch: int,
                 resumed_at_step: int = 0, tracker=None):
        self.active = rank == 0
        self.tracker = tracker           # hm4sr_dist.tracking.Tracker (MLflow) or None
        self.steps_per_epoch = steps_per_epoch
        self.config = config
        self.writer = None
        self._last_time, self._sequences = time.perf_counter(), 0
        if self.active and logdir:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(logdir, purge_step=resumed_at_step + 1 if resumed_at_step else None)
            if not resumed_at_step:
                self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "\n```")

    def count(self, sequences: int) -> None:
        self._sequences += sequences

    def _scalars(self, scalars: dict[str, float], step: int) -> None:
        plotted = _plotted(scalars)
        if self.writer is not None:
            for name, value in plotted.items():
                self.writer.add_scalar(name, value, step)
        if self.tracker is not None:
            self._track(lambda: self.tracker.log_metrics(plotted, step))

    def _track(self, call) -> None:
        """A tracking call; a tracker that fails mid-run (a server gone) is dropped with one line
        rather than ending the training run."""
        from hm4sr_dist.tracking import TrackingError

        try:
            call()
        except TrackingError as exc:
            say_tracking_stopped(exc)
            self.tracker = None

    def step(self, global_step: int, epoch: int, step_in_epoch: int, scalars: dict[str, float]) -> None:
        if not self.active:
            return
        now = time.perf_counter()
        rate = self._sequences / max(now - self._last_time, 1e-9)
        self._last_time, self._sequences = now, 0
        scalars = scalars | {"throughput/sequences_per_s": rate}
        self._scalars(scalars, global_step)
        losses = "  ".join(f"{k.split('/')[1]} {v:.4f}" for k, v in scalars.items() if k.startswith("loss/"))
        say(f"epoch {epoch} step {step_in_epoch}/{self.steps_per_epoch} (global {global_step})  {losses}  "
            f"grad_norm {scalars.get('train/grad_norm', float('nan')):.3f}  {rate:.0f} seq/s")

    def epoch(self, epoch: int, global_step: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        self._scalars(metrics, global_step)
        if self.writer is not None:
            self._routing_image(epoch, global_step, metrics)
            self.writer.flush()
        shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                          if isinstance(v, float) and not k.startswith(("routing/", "moe/")))
        say(f"epoch {epoch} done (global step {global_step}): {shown}")

    def _routing_image(self, epoch: int, global_step: int, metrics: dict) -> None:
        from hm4sr_dist.diagnostics import figure_rgb, routing_figure

        fig = routing_figure(metrics, f"epoch {epoch}: MoE routing on the validation users "
                                      "(blank: no position in that range)")
        if fig is not None:                            # SASRec and MoE-less ablations have none
            self.writer.add_image(ROUTING_IMAGE, figure_rgb(fig), global_step, dataformats="HWC")

    def final(self, global_step: int, final: dict[str, float]) -> None:
        """Test metrics at the last step, and hparams (flattened config -> final metrics)."""
        if not self.active:
            return
        self._scalars({k: v for k, v in final.items() if k.startswith("test/")}, global_step)
        if self.writer is not None:
            hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                       for k, v in flatten(self.config).items()}
            metrics = {f"hparam/{k}": v for k, v in _plotted(final).items()
                       if k.startswith("test/") or k in ("best_valid", "best_epoch")}
            self.writer.add_hparams(hparams, metrics, run_name="hparams", global_step=global_step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()



def grad_norm(parameters) -> torch.Tensor | None:
    """The global norm of the gradients, a tensor on their device (read it when logging); None
    before any gradient."""
    norms = [p.grad.detach().norm() for p in parameters if p.grad is not None]
    return torch.stack(norms).norm() if norms else None
