"""Run a sweep with Ray Tune and tabulate it: each trial fits a TorchTrainer (hm4sr_dist.tune.trial),
Tune keeps `best_valid` (validation NDCG@5 of the best epoch, mode max), and the table of
overrides -> best_valid, test metrics and the code version that trained each run goes to
`sweep_results.json`.

Resources: a trial's TorchTrainer starts its own `train.num_workers` workers (one GPU each on a
GPU cluster), so at most cluster GPUs // num_workers trials can train at once; `max_concurrent`
caps the number of running trials (with 2 CPUs: 1 trial, 1 worker). The trial function itself only
drives the Train controller (an actor of 0 CPUs); it reserves `trial_cpus` (Tune's default, 1 CPU;
Tune refuses 0, a fraction such as 0.1 leaves more to the workers). A plan whose trial driver plus
workers exceed the cluster's CPUs would hang at worker-group startup: `run_sweep` refuses it first,
naming the fix (`hm4sr_dist.tune.resources.check_trials_fit`, shared with the study runner), and
lowers `max_concurrent` to the trials whose worker groups fit at once (`fit_concurrency`).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Mapping, Sequence

import ray.tune

from hm4sr_dist.config import ExperimentConfig, from_dict, to_dict
from hm4sr_dist.feasibility import DataOffer
from hm4sr_dist.train.launcher import ensure_ray, run_folder_in, storage_root, trained_by_folder
from hm4sr_dist.tune.resources import fit_concurrency
from hm4sr_dist.tune.space import trial_run_name
from hm4sr_dist.tune.trial import OVERRIDES, hm4sr_trial, trial_overrides

METRIC, MODE = "best_valid", "max"


def param_space(trials: Sequence[Mapping] | None = None,
                grid: Mapping[str, Sequence] | None = None) -> dict:
    """Tune's param_space: an explicit list of override dicts (one-at-a-time) or a full grid."""
    if (trials is None) == (grid is None):
        raise ValueError("give either trials (a list of override dicts) or grid ({key: values})")
    if trials is not None:
        return {OVERRIDES: ray.tune.grid_search([dict(t) for t in trials])}
    return {key: ray.tune.grid_search(list(values)) for key, values in grid.items()}


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def run_sweep(base: ExperimentConfig, sweep: str, *, trials: Sequence[Mapping] | None = None,
              grid: Mapping[str, Sequence] | None = None, max_concurrent: int = 1,
              trial_cpus: float = 1.0, offer: DataOffer | None = None,
              explicit: Mapping[str, str] | None = None, output: str | Path | None = None) -> dict:
    """Fit every trial, write `<output>/sweep_results.json` (default `outputs/<sweep>`), return it.

    Each trial's config is `space.trial_config(base, overrides, sweep, offer, explicit)`: fitted to
    the data's `offer`, with the base's command-line keys `explicit` and the swept keys as requests
    that may not be switched off. Check them first with `space.check_sweep` (the job does)."""
    started = time.time()
    base = from_base(base)
    ensure_ray()
    shapes = worker_shapes(base, trials, grid)
    max_concurrent, note = fit_concurrency(max_concurrent, shapes, trial_cpus)
    if note:
        print(f"note: {note}", flush=True)
    storage = storage_root(base)
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(hm4sr_trial, base=to_dict(base), sweep=sweep, offer=offer,
                                 explicit=dict(explicit or {})),
        {"cpu": trial_cpus})
    tuner = ray.tune.Tuner(
        trainable,
        param_space=param_space(trials, grid),
        tune_config=ray.tune.TuneConfig(metric=METRIC, mode=MODE, max_concurrent_trials=max_concurrent,
                                        trial_dirname_creator=lambda t: f"trial_{t.trial_id}"),
        run_config=ray.tune.RunConfig(name=sweep, storage_path=storage, verbose=1,
                                      failure_config=ray.tune.FailureConfig(max_failures=0)),
    )
    grid_result = tuner.fit()
    rows = [_row(r, sweep, storage) for r in grid_result]
    done = [r for r in rows if _finite(r["best_valid"])]
    table = {
        "sweep": sweep, "metric": f"{METRIC} (validation {base.eval.valid_metric} of the best epoch)",
        "mode": MODE, "n_trials": len(rows), "n_finished": len(done),
        "best": max(done, key=lambda r: r["best_valid"]) if done else None,
        "trials": rows,
        "storage": str(Path(storage) / sweep) if "://" not in storage else f"{storage}/{sweep}",
        "wall_seconds": time.time() - started, "base_config": to_dict(base),
    }
    out = Path(output or Path("outputs") / sweep)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep_results.json").write_text(json.dumps(table, indent=2, default=str))
    return table


def worker_shapes(base: ExperimentConfig, trials: Sequence[Mapping] | None = None,
                  grid: Mapping[str, Sequence] | None = None) -> list[tuple[int, float]]:
    """(train.num_workers, train.cpus_per_worker) of every trial (for `check_trials_fit`): the
    base's, unless a trial overrides them; a full grid's largest is the product of each key's max."""
    nw, cpw = "train.num_workers", "train.cpus_per_worker"
    default = (base.train.num_workers, base.train.cpus_per_worker)
    if trials is not None:
        return [(t.get(nw, default[0]), t.get(cpw, default[1])) for t in trials] or [default]
    grid = grid or {}
    return [(max(grid.get(nw, [default[0]])), max(grid.get(cpw, [default[1]])))]


def from_base(cfg: ExperimentConfig) -> ExperimentConfig:
    """Paths made absolute in the driver: a trial runs in its own working directory (and, on a
    cluster, on another node, where these must name shared storage)."""
    cfg = from_dict(ExperimentConfig, to_dict(cfg)).validate()
    if not cfg.data.prepared_dir:
        raise ValueError("data.prepared_dir: no prepared data set given (run the data pipeline first)")
    if "://" not in cfg.data.prepared_dir:
        cfg.data.prepared_dir = str(Path(cfg.data.prepared_dir).resolve())
    cfg.train.storage_path = storage_root(cfg)
    if cfg.train.tensorboard_dir and "://" not in cfg.train.tensorboard_dir:
        cfg.train.tensorboard_dir = str(Path(cfg.train.tensorboard_dir).resolve())
    return cfg


def _row(result, sweep: str, storage: str) -> dict:
    overrides = trial_overrides(result.config or {})
    metrics = dict(result.metrics or {})
    run_name = trial_run_name(sweep, overrides)
    return {
        "overrides": overrides,
        "run_name": run_name,
        "best_valid": metrics.get(METRIC),
        "best_epoch": metrics.get("best_epoch"),
        "epochs_run": metrics.get("epochs_run"),
        "test": {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("test/")},
        "finished": bool(metrics.get("finished")),
        "error": repr(result.error) if result.error else None,
        "trial_path": result.path,
        # which code trained the run (a finished trial may have been trained by an earlier version)
        **trained_by_folder(run_folder_in(storage, run_name)),
    }
