"""What every dataset job does: find or prepare the shards, fit the config to the data, train with
Ray Train, write results.json. The per-dataset scripts only name their raw source.

    python jobs/train_home.py [--raw-dir DIR] [--prepared-dir DIR] [--variant hm4sr|sasrec|-TMoE|...]
                              [--config FILE] [--output DIR] [key.path=value ...]

Flags fall back to environment variables: HM4SR_RAW_DIR, HM4SR_PREPARED_DIR, HM4SR_OUTPUT_DIR.
Works the same locally (embedded Ray) and under `ray job submit -- python jobs/train_home.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from hm4sr_dist.config import ExperimentConfig, apply_variant, load_config, to_dict
from hm4sr_dist.data import read_manifest
from hm4sr_dist.train.monitor import say


@dataclass
class DatasetJob:
    name: str                                   # short name: folders, run names
    source: str                                 # data_pipelines source adapter
    prep: dict = field(default_factory=dict)    # extra PrepConfig fields (category, ...)
    description: str = ""


def parse_args(job: DatasetJob, argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=f"Train HM4SR on {job.description or job.name}.")
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
    p.add_argument("overrides", nargs="*", help="key.path=value config overrides")
    return p.parse_args(argv)


def prep_settings(job: DatasetJob, pairs: list[str]) -> dict:
    """The job's pipeline settings with `--prep key=value` pairs on top (values parsed as YAML)."""
    import dataclasses

    import yaml
    from data_pipelines.config import PrepConfig
    known = {f.name for f in dataclasses.fields(PrepConfig)}
    settings = dict(job.prep)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in known:
            raise SystemExit(f"error: --prep {pair!r}: expected KEY=VALUE with KEY one of {sorted(known)}")
        settings[key] = yaml.safe_load(value)
    return settings


def ensure_prepared(job: DatasetJob, raw_dir: str, prepared_dir: Path, force: bool,
                    prep: dict | None = None) -> dict:
    """Prepare the shards from the raw files unless an up-to-date manifest is already there."""
    if raw_dir:
        from data_pipelines.config import PrepConfig
        from data_pipelines.prepare import prepare, summary
        manifest = prepare(PrepConfig(source=job.source, out_dir=str(prepared_dir), name=job.name,
                                      input_dir=raw_dir, force=force, **(prep or job.prep)))
        say(summary(manifest))
        return manifest
    if not (prepared_dir / "manifest.json").exists():
        raise SystemExit(f"error: {prepared_dir} holds no prepared data set (no manifest.json) and no "
                         f"--raw-dir was given to prepare one from")
    return read_manifest(prepared_dir)


def fit_to_data(cfg: ExperimentConfig, manifest: dict) -> list[str]:
    """Drop what the data set cannot feed (a modality without features, CP without categories)."""
    notes = []
    available = {"id"} | set(manifest.get("features", {}))
    missing = [m for m in cfg.model.modalities if m not in available]
    if missing:
        cfg.model.modalities = [m for m in cfg.model.modalities if m in available]
        notes.append(f"model.modalities: {missing} dropped (the data set has no such features)")
    if cfg.loss.cp_weight > 0 and not manifest.get("n_categories"):
        cfg.loss.cp_weight = 0.0
        notes.append("loss.cp_weight: set to 0 (the data set has no item categories)")
    if cfg.loss.pcl_weight > 0 and not (cfg.model.use_temporal_moe and
                                        {"text", "image"} & set(cfg.model.modalities)):
        cfg.loss.pcl_weight = 0.0
        notes.append("loss.pcl_weight: set to 0 (PCL needs a text or image modality)")
    return notes


def run_job(job: DatasetJob, argv: list[str] | None = None) -> dict:
    from hm4sr_dist.train.launcher import ensure_ray, run_training

    args = parse_args(job, argv)
    started = time.time()
    ensure_ray()          # before the pipeline's own init, which would not forward worker logs
    prepared = Path(args.prepared_dir or f"outputs/prepared/{job.name}")
    manifest = ensure_prepared(job, args.raw_dir, prepared, args.force_prepare, prep_settings(job, args.prep))
    cfg = apply_variant(load_config(args.config, args.overrides), args.variant)
    cfg.name = f"{job.name}-{args.variant.lstrip('-').lower()}"
    cfg.data.prepared_dir = str(prepared.resolve())
    for note in fit_to_data(cfg, manifest):
        say(f"note: {note}")
    cfg.validate()
    result = run_training(cfg)
    metrics = dict(result.metrics)
    results = {
        "dataset": job.name, "variant": args.variant,
        "test": {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("test/")},
        "best_valid": metrics.get("best_valid"), "best_epoch": metrics.get("best_epoch"),
        "epochs_run": metrics.get("epochs_run"), "wall_seconds": time.time() - started,
        "data_manifest": {"path": str(prepared), "fingerprint": manifest.get("fingerprint"),
                          "counts": manifest.get("counts", {})},
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "config": to_dict(cfg),
    }
    out = Path(args.output or Path("outputs") / (cfg.train.run_name or cfg.name))
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    say("test " + "  ".join(f"{k} {v:.4f}" for k, v in results["test"].items() if k != "count"))
    say(f"wrote {out / 'results.json'}")
    return results
