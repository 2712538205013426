"""What every dataset job does: check the command line, find or prepare the shards, fit the config to
the data, train with Ray Train, write the run folder (`hm4sr_dist.run_folder`). jobs/train.py names
the data set (its table), jobs/train_home.py is one row of it.

    python jobs/train.py --dataset NAME [--raw-dir DIR] [--prepared-dir DIR] [--variant hm4sr|sasrec|-TMoE|...]
                                         [--config FILE] [--output DIR] [--prep KEY=VALUE ...] [key.path=value ...]

Flags fall back to environment variables: HM4SR_RAW_DIR, HM4SR_PREPARED_DIR, HM4SR_OUTPUT_DIR.
Works the same locally (embedded Ray) and under `ray job submit -- python jobs/train_home.py`.

Errors before work: `plan_job` checks the whole command line -- the config (YAML, overrides,
variant), the --prep settings, the folders, and what the config asks for that the data cannot give
as far as that is known before preparing it (`hm4sr_dist.job_config.resolve_job_config`) -- without
importing Ray or torch. Only then does `run_plan` start Ray, prepare the data and fit the config to
it (the same function with `fit=True`, a note per part switched off). `main` turns a user error (a `ConfigError`,
the pipeline's `DataError` or a `ManifestError`) into one `error: ...` line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from hm4sr_dist.config import ConfigError, ExperimentConfig, check_variant, closest, to_dict
from hm4sr_dist.feasibility import DataOffer
from hm4sr_dist.job_config import resolve_job_config


@dataclass
class DatasetJob:
    name: str                                   # short name: folders, run names
    source: str                                 # data_pipelines source adapter
    prep: dict = field(default_factory=dict)    # extra PrepConfig fields (category, ...)
    description: str = ""


class JobArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are, like every user error of a job, one line and exit code 2."""

    def error(self, message: str):
        if "--variant: expected one argument" in message:     # a dash-led value reads as a flag
            message += "; an ablation is written with =: --variant=-TMoE"
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def parse_args(job: DatasetJob, argv: list[str] | None) -> argparse.Namespace:
    p = JobArgumentParser(description=f"Train HM4SR on {job.description or job.name}.")
    p.add_argument("--raw-dir", default=os.environ.get("HM4SR_RAW_DIR", ""),
                   help="folder with the raw files (prepared into --prepared-dir when missing)")
    p.add_argument("--prepared-dir", default=os.environ.get("HM4SR_PREPARED_DIR", ""),
                   help=f"prepared shards (default outputs/prepared/{job.name})")
    p.add_argument("--config", default="configs/hm4sr_paper.yaml")
    p.add_argument("--variant", default="hm4sr", help="hm4sr, sasrec or an ablation, written with = : --variant=-TMoE")
    p.add_argument("--output", default=os.environ.get("HM4SR_OUTPUT_DIR", ""),
                   help="where results.json goes (default outputs/<run name>)")
    p.add_argument("--force-prepare", action="store_true", help="rebuild the shards even if up to date")
    p.add_argument("--prep", action="append", default=[], metavar="KEY=VALUE",
                   help="a data-pipeline setting (a PrepConfig field), e.g. text_model=minilm-offline, "
                        "image_dir=/data/images, download_images=true; repeatable")
    p.add_argument("overrides", nargs="*", help="key.path=value config overrides (anywhere on the line)")
    return p.parse_intermixed_args(argv)


# PrepConfig fields the job sets itself -> what sets them.
JOB_PREP_FIELDS = {"source": "the job script", "name": "the job script", "out_dir": "--prepared-dir",
                   "input_dir": "--raw-dir", "force": "--force-prepare"}
_PREP_KINDS = {bool: "true or false", int: "an int", float: "a number", list: "a list"}


def _prep_value(key: str, kind: Any, raw: str) -> Any:
    """A `--prep` value: strings as written (paths, model names), the rest parsed as YAML."""
    import yaml

    if kind is str:
        return raw
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = None
    if kind is list and isinstance(value, str):
        value = [value]
    ok = {bool: isinstance(value, bool), int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool),
          list: isinstance(value, list)}.get(kind, True)
    if not ok:
        raise ConfigError(key=key, source="--prep", expected=_PREP_KINDS[kind], got=raw)
    return float(value) if kind is float else value


def prep_settings(job: DatasetJob, pairs: list[str]) -> dict:
    """The job's pipeline settings with `--prep key=value` pairs on top, each checked against the
    type of its PrepConfig field."""
    from data_pipelines.config import PrepConfig

    hints = typing.get_type_hints(PrepConfig)
    settings = dict(job.prep)
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(key="--prep", expected="KEY=VALUE", got=pair)
        if key in JOB_PREP_FIELDS:
            raise ConfigError(f"set by {JOB_PREP_FIELDS[key]}, not by --prep", key=key, source="--prep")
        if key not in hints:
            raise ConfigError(key=key, source="--prep", unknown=True,
                              suggestion=closest(key, [k for k in hints if k not in JOB_PREP_FIELDS]))
        settings[key] = _prep_value(key, hints[key], raw)
        if key == "memory_budget_mb":  # range checked here too: before Ray starts or data is read
            from data_pipelines.config import check_memory_budget

            if problem := check_memory_budget(settings[key]):
                raise ConfigError(problem, key=key, source="--prep")
    return settings


