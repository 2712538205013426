"""Run a planned study with Ray Tune: every trial is one Ray Train run (`hm4sr_dist.study.report_callback`'s
pattern: the trial function builds the launcher's TorchTrainer with `HM4SRTuneReportCallback` and
fits it), then tables and figures (`hm4sr_dist.study.report`).

Resuming, at three levels:
- the Tune experiment (`<storage>/<study>-<digest of the trials and the study_id>`) is restored with
  `Tuner.restore` when `Tuner.can_restore` finds it, so a killed driver picks up the trials it had
  not finished;
- a trial whose run folder `<study dir>/runs/<run>/results.json` holds its identity (and epoch cap)
  is finished: the trial function reports the stored metrics and returns without building a trainer
  (this also covers a trial finished just before a kill that Tune's saved state still shows as running);
- a trial that does train uses a Ray Train run named by its identity (`<dataset>-<hash>`), which
  resumes from its last checkpoint; when another study already ran that Train run to the end, the
  trial reads its final checkpoint without starting Ray Train (`reuse` in trials.jsonl).

Each finished trial writes a run folder for `hm4sr_dist.compare` (results.json with the resolved
config, test metrics, best epoch, per-epoch history; per_user_test.npz) from its final checkpoint.
A trial that ASHA stops (`--asha`, `hm4sr_dist.study.asha.GracefulASHA`) is asked to stop between
epochs, ends its Train run like a finished one and leaves `runs/<run>/stopped.json` instead (the
same summary without per-user ranks, so neither the tables nor hm4sr-compare take it as a result).
On a cluster the study folder must be on storage every node sees (like train.storage_path).
`trials.jsonl` in the study folder logs every training start, end, stop, skip and reuse (used by the
tests).
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path

import ray.tune

from hm4sr_dist.compare import finite_or_null
from hm4sr_dist.run_folder import PER_USER_FILE, RESULTS_FILE, STOPPED_FILE, write_run_folder
from hm4sr_dist.study.plan import StudyPlan
from hm4sr_dist.train.code_version import code_version, describe
from hm4sr_dist.train.launcher import ensure_ray, storage_root
from hm4sr_dist.study.report_callback import HM4SRTuneReportCallback
from hm4sr_dist.study.resources import fit_concurrency
from hm4sr_dist.train.stop import clear_stop, stop_file

EXIT_AFTER_ENV = "HM4SR_STUDY_EXIT_AFTER"      # test hook: the driver exits (code 75) after N trials


def _log(study_dir: Path, **event) -> None:
    with open(study_dir / "trials.jsonl", "a") as f:
        f.write(json.dumps({"time": time.time(), **event}) + "\n")


def finished_run(run_dir: Path, key: str, config: dict) -> dict | None:
    """The run folder's results.json when it holds the finished trial `key` trained under the trial's
    epoch cap, else None. The cap is not part of the run identity (a longer cap continues a Train
    run), so a run folder of a 5-epoch study is not the result of the same study at 20 epochs."""
    results = _summary_of(run_dir / RESULTS_FILE, key, config)
    return results if results is not None and (run_dir / PER_USER_FILE).is_file() else None


def stopped_run(run_dir: Path, key: str, config: dict) -> dict | None:
    """The run folder's stopped.json when it holds the trial `key` stopped early under the trial's
    epoch cap, else None."""
    return _summary_of(run_dir / STOPPED_FILE, key, config)


def _summary_of(file: Path, key: str, config: dict) -> dict | None:
    """A run folder's summary (results.json or stopped.json) when it is of trial `key` under the
    trial's epoch cap, else None."""
    try:
        summary = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    epochs = ((summary.get("config") or {}).get("optim") or {}).get("epochs")
    return summary if summary.get("identity") == key and epochs == config["optim"]["epochs"] else None


def write_trial_folder(run_dir: Path, result, trial: dict, config: dict, plan_info: dict,
                       wall_seconds: float, code: dict | None = None, extra: dict | None = None) -> dict:
    """The trial's run folder (`hm4sr_dist.run_folder.write_run_folder`), from the Train run's final
    checkpoint."""
    if result.checkpoint is None:
        raise RuntimeError(f"trial {trial['run']}: the Train run left no checkpoint")
    with result.checkpoint.as_directory() as folder:
        return write_run_folder(run_dir, Path(folder), config=config, dataset=plan_info["dataset"],
                                identity=trial["key"], fingerprint=plan_info["fingerprint"],
                                wall_seconds=wall_seconds, checkpoint_uri=result.checkpoint.path, code=code,
                                setting=trial["setting"], seed=trial["seed"], study=plan_info["study"],
                                extra=extra)


