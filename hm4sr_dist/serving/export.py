"""Export a finished run for serving, and load the export back: no Ray, no DeepSpeed.

A run folder points at things that do not travel: a Ray Train checkpoint (a pickled `model.pt`),
a prepared data folder with shards the scorer never reads, a config that only this code version
parses in full. `export_run` copies out exactly what scoring needs, into one folder:

    model.safetensors     the best-validation weights (the checkpoint's `model.pt`: plain fp32, the
                          whole ID table also for vocab_parallel runs); safetensors, so loading
                          runs no pickled code
    config.json           the resolved config tree of the run (results.json `config`)
    items.parquet         raw <-> dense item IDs (dense 1..n_items; 0 is padding), copied
    <m>_features.npy      the frozen feature tables of the content modalities the model uses, as
                          the manifest names them (categories are not copied: CP is training-only)
    user_side.pt2         the user side (histories -> sequence vectors, eq. 6-18) as a torch.export
                          program, dynamic in batch and length (`user_program.py`; not with
                          --no-program)
    item_vectors.npy      (n_items + 1, M*d) float32 item representations the program reads and
                          eq. 19 scores against (row 0: padding)
    manifest.json         format version, run identity, code fingerprint, the data's fingerprint,
                          what the model needs of the data (max_len, interval mu and largest
                          bucket, time axis, n_items) and the sha256 + bytes of every other file

The folder is built beside its destination and renamed into place, so it is complete or absent.
`load_export` checks every file against the manifest (sizes always, sha256 with `verify=True`),
rebuilds the `HM4SR` of config.json on the exported tables and loads the weights into it. The
heads only training uses (CP's `cp_head.*`, PCL's `placeholders.*`) stay in model.safetensors but
are not built: scoring never calls them (`HM4SR.forward` without `augment` / `categories`).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import shutil
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from hm4sr_dist.config import ConfigError, ModelConfig, from_dict
from hm4sr_dist.data.manifest import (MANIFEST_NAME, DataLocation, ManifestError, local_folder,
                                      read_manifest, sha256_file)
from hm4sr_dist.model.catalog import ItemCatalog
from hm4sr_dist.model.feature_file import FeatureTableError, open_feature_table
from hm4sr_dist.model.hm4sr import HM4SR
from hm4sr_dist.model.time import max_bucket_for
from hm4sr_dist.run_folder import RESULTS_FILE, STOPPED_FILE, RunFolderError, read_results
from hm4sr_dist.serving.user_program import write_user_program

FORMAT = "hm4sr-export"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
ITEMS_FILE = "items.parquet"
MANIFEST_FILE = "manifest.json"
CHECKPOINT_WEIGHTS = "model.pt"           # what the final Ray Train checkpoint holds (train/worker.py)
CONTENT_MODALITIES = ("text", "image")
TRAINING_ONLY = ("cp_head.", "placeholders.")   # CP (eq. 21) and PCL (eq. 24) heads: never scored
MANIFEST_KEYS = ("format", "format_version", "identity", "code", "data", "max_len", "interval", "time",
                 "n_items", "modalities", "features", "files")


class ExportError(ValueError):
    """A run that cannot be exported, or an export that cannot be loaded; names the file."""


# -- the item ID map ------------------------------------------------------------------------------

class ItemIdMap:
    """Raw item IDs (as items.parquet spells them, strings) <-> dense IDs 1..n_items.

    `raw_ids[i]` is the raw ID of dense item i + 1. A raw ID may be given as a str or an int (the
    int's decimal spelling: raw IDs read from text files, e.g. MovieLens' "242", are stored as
    strings); anything else is unknown.
    """

    def __init__(self, raw_ids: Sequence[str], source: str = "item ID map"):
        self.raw_ids = [str(r) for r in raw_ids]
        self.source = source
        self._dense = {raw: i + 1 for i, raw in enumerate(self.raw_ids)}
        if len(self._dense) != len(self.raw_ids):
            seen: set[str] = set()
            twice = next(r for r in self.raw_ids if r in seen or seen.add(r))
            raise ExportError(f"{source}: raw item ID {twice!r} appears more than once")

    @classmethod
    def from_parquet(cls, path: str | Path, n_items: int | None = None) -> "ItemIdMap":
        """items.parquet's `item_id` (dense) and `raw_id` columns; the dense IDs must be exactly
        1..n_items (n_items from the manifest when given), so every dense ID has one raw ID."""
        import pyarrow.parquet as pq

        path = Path(path)
        try:
            table = pq.read_table(path, columns=["item_id", "raw_id"])
        except (OSError, ValueError, KeyError) as exc:       # pyarrow: ArrowInvalid is a ValueError
            raise ExportError(f"{path}: cannot read item_id and raw_id ({exc})") from None
        dense = np.asarray(table.column("item_id").to_numpy(), dtype=np.int64)
        raw = table.column("raw_id").to_pylist()
        n = len(dense) if n_items is None else int(n_items)
        order = np.argsort(dense, kind="stable")
        if len(dense) != n or not np.array_equal(dense[order], np.arange(1, n + 1)):
            raise ExportError(f"{path}: item_id must be exactly 1..{n} (the manifest's n_items), "
                              f"got {len(dense)} rows, {int(dense.min()) if len(dense) else '-'}.."
                              f"{int(dense.max()) if len(dense) else '-'}")
        if any(r is None for r in raw):
            raise ExportError(f"{path}: raw_id has empty values")
        return cls([raw[i] for i in order], source=str(path))

    @property
    def n_items(self) -> int:
        return len(self.raw_ids)

    @staticmethod
    def key(raw: Any) -> str | None:
        """The map's spelling of `raw`: a str as is, an int (not a bool) in decimal; else None."""
        if isinstance(raw, str):
            return raw
        if isinstance(raw, (int, np.integer)) and not isinstance(raw, (bool, np.bool_)):
            return str(int(raw))
        return None

    def dense(self, raw: Any) -> int | None:
        """Dense ID of a raw ID, None when unknown."""
        key = self.key(raw)
        return None if key is None else self._dense.get(key)

    def raw(self, dense: int) -> str:
        """Raw ID of dense item `dense` (1..n_items)."""
        if not 1 <= int(dense) <= self.n_items:
            raise IndexError(f"dense item ID {dense} outside 1..{self.n_items}")
        return self.raw_ids[int(dense) - 1]