def expected_offer(job: DatasetJob, prep: dict) -> DataOffer:
    """What the data will offer, as far as the source and the --prep settings tell before it is
    prepared (the sequence files carry IDs and times only; text=false / images=false drop those
    features). The rest is assumed present: the check after preparation has the last word."""
    if job.source == "sequence":
        return DataOffer(frozenset({"id"}), categories=False)
    modalities = {"id", "text", "image"} - ({"text"} if prep.get("text") is False else set()) \
        - ({"image"} if prep.get("images") is False else set())
    return DataOffer(frozenset(modalities), categories=True)


def _manifest_offer(prepared: Path) -> DataOffer:
    """The offer of an already prepared data set, read as plain JSON (no torch); the full check of
    the manifest comes later."""
    try:
        return DataOffer.from_manifest(json.loads((prepared / "manifest.json").read_text()))
    except (OSError, ValueError, AttributeError):
        return DataOffer()


@dataclass
class JobPlan:
    """A checked command line: everything a job needs before it starts Ray."""

    job: DatasetJob
    args: argparse.Namespace
    config: ExperimentConfig        # YAML + overrides + variant, checked; run_plan fits it to the data
    explicit: dict[str, str]        # keys set on the command line -> their source
    prep: dict                      # PrepConfig fields for the preparation
    prepared: Path
    started: float = field(default_factory=time.time)


def job_run_label(job: DatasetJob, variant: str) -> str:
    """`cfg.name` of a job's run: the data set and the variant (`beauty-tmoe` for -TMoE)."""
    return f"{job.name}-{variant.lstrip('-').lower()}"


def plan_job(job: DatasetJob, argv: list[str] | None = None, *, check_paths: bool = True) -> JobPlan:
    """Check the whole command line without touching Ray or the data; raise ConfigError.

    `check_paths=False` skips the checks of --raw-dir / --prepared-dir (the quickstart writes its
    raw files after checking its overrides)."""
    args = parse_args(job, argv)
    check_variant(args.variant)
    prep = prep_settings(job, args.prep)
    prepared = Path(args.prepared_dir or f"outputs/prepared/{job.name}")
    if check_paths and args.raw_dir and not Path(args.raw_dir).is_dir():
        raise ConfigError(key="--raw-dir", expected="a folder with the raw files", got=args.raw_dir)
    if check_paths and not args.raw_dir and not (prepared / "manifest.json").is_file():
        raise ConfigError(f"{prepared} holds no prepared data set (no manifest.json) and no --raw-dir "
                          "was given to prepare one from", key="--prepared-dir")
    offer = expected_offer(job, prep) if args.raw_dir else _manifest_offer(prepared)
    checked = resolve_job_config(args.config, args.overrides, args.variant, offer)
    checked.config.name = job_run_label(job, args.variant)
    return JobPlan(job, args, checked.config, checked.explicit, prep, prepared)


def ensure_prepared(job: DatasetJob, raw_dir: str, prepared_dir: Path, force: bool,
                    prep: dict | None = None) -> dict:
    """Prepare the shards from the raw files unless an up-to-date manifest is already there."""
    from hm4sr_dist.data.manifest import read_manifest
    from hm4sr_dist.train.monitor import say

    if raw_dir:
        from data_pipelines.config import PrepConfig
        from data_pipelines.prepare import prepare, summary
        manifest = prepare(PrepConfig(source=job.source, out_dir=str(prepared_dir), name=job.name,
                                      input_dir=raw_dir, force=force, **(prep or job.prep)))
        say(summary(manifest))
        return manifest
    if not (prepared_dir / "manifest.json").exists():
        raise ConfigError(f"{prepared_dir} holds no prepared data set (no manifest.json) and no "
                          "--raw-dir was given to prepare one from", key="--prepared-dir")
    return read_manifest(prepared_dir)


