"""One Tune trial = one Ray Train run of HM4SR (the Train V2 pattern of Ray >= 2.43).

The trial is a plain function: it builds the `ExperimentConfig` from the sweep's base config and the
trial's dotted overrides, builds a `TorchTrainer` exactly as `hm4sr_dist.train.launcher` does, adds
`ray.tune.integration.ray_train.TuneReportCallback` to its `RunConfig(callbacks=...)`, and fits it.
The callback forwards every `ray.train.report` of worker rank 0 (each epoch's metrics with
`best_valid`, then the final test metrics) to Tune as one trial result, so Tune sees the whole
training curve and the last result holds `best_valid` and `test/*`. (Passing a trainer straight to
`Tuner` is Train V1's deprecated path; see ray/tune/integration/ray_train.py.)

One trap, handled by `HM4SRTuneReportCallback`: the worker's final report carries `done: True`, and
`done` is a key Tune reserves (ray.tune.result.DONE): a result with it ends the trial at once, the
Tune trial actor is killed while the Train controller it owns is still shutting down, the worker
group's placement group is never removed, and on a small cluster the next trial's workers wait for
CPUs that never free up. Reserved keys are therefore forwarded under a `train_` prefix
(`train_done`).
"""

from __future__ import annotations

import copy
import os
from typing import Callable, Mapping

from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.result import DONE, SHOULD_CHECKPOINT, TRIAL_ID
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from hm4sr_dist.config import ExperimentConfig, from_dict, merge_overrides, to_dict
from hm4sr_dist.train.launcher import cluster_has_gpus, ensure_ray, storage_root
from hm4sr_dist.train.worker import train_loop_per_worker
from hm4sr_dist.tune.space import override_strings, trial_run_name

OVERRIDES = "overrides"     # param_space key holding a dict of overrides (one-at-a-time sweeps)
TUNE_RESERVED = (DONE, SHOULD_CHECKPOINT, TRIAL_ID)


class HM4SRTuneReportCallback(TuneReportCallback):
    """`TuneReportCallback` that forwards Tune-reserved metric names as `train_<name>`."""

    def after_report(self, run_context, metrics, checkpoint):
        renamed = [{(f"train_{k}" if k in TUNE_RESERVED else k): v for k, v in m.items()} for m in metrics]
        super().after_report(run_context, renamed, checkpoint)


def build_trainer(cfg: ExperimentConfig, callbacks: list | None = None) -> TorchTrainer:
    """The launcher's TorchTrainer (same workers, storage, failure and checkpoint settings), with
    extra Train `UserCallback`s. `cfg.data.prepared_dir` and the storage must already be absolute
    (a Tune trial runs in its own working directory)."""
    ensure_ray()
    use_gpu = {"auto": cluster_has_gpus(), "true": True, "false": False}[cfg.train.use_gpu]
    name = cfg.train.run_name or cfg.name
    storage = storage_root(cfg)
    run_dir = os.path.join(storage, name) if "://" not in storage else os.path.join("outputs", name)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(cfg), "run_dir": run_dir},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=storage, callbacks=list(callbacks or []),
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.checkpoints_to_keep)),
    )


def trial_overrides(config: Mapping) -> dict:
    """Tune's trial config -> {dotted key: value}: dotted top-level keys (full-grid sweeps) plus the
    dict under `overrides` (one-at-a-time sweeps)."""
    out = {k: v for k, v in config.items() if "." in k}
    out.update(config.get(OVERRIDES) or {})
    return out


def trial_config(base: dict, overrides: Mapping, sweep: str,
                 adjust: Callable[[ExperimentConfig], object] | None = None) -> ExperimentConfig:
    """The base config tree (a dict) + `key.path=value` overrides, validated, with a run name unique
    to the trial. `adjust(cfg)` may then fit it to the data set (jobs.common.fit_to_data)."""
    data = merge_overrides(copy.deepcopy(base), override_strings(overrides))
    cfg = from_dict(ExperimentConfig, data).validate()
    cfg.train.run_name = trial_run_name(sweep, overrides)
    if adjust is not None:
        adjust(cfg)
    return cfg.validate()


def hm4sr_trial(config: dict, *, base: dict, sweep: str,
                adjust: Callable[[ExperimentConfig], object] | None = None) -> None:
    """The Tune trainable (wrap with `ray.tune.with_parameters(hm4sr_trial, base=..., sweep=...)`)."""
    cfg = trial_config(base, trial_overrides(config), sweep, adjust)
    trainer = build_trainer(cfg, callbacks=[HM4SRTuneReportCallback()])
    trainer.fit()      # raises if the run fails, which marks the trial as errored