def study_trial(config: dict, *, configs: dict, study_dir: str, plan_info: dict) -> None:
    """The Tune trainable: one Ray Train run of the trial's resolved config (`configs[key]`)."""
    from hm4sr_dist.config import ExperimentConfig, from_dict
    from hm4sr_dist.train.launcher import build_trainer, fit, trained_by, tracking_of
    from hm4sr_dist.train.tracking_run import attach_run_folder

    trial, folder = config["trial"], Path(study_dir)
    valid_key = f"valid/{configs[trial['key']]['eval']['valid_metric']}"
    run_dir = folder / "runs" / trial["run"]
    done = finished_run(run_dir, trial["key"], configs[trial["key"]])
    if done is not None:                      # finished before (a restored or re-run study)
        _log(folder, event="skip", key=trial["key"], run=trial["run"],
             trained_by=describe(done.get("code")), current_code=describe(code_version()))
        _report_stored(done, valid_key)
        return
    started = time.time()
    cfg = from_dict(ExperimentConfig, configs[trial["key"]]).validate()
    earlier = _finished_train_run(cfg, trial["key"])
    if earlier is not None:                   # trained to the end by another study: read, not resumed
        summary = write_trial_folder(run_dir, earlier, trial, configs[trial["key"]], plan_info,
                                   time.time() - started, code=trained_by(cfg), extra={"reused": True})
        attach_run_folder(tracking_of(cfg, plan_info.get("tracking_parent")), run_dir)
        _log(folder, event="reuse", key=trial["key"], run=trial["run"], train_run=cfg.train.run_name,
             trained_by=describe(summary.get("code")))
        _report_stored(summary, valid_key)
        return
    _log(folder, event="start", key=trial["key"], run=trial["run"])
    trainer = build_trainer(cfg, callbacks=[HM4SRTuneReportCallback(valid_key)],
                            tracking_parent=plan_info.get("tracking_parent"))
    clear_stop(stop_file(storage_root(cfg), cfg.train.run_name))   # a request meant an earlier trial
    result = fit(trainer)
    summary = write_trial_folder(run_dir, result, trial, configs[trial["key"]], plan_info,
                               time.time() - started, code=trained_by(cfg))
    attach_run_folder(tracking_of(cfg, plan_info.get("tracking_parent")), run_dir)
    _log(folder, event="stopped" if summary.get("status") == "stopped" else "end", key=trial["key"],
         run=trial["run"], seconds=time.time() - started, epochs_run=summary.get("epochs_run"))


LAUNCH_FILE = "tune_launch.json"               # the flags each Tune experiment was started with


def _record_launch(study_dir: Path, experiment: str, launch: dict) -> None:
    file = study_dir / LAUNCH_FILE
    stored = json.loads(file.read_text()) if file.is_file() else {}
    file.write_text(json.dumps(stored | {experiment: launch}, indent=2))


def _note_changed_launch(study_dir: Path, path: str, experiment: str, launch: dict) -> None:
    """A restored Tune experiment keeps the scheduler, concurrency and FailureConfig it was started
    with (Tuner.restore takes none of them): say so when the re-run asked for others."""
    file = study_dir / LAUNCH_FILE
    first = (json.loads(file.read_text()) if file.is_file() else {}).get(experiment)
    changed = {k: v for k, v in launch.items() if first is not None and first.get(k) != v}
    if changed:
        was = " ".join(f"{k}={first.get(k)}" for k in changed)
        asked = " ".join(f"{k}={v}" for k, v in changed.items())
        print(f"note: the resumed Tune experiment keeps the settings it was started with ({was}); "
              f"this run's {asked} do not apply to it. To start it afresh with them, delete {path} "
              "(finished trials are kept in the run folders, trained epochs in the Train runs)", flush=True)


def _report_stored(results: dict, valid_key: str) -> None:
    """Report a finished run's stored results to Tune, as the last report of a trained one."""
    ray.tune.report({"best_valid": results.get("best_valid"), valid_key: results.get("best_valid"),
                     "best_epoch": results.get("best_epoch"),
                     **{f"test/{k}": v for k, v in results["test"].items()}, "finished": True,
                     "from_run_folder": True})


