"""Raw logs -> prepared folder (shards + item tables + manifest). The CLI and the orchestration.

    python -m data_pipelines.prepare --source movielens --input-dir ../shared/data/ml-100k \
        --out-dir outputs/ml-100k --text-model minilm-offline

Re-running with the same inputs and config is a no-op (the manifest's fingerprint matches and the
shards check out); a changed input file or config field is reported and the folder is rebuilt.
`--force` rebuilds regardless. The folder is built beside the target and swapped in at the end,
so an interrupted run never leaves a half-written folder with a manifest.

    python -m data_pipelines.prepare --verify outputs/prepared/beauty     # (hm4sr-prepare --verify)

reads a prepared folder as training will and says whether it is intact (data_pipelines/verify.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipelines import items as item_tables
from data_pipelines.config import PrepConfig, config_problem
from data_pipelines.preprocess import raw_id_column
from data_pipelines.report import DataError
from data_pipelines.sources import input_files
from hm4sr_dist.data.manifest import (MANIFEST_NAME, SCHEMA_VERSION, SHARD_DIR, DataLocation,
                                      ManifestError, is_uri, read_manifest, sha256_file, verify_shards)

log = logging.getLogger("data_pipelines.prepare")
SECONDS_PER_DAY = 86400


# -- fingerprint: what the output depends on -------------------------------------------------
def describe_inputs(cfg: PrepConfig) -> list[dict]:
    described = []
    for p in input_files(cfg):
        if is_uri(p):   # object storage: hashed through its pyarrow filesystem
            loc = DataLocation(p)
            described.append({"path": str(p), "bytes": loc.size(), "sha256": sha256_file(loc)})
        else:
            described.append({"path": str(Path(p).resolve()), "bytes": Path(p).stat().st_size,
                              "sha256": sha256_file(p)})
    if cfg.image_dir:  # names and sizes of the image folder (hashing every image would be slow)
        listing = sorted((p.name, p.stat().st_size) for p in Path(cfg.image_dir).iterdir() if p.is_file())
        described.append({"path": str(Path(cfg.image_dir).resolve()), "files": len(listing),
                          "listing_sha256": hashlib.sha256(json.dumps(listing).encode()).hexdigest()})
    return described


def fingerprint(inputs: list[dict], cfg: PrepConfig) -> str:
    blob = json.dumps({"schema": SCHEMA_VERSION, "inputs": inputs, "config": cfg.fingerprint_fields()},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def what_changed(old: dict, inputs: list[dict], cfg: PrepConfig) -> list[str]:
    changes = []
    old_inputs = {d["path"]: d for d in old.get("provenance", {}).get("inputs", [])}
    for d in inputs:
        if old_inputs.get(d["path"]) != d:
            changes.append(f"input {d['path']}")
    for key, value in cfg.fingerprint_fields().items():
        if old.get("config", {}).get(key) != value:
            changes.append(f"config {key}: {old.get('config', {}).get(key)!r} -> {value!r}")
    return changes or ["schema or provenance"]


def up_to_date(out: Path | str, fp: str, inputs: list[dict], cfg: PrepConfig) -> dict | None:
    if not DataLocation(out).exists(MANIFEST_NAME):
        return None
    try:
        old = read_manifest(out)
    except ManifestError as exc:
        log.warning("existing %s is unusable (%s): rebuilding", out, exc)
        return None
    if old.get("fingerprint") != fp:
        log.warning("inputs or config changed since %s was prepared: %s; rebuilding", out,
                    "; ".join(what_changed(old, inputs, cfg)))
        return None
    try:
        verify_shards(out, old, check="size")
    except ManifestError as exc:
        log.warning("%s: %s; rebuilding", out, exc)
        return None
    return old


# -- the run ---------------------------------------------------------------------------------
def ensure_ray(cfg: PrepConfig) -> None:
    import ray

    if not ray.is_initialized() and os.environ.get("RAY_ADDRESS"):
        # a cluster (`ray job submit`, RAY_ADDRESS): its own CPUs and object store; Ray refuses both
        if cfg.num_cpus or cfg.memory_budget_mb:
            log.info("num_cpus and memory_budget_mb size a Ray that prepare starts; joining %s as it is",
                     os.environ["RAY_ADDRESS"])
        if not is_uri(cfg.out_dir):
            log.warning("joining the cluster at %s: --out-dir %s must be a path every node sees (a shared "
                        "mount) or a URI: the shard writers run on any node", os.environ["RAY_ADDRESS"],
                        cfg.out_dir)
        ray.init(log_to_driver=False, configure_logging=False)
    elif not ray.is_initialized():
        # the Ray Data pipeline keeps the log in the object store: the budget sizes it (it spills past)
        on_ray = cfg.resolved_engine() == "ray-data"
        store = cfg.memory_budget_mb << 20 if on_ray and cfg.memory_budget_mb else None
        ray.init(num_cpus=cfg.num_cpus or None, include_dashboard=False, log_to_driver=False,
                 configure_logging=False, object_store_memory=store)
    ray.data.DataContext.get_current().enable_progress_bars = cfg.progress
    if not cfg.progress:  # Ray Data logs its progress at INFO when stderr is not a terminal
        logging.getLogger("ray.data").setLevel(logging.WARNING)


def prepare(cfg: PrepConfig) -> dict[str, Any]:
    """Build (or confirm) the prepared folder `cfg.out_dir`; returns its manifest.

    The returned manifest carries `"status"`: "written" or "up_to_date" (not stored on disk).
    The log is prepared as one Ray Data pipeline (`ray_prep.py`), or with `engine="streaming"`
    (the default when a memory budget is given) in passes over local disk (`streaming_prep.py`).
    """
    if problem := config_problem(cfg):
        raise DataError(problem)
    if cfg.resolved_engine() == "ray-data":
        return _prepare(cfg, None)
    from data_pipelines.streaming_prep import remove_spill, spill_folder

    spill = spill_folder(cfg)
    try:
        return _prepare(cfg, spill)
    finally:
        remove_spill(spill)


def _prepare(cfg: PrepConfig, spill: Path | None) -> dict[str, Any]:
    """`prepare`'s work; `spill` is the streaming path's scratch folder (None: on Ray Data)."""
    started = time.time()
    remote = is_uri(cfg.out_dir)          # object storage: built here, shards written there by Ray
    out = cfg.out_dir if remote else Path(cfg.out_dir)
    if remote:
        _refuse_foreign_uri(out)
    else:
        _refuse_foreign(out)
    inputs = describe_inputs(cfg)
    fp = fingerprint(inputs, cfg)
    if not cfg.force and (old := up_to_date(out, fp, inputs, cfg)) is not None:
        log.info("%s is up to date (fingerprint %s): nothing to do", out, fp[:12])
        return {**old, "status": "up_to_date"}
    if not remote:
        _refuse_other_entries(out)

    timings: dict[str, float] = {}
    clock = time.time()
    if spill is None:
        from data_pipelines.ray_prep import prepare_log as ray_prepare_log

        ensure_ray(cfg)
        timings["ray_start"] = time.time() - clock
        clock = time.time()
        data, prep = ray_prepare_log(cfg)  # read + preprocess as one Ray Data pipeline
    else:
        from data_pipelines.streaming_prep import prepare_log

        data, prep = prepare_log(cfg, spill)  # read + preprocess in passes over disk
    timings["read_preprocess"] = time.time() - clock
    if remote:  # the tables and the manifest are built here; the shards go straight to the URI
        build = Path(tempfile.mkdtemp(prefix="hm4sr-prepare-", dir=cfg.spill_dir or None))
        try:
            _retract_manifest(DataLocation(out))
            return _build(cfg, out, build, data, prep, fp, inputs, timings, started)
        finally:
            shutil.rmtree(build, ignore_errors=True)
    build = out.parent / f".{out.name}.building-{os.getpid()}"
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir(parents=True)
    return _build(cfg, out, build, data, prep, fp, inputs, timings, started)


def _build(cfg: PrepConfig, out: Path | str, build: Path, data, prep, fp: str, inputs: list[dict],
           timings: dict[str, float], started: float) -> dict[str, Any]:
    """The folder from the prepared log: tables and features in `build`, shards (in `build`, or
    at the URI `out`), manifest last; then `build` swapped in for `out` (or uploaded to it)."""
    remote = is_uri(out)
    stats: dict[str, int] = {}

    manifest: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "dataset": data.name,
                                "fingerprint": fp, "max_len": cfg.max_len, "features": {}}
    prep.write_users(build / "users.parquet")
    items = item_tables.align_items(data, prep, stats)
    if items is None:     # no metadata: still the raw <-> dense item IDs, which export and serving read
        pq.write_table(pa.table({"item_id": pa.array(np.arange(1, prep.n_items + 1, dtype=np.int64)),
                                 "raw_id": raw_id_column(prep.item_raw)}), build / "items.parquet")
    clock = time.time()
    if items is not None and (cfg.text or cfg.images):  # the feature encoders run on Ray actor pools
        ensure_ray(cfg)
        timings["ray_start"] = timings.get("ray_start", 0.0) + time.time() - clock
    clock = time.time()
    if items is not None:
        items.to_parquet(build / "items.parquet", index=False)
        cats, names = item_tables.category_table(items, data.category_names)
        if names:
            (build / "category_names.json").write_text(json.dumps(names, indent=0))
            manifest["categories"] = {"file": item_tables.save_table(build, "categories.npy", cats),
                                      "n": len(names), "names_file": "category_names.json"}
        if cfg.text:
            table, info = item_tables.text_features(items, cfg, stats)
            manifest["features"]["text"] = {"file": item_tables.save_table(build, "text_features.npy", table),
                                            "width": int(table.shape[1]), **info}
        if cfg.images and item_tables.has_images(items):
            table, info = item_tables.image_features(items, cfg, stats)
            manifest["features"]["image"] = {"file": item_tables.save_table(build, "image_features.npy", table),
                                             "width": int(table.shape[1]), **info}

    timings["features"] = time.time() - clock
    clock = time.time()
    if remote:  # through the URI's filesystem: a URI's query (endpoint, region) must not be re-parsed
        loc = DataLocation(out)
        shards = prep.write_shards(loc.path(SHARD_DIR), cfg.target_shard_bytes, cfg.min_shards, filesystem=loc.fs)
    else:
        shards = prep.write_shards(build / SHARD_DIR, cfg.target_shard_bytes, cfg.min_shards)
    timings["shards"] = time.time() - clock
    tmin, tmax = prep.time_min, prep.time_max
    manifest.update({
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "provenance": {"source": data.source, "inputs": inputs, "versions": _versions()},
        "counts": {"rows_read": data.rows_read, "dropped": dict(data.drops.counts),
                   "drop_examples": data.drops.examples, "items_stats": stats,
                   "users": prep.n_users, "items": prep.n_items, "actions": prep.n_actions,
                   "kcore_rounds": prep.kcore_rounds, "samples": prep.samples},
        "n_categories": manifest.get("categories", {}).get("n", 0),
        "interval": prep.interval_stats(),
        "time": {"min": tmin, "max": tmax, "n_days": (tmax - tmin) // SECONDS_PER_DAY + 1},
        "shards": shards,
        "tables": {"users": "users.parquet", "items": "items.parquet"},
        "config": cfg.fingerprint_fields(),
        "elapsed_s": round(time.time() - started, 2),
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
    })
    if sum(s["actions"] for s in shards) != prep.n_actions or sum(s["users"] for s in shards) != prep.n_users:
        raise RuntimeError(f"{build}: shards hold {sum(s['actions'] for s in shards)} actions, "
                           f"expected {prep.n_actions}")
    (build / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))  # last: marks completion
    if remote:
        _upload(build, DataLocation(out), manifest)
    else:
        _swap_in(build, out)
    return {**manifest, "status": "written"}


PREPARED_ENTRIES = {MANIFEST_NAME, SHARD_DIR, "users.parquet", "items.parquet", "category_names.json"}


def _refuse_foreign(out: Path) -> None:
    """The prepared folder is replaced whole on a rebuild: never one that holds something else (an
    export also has a manifest.json; a user's files may sit beside a prepared set)."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: --prepared-dir exists and is not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    try:
        manifest = json.loads((out / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        manifest = None
    if not (isinstance(manifest, dict) and "schema_version" in manifest and "shards" in manifest):
        raise DataError(f"{out}: --prepared-dir exists, is not empty and holds no prepared data set "
                        f"({MANIFEST_NAME}); it would be replaced whole: choose a new or empty folder")


def _refuse_other_entries(out: Path) -> None:
    """Before a rebuild replaces `out` whole: nothing in it but what a preparation writes."""
    if not out.is_dir():
        return
    others = sorted(e.name for e in out.iterdir()
                    if e.name not in PREPARED_ENTRIES and not e.name.endswith(".npy"))
    if others:
        raise DataError(f"{out}: --prepared-dir holds {', '.join(others[:3])}"
                        f"{' ...' if len(others) > 3 else ''} beside the prepared data set; a rebuild "
                        "replaces the folder whole: move them out or choose another folder")


def _refuse_foreign_uri(out: str) -> None:
    """`_refuse_foreign` for a URI: a manifest there must be a prepared data set's (an export's
    would be overwritten file by file)."""
    loc = DataLocation(out)
    try:
        if not loc.exists(MANIFEST_NAME):
            return
        manifest = json.loads(loc.read_bytes(MANIFEST_NAME))
    except (ManifestError, ValueError) as exc:
        raise DataError(f"{loc.name(MANIFEST_NAME)}: cannot read ({exc})") from None
    if not (isinstance(manifest, dict) and "schema_version" in manifest and "shards" in manifest):
        raise DataError(f"{out}: holds a {MANIFEST_NAME} that is not a prepared data set's; choose another URI")


def _retract_manifest(loc: DataLocation) -> None:
    """A rebuild at a URI overwrites files in place: its old manifest goes first, so no reader
    takes the half-written folder for the old one (a manifest there means a complete folder)."""
    try:
        if loc.exists(MANIFEST_NAME):
            loc.fs.delete_file(loc.path(MANIFEST_NAME))
    except (ManifestError, OSError) as exc:
        raise DataError(f"{loc.name(MANIFEST_NAME)}: cannot remove the old manifest before a rebuild ({exc})") from None


def _upload(build: Path, loc: DataLocation, manifest: dict) -> None:
    """The tables built here to the URI (the shards are there already), checked, manifest last."""
    try:
        for path in sorted(build.iterdir()):
            if path.is_file() and path.name != MANIFEST_NAME:
                loc.write_bytes(path.read_bytes(), path.name)
        verify_shards(loc, manifest, check="size")
        loc.write_bytes((build / MANIFEST_NAME).read_bytes(), MANIFEST_NAME)
    except (OSError, ManifestError) as exc:
        raise DataError(f"{loc.name()}: cannot upload the prepared tables ({exc})") from None


def _swap_in(build: Path, out: Path) -> None:
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.replace(old)
    build.replace(out)
    shutil.rmtree(old, ignore_errors=True)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    found = {}
    for pkg in ("hm4sr-dist", "ray", "torch", "transformers", "timm", "webdataset", "pyarrow"):
        try:
            found[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return found


# -- summary and CLI -------------------------------------------------------------------------
def summary(m: dict) -> str:
    c = m["counts"]
    lines = [f"prepared {m['dataset']!r}: {m['status']}",
             f"  rows read              {c['rows_read']:>12,}"]
    for reason, n in sorted(c["dropped"].items()):
        lines.append(f"  dropped: {reason:<22}{n:>9,}")
        for example in c.get("drop_examples", {}).get(reason, [])[:2]:
            lines.append(f"      e.g. {example}")
    for key, n in sorted(c.get("items_stats", {}).items()):
        lines.append(f"  items: {key:<24}{n:>9,}")
    lines += [f"  kept users             {c['users']:>12,}",
              f"  kept items             {c['items']:>12,}",
              f"  kept actions           {c['actions']:>12,}",
              "  samples                " + ", ".join(f"{k} {v:,}" for k, v in c["samples"].items()),
              f"  categories             {m.get('n_categories', 0):>12,}",
              "  features               " + (", ".join(f"{k} {v['width']}-d ({v.get('source') or v['model']})"
                                                   for k, v in m["features"].items()) or "none"),
              f"  max interval bucket    {m['interval']['max_train_bucket']:>12,} (mu={m['interval']['mu']})",
              f"  shards written         {len(m['shards']):>12,} "
              f"({sum(s['bytes'] for s in m['shards']):,} bytes)"]
    if m["status"] == "written":
        lines.append(f"  elapsed                {m['elapsed_s']:>11.1f}s "
                     f"({c['actions'] / max(m['elapsed_s'], 1e-9):,.0f} actions/s; "
                     + ", ".join(f"{k} {v:.1f}s" for k, v in m["timings_s"].items()) + ")")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_pipelines.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(PrepConfig):
        flag = "--" + f.name.replace("_", "-")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = (None if required else
                   f.default if f.default is not dataclasses.MISSING else f.default_factory())
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif f.type in ("list", list):
            parser.add_argument(flag, nargs="*", default=default)
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            parser.add_argument(flag, type=kind, default=default, required=required)
    parser.add_argument("--log-level", default="INFO")
    return parser


def verify_main(argv: list[str]) -> int:
    """`--verify DIR`: check a prepared folder (data_pipelines/verify.py); exit 0 or 2."""
    from hm4sr_dist.data.records import ShardError
    from data_pipelines.verify import verify_folder

    parser = argparse.ArgumentParser(prog="python -m data_pipelines.prepare --verify")
    parser.add_argument("--verify", metavar="DIR", required=True, help="a prepared folder to check")
    try:
        print(verify_folder(parser.parse_args(argv).verify))
    except (ManifestError, ShardError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a == "--verify" or a.startswith("--verify=") for a in argv):
        return verify_main(argv)
    args = vars(build_parser().parse_args(argv))
    logging.basicConfig(level=args.pop("log_level"), format="%(levelname)s %(name)s: %(message)s")
    cfg = PrepConfig(**args)
    try:
        manifest = prepare(cfg)
    except (DataError, ManifestError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