# -- export -----------------------------------------------------------------------------------

def export_run(run_dir: str | Path, out_dir: str | Path, program: bool = True) -> dict:
    """Export the run in `run_dir` (a run folder with results.json) to `out_dir`; returns the
    export's manifest. `program`: also the user side as a torch.export program with the item
    vectors it scores against (`user_program.py`). An existing export at `out_dir` is replaced;
    any other existing, non-empty folder is refused (it is not ours to delete)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    results = _read_run(run_dir)
    config = results["config"]
    model_cfg = model_config(config, f"{run_dir / RESULTS_FILE}: config")
    weights = _checkpoint_weights(results, run_dir / RESULTS_FILE)
    prepared, data_manifest = _prepared_data(results, config, run_dir / RESULTS_FILE)
    _refuse_foreign(out_dir)
    clear_stale_tmp(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _save_weights(weights, tmp / WEIGHTS_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str))
        _copy(prepared / ITEMS_FILE, tmp / ITEMS_FILE, "the raw <-> dense item ID map; folders prepared "
              "from sequence files before 2026-12-07 have none: prepare again with --force, the "
              "fingerprint stays the same")
        features = _copy_features(prepared, data_manifest, model_cfg, tmp)
        manifest = _export_manifest(results, model_cfg, prepared, data_manifest, features, tmp)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
        loaded = load_export(tmp, verify=False)   # the weights fit the config's model: fail before publishing
        if program:
            manifest["program"] = write_user_program(loaded.model, tmp)
            manifest["files"] = _file_entries(tmp)
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def model_config(config: Any, where: str) -> ModelConfig:
    """The `model` section of a resolved config tree as a `ModelConfig` (only that section: the
    training sections of a run trained by other code need not parse for its model to load)."""
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ExportError(f"{where}: no 'model' section")
    try:
        cfg = from_dict(ModelConfig, config["model"], "model")
    except ConfigError as exc:
        raise ExportError(f"{where}: {exc}") from None
    if cfg.hidden_size % cfg.n_heads:
        raise ExportError(f"{where}: model.hidden_size {cfg.hidden_size} is not a multiple of "
                          f"model.n_heads {cfg.n_heads}")
    return cfg


def _read_run(run_dir: Path) -> dict:
    if not (run_dir / RESULTS_FILE).is_file() and (run_dir / STOPPED_FILE).is_file():
        raise ExportError(f"{run_dir / RESULTS_FILE}: missing; the run was stopped early "
                          f"({STOPPED_FILE}), its weights are not a finished run's")
    try:        # not strict: a run folder from before `identity`/`history` joined the schema exports too
        return read_results(run_dir, strict=False)
    except RunFolderError as exc:
        raise ExportError(str(exc)) from None


def _checkpoint_weights(results: dict, results_path: Path) -> dict[str, torch.Tensor]:
    """The final checkpoint's model.pt: {name: tensor}, the best-validation fp32 weights."""
    checkpoint = results.get("checkpoint")
    if not checkpoint:
        raise ExportError(f"{results_path}: no 'checkpoint' (the final Ray Train checkpoint's path)")
    where = DataLocation(str(checkpoint))
    name = where.name(CHECKPOINT_WEIGHTS)
    try:
        present = where.exists(CHECKPOINT_WEIGHTS)
    except ManifestError as exc:
        raise ExportError(str(exc)) from None
    if not present:
        raise ExportError(f"{name}: missing (the final checkpoint of a finished run holds the "
                          "best-validation weights there)")
    try:
        local = where.local_path(CHECKPOINT_WEIGHTS)
        source = local if local is not None else io.BytesIO(where.read_bytes(CHECKPOINT_WEIGHTS))
        weights = torch.load(source, map_location="cpu", weights_only=True)
    except (ManifestError, OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise ExportError(f"{name}: not a readable weights file ({_first_line(exc)})") from None
    if not isinstance(weights, dict) or not weights or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()):
        raise ExportError(f"{name}: expected a state dict (parameter name -> tensor)")
    return weights


