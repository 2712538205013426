"""Start a Ray Train run of HM4SR: a TorchTrainer whose workers run `train_loop_per_worker`.

With no cluster address (no RAY_ADDRESS, not under `ray job submit`), `ray.init()` starts an
embedded local Ray; workers then use the CPU and gloo. On a cluster, workers take one GPU each
and NCCL. Re-running with the same `train.storage_path` and `train.run_name` resumes the run from
its latest checkpoint, but only a run of the same resolved config and data (`train/identity.py`);
without a `train.run_name` the name is `<data set>-<identity hash>` (`run_folder.train_run_name`, the
one naming rule, shared with studies), so every distinct setting gets its own run and an unchanged
re-run resumes (or, finished, returns at once).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
from ray.train.torch import TorchConfig, TorchTrainer

from hm4sr_dist.config import ConfigError, ExperimentConfig, to_dict
from hm4sr_dist.data.manifest import ManifestError, read_manifest, verify_shards
from hm4sr_dist.run_folder import train_run_name
from hm4sr_dist.train.code_version import code_version
from hm4sr_dist.train.data_errors import install as install_data_error_policy
from hm4sr_dist.train.data_errors import raise_data_error
from hm4sr_dist.train.identity import check_identity, read_identity, record_identity, run_identity
from hm4sr_dist.train.state import epoch_cap_error, finished_checkpoint, stored_train_state
from hm4sr_dist.train.tracking_run import as_loop_config, open_for_driver, plan_tracking
from hm4sr_dist.train.worker import train_loop_per_worker


def ensure_ray() -> None:
    if not ray.is_initialized():
        ray.init()      # connects to RAY_ADDRESS / the job's cluster, else starts a local one


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def storage_root(cfg: ExperimentConfig) -> str:
    """Absolute local path or a URI (s3://, gs://, ...), as Ray Train needs."""
    path = cfg.train.storage_path
    return path if "://" in path else str(Path(path).resolve())


def run_folder(cfg: ExperimentConfig) -> str:
    """The Train run's folder (local path or URI) under the storage path, once `train.run_name` is set."""
    return run_folder_in(storage_root(cfg), cfg.train.run_name)


def run_folder_in(storage: str, name: str) -> str:
    return f"{storage.rstrip('/')}/{name}" if "://" in storage else os.path.join(storage, name)


def tracking_of(cfg: ExperimentConfig, parent_run_id: str | None = None):
    """The `TrackingPlan` of a run that `build_trainer` started (None: tracking off)."""
    manifest = read_manifest(cfg.data.prepared_dir)
    dataset = manifest.get("dataset") or Path(cfg.data.prepared_dir).name
    return plan_tracking(cfg, dataset, stored_identity(cfg) or "", parent_run_id)


def trained_by(cfg: ExperimentConfig) -> dict:
    """`{"code": ..., "code_history": [...]}` of the run (`code_version`), for its results.json."""
    return trained_by_folder(run_folder(cfg))


def stored_identity(cfg: ExperimentConfig) -> str | None:
    """The identity hash recorded in the run's folder (run_identity.json), once it has started."""
    return (read_identity(run_folder(cfg)) or {}).get("hash")


def trained_by_folder(run_dir: str) -> dict:
    """`trained_by` of the Train run in `run_dir` (a local path or URI)."""
    stored = read_identity(run_dir) or {}
    return {"code": stored.get("code"), "code_history": stored.get("code_history", [])}


def epoch_cap_refusal(cfg: ExperimentConfig) -> str | None:
    """Why the stored run cannot continue under `optim.epochs` (it already trained more), or None."""
    return epoch_cap_error(cfg, stored_train_state(run_folder(cfg)))


def check_epoch_cap(cfg: ExperimentConfig) -> None:
    """Refuse a too-short epoch cap before Ray Train starts (the worker checks again on resume)."""
    message = epoch_cap_refusal(cfg)
    if message:
        raise ConfigError(message)


def check_prepared(cfg: ExperimentConfig) -> dict:
    """The data every worker will read, checked in the driver before Ray Train starts (a data error
    in a worker would be retried `train.max_failures` times and end in a long traceback): the
    manifest, every shard's size, at least one shard per worker. Returns the manifest."""
    manifest = read_manifest(cfg.data.prepared_dir)
    verify_shards(cfg.data.prepared_dir, manifest, check="size")
    shards, workers = len(manifest["shards"]), cfg.train.num_workers
    if shards < workers:
        raise ManifestError(f"{cfg.data.prepared_dir}: {shards} shards for train.num_workers={workers} "
                            f"(each worker reads whole shards); re-prepare with --min-shards >= {workers} "
                            "or use fewer workers")
    return manifest


@dataclass
class Preflight:
    """What the driver checked before Ray Train starts (`preflight`)."""
    manifest: dict
    dataset: str
    identity: dict                 # run_identity(): its hash and the keys it covers
    status: str                    # check_identity(): "new", "same" or "changed"
    stored: dict | None            # the run folder's recorded identity


def preflight(cfg: ExperimentConfig) -> Preflight:
    """Every check a run can fail before a worker reads anything, in the driver and without Ray:
    the prepared data (manifest, every shard's size, a shard per worker: `check_prepared`), the run
    name (set to `<data set>-<identity>` when unset) and the stored run's identity (a clash is a
    RunIdentityError), the epoch cap. Writes nothing."""
    manifest = check_prepared(cfg)
    identity = run_identity(cfg, manifest.get("fingerprint"))
    dataset = manifest.get("dataset") or Path(cfg.data.prepared_dir).name
    cfg.train.run_name = cfg.train.run_name or train_run_name(dataset, identity["hash"])
    status, stored = check_identity(run_folder(cfg), identity, allow_change=cfg.train.allow_config_change)
    check_epoch_cap(cfg)
    return Preflight(manifest, dataset, identity, status, stored)


def finished_run_checkpoint(cfg: ExperimentConfig, run: Preflight):
    """The final checkpoint of the stored Train run when it is this config's and has nothing left to
    train (reached optim.epochs or stopped early), else None: the run is then read, not resumed."""
    if run.status != "same":
        return None
    return finished_checkpoint(run_folder(cfg), cfg.optim.epochs, cfg.eval.patience)


def build_trainer(cfg: ExperimentConfig, callbacks: list | None = None,
                  tracking_parent: str | None = None) -> TorchTrainer:
    """The TorchTrainer for one run, with optional extra Train `UserCallback`s (a Tune trial adds its
    report callback). `cfg.data.prepared_dir` must already be absolute: a Tune trial runs in its own
    working directory. Sets `cfg.train.run_name` to the resolved name; raises `RunIdentityError`
    (before Ray starts) when that run folder holds a run of another config or data set, and
    ManifestError when the data cannot be read by every worker (`check_prepared`). Opens (or
    continues) the run's MLflow run and logs its config (`train/tracking_run.py`; a study passes its
    parent run as `tracking_parent`), so a wrong tracking URI stops here too."""
    run = preflight(cfg)
    name, storage, folder = cfg.train.run_name, storage_root(cfg), run_folder(cfg)
    record_identity(folder, run.identity, run.status, run.stored, code=code_version())
    tracking = plan_tracking(cfg, run.dataset, run.identity["hash"], tracking_parent)
    open_for_driver(tracking, cfg, run.dataset)
    ensure_ray()
    install_data_error_policy()
    use_gpu = {"auto": cluster_has_gpus(), "true": True, "false": False}[cfg.train.use_gpu]
    return TorchTrainer(
        train_loop_per_worker,
        # Workers write TensorBoard and markers into a local folder: the run folder, or for a URI
        # storage a local one of the same name (Ray Train uploads checkpoints itself).
        train_loop_config={"config": to_dict(cfg),
                           "run_dir": os.path.join("outputs", name) if "://" in storage else run_folder(cfg),
                           "tracking": as_loop_config(tracking)},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=storage, callbacks=list(callbacks or []),
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.checkpoints_to_keep),
                             # Train's print() patch echoes every progress line twice in job logs.
                             worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}),
    )


def run_training(cfg: ExperimentConfig):
    """Fit and return the Ray Train `Result` (final metrics in `result.metrics`)."""
    if not cfg.data.prepared_dir:
        raise ValueError("data.prepared_dir: no prepared data set given (run the data pipeline first)")
    cfg.data.prepared_dir = str(Path(cfg.data.prepared_dir).resolve())
    return fit(build_trainer(cfg))


def fit(trainer: TorchTrainer):
    """`trainer.fit()`, with a data error in a worker raised once as a one-line ManifestError
    (`train/data_errors.py`: not retried)."""
    try:
        return trainer.fit()
    except TrainingFailedError as exc:
        raise_data_error(exc)
        raise