def _nothing_to_train(t, study_dir: Path) -> bool:
    from hm4sr_dist.config import ExperimentConfig, from_dict
    return (finished_run(study_dir / "runs" / t.run, t.key, t.config) is not None
            or _finished_train_run(from_dict(ExperimentConfig, t.config), t.key) is not None)


def _finished_train_run(cfg, key: str):
    """A `Result`-like (`.checkpoint`) of the trial's Train run when it holds this identity and has
    nothing left to train (another study ran it to the end), else None. Resuming it would only load
    the checkpoint on every worker and evaluate test again (minutes on Beauty), and add a checkpoint."""
    from types import SimpleNamespace

    from hm4sr_dist.train.identity import read_identity
    from hm4sr_dist.train.launcher import run_folder
    from hm4sr_dist.train.state import finished_checkpoint

    folder = run_folder(cfg)
    if (read_identity(folder) or {}).get("hash") != key:
        return None                           # new, or another config: build_trainer decides
    checkpoint = finished_checkpoint(folder, cfg.optim.epochs, cfg.eval.patience)
    return SimpleNamespace(checkpoint=checkpoint) if checkpoint is not None else None


class _ExitAfter(ray.tune.Callback):
    """Test hook: with HM4SR_STUDY_EXIT_AFTER=N in the driver's environment, end the driver process
    abruptly (as a kill would) after N completed trials. Read at call time: a restored Tuner brings
    back its callbacks, and the resumed driver must not inherit the first one's exit."""

    def __init__(self):
        self.seen = 0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.seen += 1
        n = int(os.environ.get(EXIT_AFTER_ENV) or 0)
        if n and self.seen >= n:
            print(f"{EXIT_AFTER_ENV}={n}: exiting the study driver", flush=True)
            os._exit(75)


def _stop_file_of(files: dict, trial_config: dict) -> str | None:
    """GracefulASHA's marker path of a Tune trial (module level: Tune pickles its scheduler)."""
    return files.get(((trial_config or {}).get("trial") or {}).get("key"))


def check_epoch_caps(plan: StudyPlan, study_dir: Path) -> None:
    """Before Ray starts: no trial that will train may resume a Train run (shared across studies by
    identity) that already trained more epochs than the trial's `optim.epochs`."""
    from hm4sr_dist.config import ConfigError, ExperimentConfig, from_dict
    from hm4sr_dist.train.launcher import epoch_cap_refusal

    refused = []
    for t in plan.trials:
        if finished_run(study_dir / "runs" / t.run, t.key, t.config) is not None:
            continue                                   # reported from its run folder, not trained
        message = epoch_cap_refusal(from_dict(ExperimentConfig, t.config))
        if message:
            refused.append(f"{t.run}: {message}")
    if refused:
        raise ConfigError(f"{len(refused)} trial(s) cannot run at this epoch cap: " + " | ".join(refused),
                          key="optim.epochs")