def _prepared_data(results: dict, config: dict, results_path: Path) -> tuple[Path, dict]:
    """The prepared folder the run trained on (a local copy of its manifest and tables) and its
    manifest, refused when it was prepared again since (its dense item IDs may differ)."""
    recorded = results.get("data_manifest") or {}
    path = recorded.get("path") or (config.get("data") or {}).get("prepared_dir")
    if not path:
        raise ExportError(f"{results_path}: no data_manifest.path (the prepared data folder)")
    try:
        prepared = local_folder(path)
        manifest = read_manifest(prepared)
    except ManifestError as exc:
        raise ExportError(str(exc)) from None
    trained, current = recorded.get("fingerprint"), manifest.get("fingerprint")
    if trained and current and trained != current:
        raise ExportError(f"{prepared / MANIFEST_NAME}: fingerprint {current}, but the run was trained on "
                          f"{trained} ({results_path}); the data was prepared again and its item IDs "
                          "may differ")
    for section, key in (("interval", "max_train_interval_seconds"), ("time", "min"), ("time", "max"),
                         ("time", "n_days"), ("counts", "items")):
        if key not in (manifest.get(section) or {}):
            raise ExportError(f"{prepared / MANIFEST_NAME}: missing field {section}.{key}")
    return prepared, manifest