def run_plan(plan: JobPlan) -> dict:
    """Prepare the data if asked, fit the config to it, check the run before Ray Train starts
    (`launcher.preflight`), then train and write the run folder; a finished run is read, not run."""
    from hm4sr_dist.train.launcher import (ensure_ray, finished_run_checkpoint, preflight, run_training,
                                           tracking_of)
    from hm4sr_dist.train.monitor import say

    args, job = plan.args, plan.job
    if args.raw_dir:      # the pipeline runs on Ray Data: start Ray first so its worker logs reach us
        ensure_ray()
    manifest = ensure_prepared(job, args.raw_dir, plan.prepared, args.force_prepare, plan.prep)
    fitted = resolve_job_config(args.config, args.overrides, args.variant, DataOffer.from_manifest(manifest),
                                fit=True, prepared_dir=plan.prepared)
    cfg, notes = fitted.config, fitted.notes
    cfg.name = job_run_label(job, args.variant)
    for note in notes:
        say(f"note: {note}")
    run = preflight(cfg)             # data, run name, identity, epoch cap: before any worker starts
    out = Path(args.output or Path("outputs") / cfg.train.run_name)
    finished = finished_run_checkpoint(cfg, run)
    if finished is not None:
        return _read_finished_run(plan, cfg, run, finished, out, notes)
    try:
        result = run_training(cfg)
    except Exception:
        from hm4sr_dist.train.tracking_run import mark_failed
        mark_failed(tracking_of(cfg))
        raise
    if result.checkpoint is None:
        raise RuntimeError(f"{cfg.train.run_name}: the Train run left no checkpoint")
    results = _write_run_folder(plan, cfg, run, result.checkpoint, out, notes, time.time() - plan.started)
    from hm4sr_dist.train.tracking_run import attach_run_folder
    attach_run_folder(tracking_of(cfg), out)
    say("test " + _test_line(results))
    say(f"wrote {out / 'results.json'}")
    return results


def _test_line(results: dict) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in results["test"].items() if k != "count")


def _write_run_folder(plan: JobPlan, cfg: ExperimentConfig, run, checkpoint, out: Path, notes: list,
                      wall_seconds: float, extra: dict | None = None) -> dict:
    from hm4sr_dist.run_folder import write_run_folder
    from hm4sr_dist.train.launcher import trained_by

    with checkpoint.as_directory() as folder:
        return write_run_folder(out, Path(folder), config=to_dict(cfg), dataset=run.dataset,
                                identity=run.identity["hash"], fingerprint=run.manifest.get("fingerprint"),
                                wall_seconds=wall_seconds, checkpoint_uri=checkpoint.path, code=trained_by(cfg),
                                variant=plan.args.variant, notes=notes,
                                counts=run.manifest.get("counts", {}), extra=extra)


def _read_finished_run(plan: JobPlan, cfg: ExperimentConfig, run, checkpoint, out: Path, notes: list) -> dict:
    """A re-run of a finished run: its stored results, printed; no Ray, no worker, no checkpoint, no
    TensorBoard point, and an existing results.json of the run left as it is (one in another
    --output folder is written from the run's final checkpoint)."""
    from hm4sr_dist.run_folder import RunFolderError, read_results
    from hm4sr_dist.train.monitor import say

    try:
        results = read_results(out)
    except RunFolderError:
        results = None
    # the same identity is not enough: the Train run may have been taken further since (a study
    # trial or a job with a higher epoch cap shares it); the folder must hold its final checkpoint's
    if (results is not None and results.get("identity") == run.identity["hash"]
            and results.get("checkpoint") == checkpoint.path):
        say(f"run {cfg.train.run_name} is finished (nothing to train at optim.epochs={cfg.optim.epochs}): "
            f"its results, unchanged, from {out / 'results.json'}")
    else:
        results = _write_run_folder(plan, cfg, run, checkpoint, out, notes, 0.0,
                                    extra={"read_from_finished_run": True})
        say(f"run {cfg.train.run_name} is finished (nothing to train at optim.epochs={cfg.optim.epochs}): "
            f"wrote {out / 'results.json'} from its final checkpoint")
    say("test " + _test_line(results))
    return results


def run_job(job: DatasetJob, argv: list[str] | None = None) -> dict:
    """`plan_job`, then `run_plan`; a user error raises ConfigError (or DataError, ManifestError)."""
    return run_plan(plan_job(job, argv))


def is_user_error(exc: BaseException) -> bool:
    """A ConfigError, the data pipeline's DataError / ManifestError or a TrackingError (a wrong
    tracking URI), checked without importing their modules: when a module is not loaded, nothing
    raised one of its errors."""
    others = (("data_pipelines.report", "DataError"), ("hm4sr_dist.data.manifest", "ManifestError"),
              ("hm4sr_dist.tracking", "TrackingError"))
    kinds = [ConfigError] + [getattr(sys.modules.get(module), name, None) for module, name in others]
    return isinstance(exc, tuple(k for k in kinds if k is not None))


def exit_on_user_error(fn: Callable[[], Any]) -> Any:
    """Run `fn`; a user error becomes one `error: ...` line on stderr and exit code 2, no traceback."""
    try:
        return fn()
    except Exception as exc:
        if not is_user_error(exc):
            raise
        print("error: " + " ".join(str(exc).split("\n")), file=sys.stderr, flush=True)
        raise SystemExit(2) from None
