"""Where a training run meets the experiment tracker (`hm4sr_dist.tracking`, MLflow).

One MLflow run per Ray Train run, found by the run identity hash (tag `hm4sr.identity`), so a
resumed run (or a study trial that continues a Train run) appends to the same MLflow run:

- the driver, before Ray Train starts (`open_for_driver`): opens or continues the run, logs the
  resolved config as params and the tags; a wrong tracking URI stops the job here, in one line;
- worker rank 0 (`open_for_worker`, inside `train_loop_per_worker`, as Ray Train v2 expects: its
  RunConfig takes no Tune logger callbacks): per-step and per-epoch metrics and the test metrics
  (the `Monitor` forwards what it writes to TensorBoard);
- the driver, once the run folder is written (`attach_run_folder`): results.json and the per-user
  ranks as artifacts, and the run's status, FINISHED (a study adds its tables and figures to its
  parent run); a job whose training fails marks it FAILED (`mark_failed`).

`TrackingPlan` is what the driver hands the workers in `train_loop_config` (plain data).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from hm4sr_dist.config import ExperimentConfig, to_dict
from hm4sr_dist.run_folder import PER_USER_FILE, RESULTS_FILE, STOPPED_FILE
from hm4sr_dist.tracking import STUDY_TAG, NullTracker, Tracker, TrackingError, tracking_uri_for
from hm4sr_dist.train.monitor import say_tracking_stopped


@dataclass
class TrackingPlan:
    uri: str
    experiment: str
    identity: str
    run_name: str
    parent_run_id: str | None = None

    def open(self, tags: dict | None = None) -> Tracker:
        return Tracker.open(self.uri, self.experiment, self.identity, self.run_name,
                            parent_run_id=self.parent_run_id, tags=tags)


def experiment_name(dataset: str) -> str:
    """One MLflow experiment per data set: its runs and studies side by side, searchable by config."""
    return f"hm4sr-{dataset}"


def plan_tracking(cfg: ExperimentConfig, dataset: str, identity_hash: str,
                  parent_run_id: str | None = None) -> TrackingPlan | None:
    """The run's tracking plan, or None when `train.tracking_uri` turns tracking off."""
    uri = tracking_uri_for(cfg.train.tracking_uri, cfg.train.storage_path)
    if uri is None:
        return None
    return TrackingPlan(uri, experiment_name(dataset), identity_hash, cfg.train.run_name, parent_run_id)


def open_for_driver(plan: TrackingPlan | None, cfg: ExperimentConfig, dataset: str) -> str | None:
    """Open (or continue) the run and log the config; returns its MLflow run id (None: off)."""
    if plan is None:
        return None
    tracker = plan.open(tags={"hm4sr.dataset": dataset, "hm4sr.train_run": cfg.train.run_name,
                              "hm4sr.name": cfg.name})
    tracker.log_params(to_dict(cfg))
    return tracker.run_id


def open_for_worker(plan: dict | None, rank: int) -> Tracker:
    """Rank 0's tracker (the same MLflow run the driver opened); a no-op tracker elsewhere."""
    if rank != 0 or not plan:
        return NullTracker()
    try:
        return TrackingPlan(**plan).open()
    except TrackingError as exc:    # the driver reached it before Ray started: gone since, not wrong
        say_tracking_stopped(exc)
        return NullTracker()


def as_loop_config(plan: TrackingPlan | None) -> dict | None:
    return asdict(plan) if plan is not None else None


def attach_run_folder(plan: TrackingPlan | None, run_dir: Path) -> None:
    """results.json and per_user_test.npz (or stopped.json) of a written run folder, as artifacts
    of the run's MLflow run; the run ends FINISHED."""
    if plan is None:
        return
    tracker = plan.open()
    for name in (RESULTS_FILE, PER_USER_FILE, STOPPED_FILE):    # the folder may hold other things
        if (Path(run_dir) / name).is_file():
            tracker.log_artifact(Path(run_dir) / name, artifact_path="run_folder")
    tracker.finish("FINISHED")


def attach_export(results: dict, export_dir: Path) -> str | None:
    """An export (`hm4sr-export`) as artifacts `export/` of its run's MLflow run, found by the run
    identity in the run's results.json; returns the run id, or None when tracking is off or the
    run has no MLflow run (trained before tracking, or elsewhere)."""
    from hm4sr_dist.tracking import find_run

    train = (results.get("config") or {}).get("train") or {}
    identity, dataset = results.get("identity"), results.get("dataset")
    uri = tracking_uri_for(train.get("tracking_uri", ""), train.get("storage_path", ""))
    if not (uri and identity and dataset) or find_run(uri, experiment_name(dataset), identity) is None:
        return None
    tracker = Tracker.open(uri, experiment_name(dataset), identity, train.get("run_name", ""))
    tracker.log_artifacts(export_dir, artifact_path="export")
    tracker.finish("FINISHED")
    return tracker.run_id


def mark_failed(plan: TrackingPlan | None) -> None:
    """Best effort, while the training error is on its way up: the run's MLflow status FAILED (a
    tracking error here must not hide the training one)."""
    if plan is None or not plan.identity:
        return
    try:
        plan.open().finish("FAILED")
    except TrackingError:
        pass


def open_study_run(uri_setting: str, storage_path: str, dataset: str, study_name: str,
                   study_id: str) -> Tracker:
    """A study's parent MLflow run (tag `hm4sr.study`), continued when the study is re-run."""
    uri = tracking_uri_for(uri_setting, storage_path)
    return Tracker.open(uri, experiment_name(dataset), f"study:{study_id}", study_name,
                        tags={STUDY_TAG: study_id, "hm4sr.dataset": dataset})