def clear_stale_tmp(out: Path) -> None:
    """Remove the temporaries `.<out>.tmp-<pid>` beside `out` whose process is gone (a killed
    export or recommendation leaves one; a live process may be writing its own)."""
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[1]
        if not pid.isdigit() or process_alive(int(pid)):
            continue
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def process_alive(pid: object) -> bool:
    """A process with this id runs on this host (one we may not signal counts as running)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _refuse_foreign(out_dir: Path) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ExportError(f"{out_dir}: exists and is not a folder")
    if any(out_dir.iterdir()) and _export_format(out_dir) != FORMAT:
        raise ExportError(f"{out_dir}: exists, is not empty and holds no {FORMAT} "
                          f"({MANIFEST_FILE}); refusing to replace it")


def _export_format(folder: Path) -> str | None:
    try:
        return json.loads((folder / MANIFEST_FILE).read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return None


def _save_weights(weights: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors refuses non-contiguous tensors and tensors sharing storage: every tensor is
    written as its own contiguous CPU copy (model.pt's are clones already, so this copies little)."""
    from safetensors.torch import save_file

    seen: set[tuple[int, int]] = set()
    ready = {}
    for name, tensor in weights.items():
        t = tensor.detach().cpu()
        storage = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if storage in seen or not t.is_contiguous() or t.numel() * t.element_size() != storage[1]:
            t = t.contiguous().clone()
        seen.add(storage)
        ready[name] = t
    save_file(ready, str(path), metadata={"format": FORMAT})


def _copy(src: Path, dst: Path, what: str) -> None:
    if not src.is_file():
        raise ExportError(f"{src}: missing ({what}; the prepared folder is incomplete)")
    shutil.copyfile(src, dst)


def _copy_features(prepared: Path, manifest: dict, model_cfg: ModelConfig, tmp: Path) -> dict:
    """Copy the feature table of every content modality the model uses; {m: file, width, dtype}."""
    listed = manifest.get("features") or {}
    out = {}
    for m in model_cfg.modalities:
        if m not in CONTENT_MODALITIES:
            continue
        entry = listed.get(m)
        if not entry or "file" not in entry:
            raise ExportError(f"{prepared / MANIFEST_NAME}: no {m} features, but the run's "
                              f"model.modalities uses {m}")
        name = Path(entry["file"]).name
        _copy(prepared / entry["file"], tmp / name, f"the {m} feature table")
        out[m] = {"file": name, "width": entry.get("width"), "dtype": entry.get("dtype")}
    return out


def _export_manifest(results: dict, model_cfg: ModelConfig, prepared: Path, data: dict, features: dict,
                     tmp: Path) -> dict:
    interval, time = data["interval"], data["time"]
    max_interval = int(interval["max_train_interval_seconds"])
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "identity": results.get("identity"),           # None for a run folder older than the field
        "run": {k: results.get(k) for k in ("dataset", "variant", "seed", "train_run", "checkpoint",
                                            "best_epoch", "best_valid", "test")},
        "code": results.get("code"),
        "data": {"path": str(prepared), "fingerprint": data.get("fingerprint"),
                 "dataset": data.get("dataset")},
        "max_len": model_cfg.max_seq_len,               # the reader's cut (ShardReader max_len)
        "data_max_len": data.get("max_len"),
        # mu the model buckets intervals with (model.interval_scale: load_catalog(mu=...) in the
        # worker) and the largest bucket it was built for; data_mu: the preparation's
        "interval": {"mu": model_cfg.interval_scale, "data_mu": interval.get("mu"),
                     "max_train_interval_seconds": max_interval,
                     "max_bucket": max_bucket_for(max_interval, model_cfg.interval_scale)},
        "time": {"min": int(time["min"]), "max": int(time["max"]), "n_days": int(time["n_days"])},
        "n_items": int(data["counts"]["items"]),
        "modalities": list(model_cfg.modalities),
        "features": features,
        "training_only_weights": list(TRAINING_ONLY),
        "files": _file_entries(tmp),
    }


def _file_entries(folder: Path) -> dict:
    return {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(folder.iterdir()) if p.name != MANIFEST_FILE}


