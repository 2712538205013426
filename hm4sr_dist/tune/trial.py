"""One Tune trial = one Ray Train run of HM4SR (the Train V2 pattern of Ray >= 2.43).

The trial is a plain function: it builds the `ExperimentConfig` from the sweep's base config and the
trial's dotted overrides, builds the launcher's `TorchTrainer` (`hm4sr_dist.train.launcher.build_trainer`)
with `ray.tune.integration.ray_train.TuneReportCallback` in its `RunConfig(callbacks=...)`, and fits it.
The callback forwards every `ray.train.report` of worker rank 0 (each epoch's metrics with
`best_valid`, then the final test metrics) to Tune as one trial result, so Tune sees the whole
training curve and the last result holds `best_valid` and `test/*`. (Passing a trainer straight to
`Tuner` is Train V1's deprecated path; see ray/tune/integration/ray_train.py.)

One trap, guarded by `HM4SRTuneReportCallback`: Tune reserves some result keys (ray.tune.result.DONE
and others). A result with `done` ends the trial at once, the Tune trial actor is killed while the
Train controller it owns is still shutting down, the worker group's placement group is never
removed, and on a small cluster the next trial's workers wait for CPUs that never free up. The
worker therefore marks its final report `finished`, and any reserved key a user's metric might
still carry is forwarded under a `train_` prefix (`train_done`). A scheduler's STOP has the same
effect on a running Train run; the study's `--asha` uses `hm4sr_dist.tune.asha.GracefulASHA`, which
asks the Train run to stop between epochs instead (hm4sr_dist/train/stop.py).
"""

from __future__ import annotations

from typing import Mapping

from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.result import DONE, SHOULD_CHECKPOINT, TRIAL_ID

from hm4sr_dist.feasibility import DataOffer
from hm4sr_dist.train.launcher import build_trainer
from hm4sr_dist.tune.space import trial_config

__all__ = ["OVERRIDES", "HM4SRTuneReportCallback", "trial_overrides", "trial_config", "hm4sr_trial"]

OVERRIDES = "overrides"     # param_space key holding a dict of overrides (one-at-a-time sweeps)
TUNE_RESERVED = (DONE, SHOULD_CHECKPOINT, TRIAL_ID)


class HM4SRTuneReportCallback(TuneReportCallback):
    """`TuneReportCallback` that forwards Tune-reserved metric names as `train_<name>`, and only the
    per-epoch and final reports: a mid-epoch step checkpoint's report carries no validation metric
    for Tune's schedulers (the Train run inside the trial keeps and resumes those checkpoints)."""

    def after_report(self, run_context, metrics, checkpoint):
        if metrics and metrics[0].get("checkpoint_kind") == "step":
            return
        renamed = [{(f"train_{k}" if k in TUNE_RESERVED else k): v for k, v in m.items()} for m in metrics]
        super().after_report(run_context, renamed, checkpoint)


def trial_overrides(config: Mapping) -> dict:
    """Tune's trial config -> {dotted key: value}: dotted top-level keys (full-grid sweeps) plus the
    dict under `overrides` (one-at-a-time sweeps)."""
    out = {k: v for k, v in config.items() if "." in k}
    out.update(config.get(OVERRIDES) or {})
    return out


def hm4sr_trial(config: dict, *, base: dict, sweep: str, offer: DataOffer | None = None,
                explicit: Mapping[str, str] | None = None) -> None:
    """The Tune trainable (wrap with `ray.tune.with_parameters(hm4sr_trial, base=..., sweep=...)`).
    The trial's config is `space.trial_config`: the one the driver checked with `check_sweep`."""
    cfg = trial_config(base, trial_overrides(config), sweep, offer, explicit)
    trainer = build_trainer(cfg, callbacks=[HM4SRTuneReportCallback()])
    trainer.fit()      # raises if the run fails, which marks the trial as errored