def run_study(plan: StudyPlan, study_dir: Path, *, max_concurrent: int = 1, trial_cpus: float = 1.0,
              max_failures: int = 1, asha: bool = False, asha_grace: int = 1,
              asha_reduction: float = 2.0) -> list[dict]:
    """Fit (or restore and finish) every trial of the plan; return one status row per trial:
    finished, stopped (by ASHA, between epochs), failed (with the error) or unfinished."""
    study_dir = study_dir.resolve()
    check_epoch_caps(plan, study_dir)
    base = plan.trials[0].config
    ensure_ray()
    # Only trials that will train start workers: a finished or reusable one needs its driver alone.
    shapes = [(t.config["train"]["num_workers"], t.config["train"]["cpus_per_worker"])
              for t in plan.trials if not _nothing_to_train(t, study_dir)] or [(0, 0.0)]
    launch = {"--max-concurrent": max_concurrent, "--max-failures": max_failures, "--asha": asha}
    if asha:
        launch |= {"--asha-grace": asha_grace, "--asha-reduction": asha_reduction}
    max_concurrent, note = fit_concurrency(max_concurrent, shapes, trial_cpus)   # refuses what cannot fit
    if note:
        print(f"note: {note}", flush=True)
    (study_dir / "runs").mkdir(parents=True, exist_ok=True)
    from hm4sr_dist.config import ExperimentConfig, from_dict
    storage = storage_root(from_dict(ExperimentConfig, base))
    parent = study_tracker(plan, study_dir)       # the study's MLflow run; each trial is a child
    plan_info = {"dataset": plan.dataset, "fingerprint": plan.fingerprint, "study": plan.study,
                 "tracking_parent": parent.run_id}
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(study_trial, configs={t.key: t.config for t in plan.trials},
                                 study_dir=str(study_dir), plan_info=plan_info),
        {"cpu": trial_cpus})
    experiment = plan.experiment_in(study_dir)
    path = (f"{storage.rstrip('/')}/{experiment}" if "://" in storage
            else os.path.join(storage, experiment))
    callbacks = [_ExitAfter()]
    if ray.tune.Tuner.can_restore(path):
        print(f"study {plan.name}: resuming the Tune experiment {path}", flush=True)
        _note_changed_launch(study_dir, path, experiment, launch)
        tuner = ray.tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        _record_launch(study_dir, experiment, launch)
        scheduler = None
        if asha:
            from hm4sr_dist.study.asha import GracefulASHA
            epochs = max(t.config["optim"]["epochs"] for t in plan.trials)
            # Every epoch reports valid/<metric> (training_iteration = epochs done); the final test
            # report carries it too (= best_valid, see HM4SRTuneReportCallback).
            metric = f"valid/{plan.trials[0].config['eval']['valid_metric']}"
            # ASHA's STOP becomes a stop request the workers honour between epochs (the run ends with
            # its final checkpoint); max_t above the epoch reports + the final one and
            # stop_last_trials=False: a trial that reaches its last epoch is never stopped.
            files = {t.key: stop_file(storage, t.config["train"]["run_name"]) for t in plan.trials}
            scheduler = GracefulASHA(functools.partial(_stop_file_of, files), metric=metric, mode="max",
                                     time_attr="training_iteration", max_t=max(epochs + 2, asha_grace),
                                     grace_period=asha_grace, reduction_factor=asha_reduction,
                                     stop_last_trials=False)
        tuner = ray.tune.Tuner(
            trainable,
            param_space={"trial": ray.tune.grid_search(
                [{"key": t.key, "setting": t.setting, "seed": t.seed, "run": t.run} for t in plan.trials])},
            tune_config=ray.tune.TuneConfig(max_concurrent_trials=max_concurrent, scheduler=scheduler,
                                            trial_dirname_creator=lambda t: f"trial_{t.trial_id}"),
            run_config=ray.tune.RunConfig(name=experiment, storage_path=storage, verbose=1,
                                          callbacks=callbacks,
                                          failure_config=ray.tune.FailureConfig(max_failures=max_failures)),
        )
    grid = tuner.fit()
    errors = {}
    for r in grid:
        spec = (r.config or {}).get("trial") or {}
        if r.error is not None and spec:
            errors[spec["key"]] = " ".join(repr(r.error).split())[:300]
    return write_trial_statuses(plan, study_dir, errors)


def study_tracker(plan: StudyPlan, study_dir: Path):
    """The study's parent MLflow run (continued by a re-run of the same study folder); a no-op
    tracker when `train.tracking_uri` turns tracking off."""
    from hm4sr_dist.study.plan import study_id
    from hm4sr_dist.train.tracking_run import open_study_run

    train = plan.trials[0].config["train"]
    return open_study_run(train["tracking_uri"], train["storage_path"], plan.dataset, plan.name,
                          study_id(study_dir))


def write_trial_statuses(plan: StudyPlan, study_dir: Path, errors: dict | None = None) -> list[dict]:
    """trials.json: every planned trial's status from its run folder (`errors`: trial key -> the
    error of a trial Tune gave up on)."""
    errors = errors or {}
    rows = []
    for t in plan.trials:
        done = finished_run(study_dir / "runs" / t.run, t.key, t.config)
        stopped = None if done else stopped_run(study_dir / "runs" / t.run, t.key, t.config)
        status = ("finished" if done else "failed" if t.key in errors else
                  "stopped" if stopped else "unfinished")
        info = done or stopped or {}
        rows.append({"setting": t.setting, "seed": t.seed, "run": t.run, "key": t.key, "status": status,
                     "error": errors.get(t.key), "best_epoch": info.get("best_epoch"),
                     "wall_seconds": info.get("wall_seconds"), "train_seconds": info.get("train_seconds"),
                     "best_valid": info.get("best_valid"), "epochs_run": info.get("epochs_run"),
                     "epochs": t.config["optim"]["epochs"], "stopped_by": (stopped or {}).get("stopped_by")})
    # strict JSON: a run whose validation was never finite keeps best_valid = -inf
    (study_dir / "trials.json").write_text(json.dumps(finite_or_null(rows), indent=2, default=str,
                                                      allow_nan=False))
    return rows