def _publish(tmp: Path, out_dir: Path) -> None:
    """Rename the finished folder into place; a previous export is moved aside first and deleted
    after, so `out_dir` is always a whole export (the old one or the new one) or absent."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# -- load -------------------------------------------------------------------------------------

@dataclass
class LoadedExport:
    """An export, loaded: the eval-mode model on its device, the ID map and the metadata."""

    path: Path
    model: HM4SR
    id_map: ItemIdMap
    manifest: dict
    config: dict

    @property
    def max_len(self) -> int:
        return int(self.manifest["max_len"])

    @property
    def n_items(self) -> int:
        return int(self.manifest["n_items"])

    @property
    def identity(self) -> str | None:
        return self.manifest["identity"]

    @property
    def time_range(self) -> tuple[int, int]:
        """[first, last] timestamp of the data the model was trained on (unix seconds)."""
        return int(self.manifest["time"]["min"]), int(self.manifest["time"]["max"])


def load_export(path: str | Path, device: torch.device | str = "cpu", verify: bool = True) -> LoadedExport:
    """Load an export: every file checked against manifest.json (bytes always, sha256 when
    `verify`), the model built from config.json on the exported feature tables (memory-mapped),
    the weights loaded, the model in eval mode on `device`. Raises ExportError naming the file."""
    path = Path(path)
    manifest = read_export_manifest(path)
    check_files(path, manifest, verify)
    config_path = path / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text())
    except ValueError as exc:
        raise ExportError(f"{config_path}: not valid JSON ({exc})") from None
    model_cfg = model_config(config, str(config_path))
    if list(model_cfg.modalities) != list(manifest["modalities"]):
        raise ExportError(f"{config_path}: model.modalities {model_cfg.modalities} differ from "
                          f"{path / MANIFEST_FILE}'s {manifest['modalities']}")
    catalog = _catalog(path, manifest)
    model = _model(model_cfg, catalog, path / WEIGHTS_FILE)
    id_map = ItemIdMap.from_parquet(path / ITEMS_FILE, catalog.n_items)
    return LoadedExport(path, model.to(device).eval(), id_map, manifest, config)


def read_export_manifest(path: str | Path) -> dict:
    """The export's manifest.json, checked to be this format and version and to hold every key."""
    file = Path(path) / MANIFEST_FILE
    try:
        manifest = json.loads(file.read_text())
    except FileNotFoundError:
        raise ExportError(f"{file}: missing (not an {FORMAT} folder, or an unfinished one)") from None
    except (OSError, ValueError) as exc:
        raise ExportError(f"{file}: cannot be read as JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExportError(f"{file}: not an {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{file}: format_version {manifest.get('format_version')!r}, this code reads "
                          f"{FORMAT_VERSION}")
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    if missing:
        raise ExportError(f"{file}: missing {', '.join(missing)}")
    return manifest


def check_files(path: str | Path, manifest: dict, verify: bool = True) -> None:
    """Every file the manifest lists is there with its bytes (and sha256 when `verify`), and every
    file loading needs is listed. Raises ExportError naming the first file that differs."""
    path = Path(path)
    files = manifest["files"]
    needed = [WEIGHTS_FILE, CONFIG_FILE, ITEMS_FILE] + [f["file"] for f in manifest["features"].values()]
    for name in needed:
        if name not in files:
            raise ExportError(f"{path / MANIFEST_FILE}: does not list {name}")
    for name, entry in files.items():
        if Path(name).name != name:
            raise ExportError(f"{path / MANIFEST_FILE}: file name {name!r} is not a plain name")
        file = path / name
        if not file.is_file():
            raise ExportError(f"{file}: listed in {MANIFEST_FILE} but missing")
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise ExportError(f"{file}: {size} bytes, {MANIFEST_FILE} says {entry['bytes']} "
                              "(truncated or replaced)")
        if verify and sha256_file(file) != entry["sha256"]:
            raise ExportError(f"{file}: sha256 differs from {MANIFEST_FILE} (corrupt or modified)")


def _catalog(path: Path, manifest: dict) -> ItemCatalog:
    """The `ItemCatalog` the model was trained with, from the export alone: the feature tables
    mapped read-only, the time axis and the largest interval bucket from the manifest."""
    n_items = int(manifest["n_items"])
    tables, files = {}, {}
    for m, entry in manifest["features"].items():
        file = path / entry["file"]
        try:
            tables[m] = open_feature_table(file, n_items + 1, entry.get("width"), entry.get("dtype"))
        except FeatureTableError as exc:
            raise ExportError(str(exc)) from None
        files[m] = str(file)
    time, interval = manifest["time"], manifest["interval"]
    catalog = ItemCatalog(n_items=n_items, text_features=tables.get("text"),
                          image_features=tables.get("image"), feature_files=files,
                          max_interval_bucket=int(interval["max_bucket"]), time_origin=int(time["min"]),
                          n_days=int(time["n_days"]))
    try:
        return catalog.validate()
    except ValueError as exc:
        raise ExportError(f"{path}: {exc}") from None


def _model(model_cfg: ModelConfig, catalog: ItemCatalog, weights_file: Path) -> HM4SR:
    """The scoring model (no CP or PCL head) with the exported weights; the caller's RNG is left
    as it was (building draws the initial weights the load then replaces)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        weights = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ExportError(f"{weights_file}: not a readable safetensors file ({exc})") from None
    state = {k: v for k, v in weights.items() if not k.startswith(TRAINING_ONLY)}
    with torch.random.fork_rng(devices=[]):
        model = HM4SR(model_cfg, catalog)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:                    # a shape that does not fit the config
        raise ExportError(f"{weights_file}: does not fit config.json's model "
                          f"({_first_line(exc, skip_heading=True)})") from None
    if result.missing_keys or result.unexpected_keys:
        raise ExportError(f"{weights_file}: does not fit config.json's model: missing "
                          f"{_names(result.missing_keys)}, unexpected {_names(result.unexpected_keys)}")
    return model


def _first_line(exc: BaseException, skip_heading: bool = False) -> str:
    """One line of an exception's message (`skip_heading`: the line after load_state_dict's
    "Error(s) in loading state_dict for ..." heading, which names the tensor)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if skip_heading and len(lines) > 1:
        return lines[1]
    return lines[0] if lines else type(exc).__name__


def _names(keys: Iterable[str], limit: int = 5) -> str:
    keys = list(keys)
    if not keys:
        return "none"
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


# -- command line -----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hm4sr-export",
        description="Export a finished run (its run folder, with results.json) for serving: the "
                    "best-validation weights as safetensors, the config, the item ID map and the "
                    "feature tables, with a checksummed manifest. Needs neither Ray nor DeepSpeed.")
    parser.add_argument("run", help="the run folder (holds results.json)")
    parser.add_argument("--out", required=True, help="the export folder to write (replaced if it is "
                        "an earlier export)")
    parser.add_argument("--no-program", action="store_true",
                        help="skip the torch.export program of the user side and item_vectors.npy "
                        "(docs/serving.md)")
    parser.add_argument("--no-tracking", action="store_true",
                        help="do not attach the export to the run's MLflow run (docs/tracking.md)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        manifest = export_run(args.run, args.out, program=not args.no_program)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    total = sum(f["bytes"] for f in manifest["files"].values())
    print(f"wrote {args.out}: run {manifest['identity']}, {manifest['n_items']} items, modalities "
          f"{','.join(manifest['modalities'])}, {len(manifest['files']) + 1} files, {total} bytes")
    if not args.no_tracking:
        from hm4sr_dist.tracking import TrackingError
        from hm4sr_dist.train.tracking_run import attach_export

        try:
            run_id = attach_export(_read_run(Path(args.run)), Path(args.out))
        except TrackingError as exc:
            print(f"warning: the export is written, but not attached to its MLflow run: {exc}", file=sys.stderr)
        else:
            if run_id:
                print(f"attached to MLflow run {run_id} (artifacts export/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
