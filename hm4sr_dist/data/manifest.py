"""The prepared-data manifest: what `data_pipelines.prepare` wrote and how to check it.

A prepared folder holds `manifest.json`, `shards/shard-NNNNN.tar` (WebDataset tars, one sample
per user) and item tables (`*.npy`, `items.parquet`). The manifest is written last, so its
presence means the folder is complete; every shard is listed with its sha256, size and counts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_DIR = "shards"


class ManifestError(ValueError):
    """The manifest is missing, malformed, or does not match the files beside it."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(prepared_dir: str | Path) -> dict[str, Any]:
    """Load and sanity-check `prepared_dir/manifest.json`."""
    path = Path(prepared_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path}: no manifest (was `python -m data_pipelines.prepare` run, "
                            "and did it finish?)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: not valid JSON (line {exc.lineno}): {exc.msg}") from None
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ManifestError(f"{path}: schema_version {version!r}, this reader understands "
                            f"{SCHEMA_VERSION}; re-run the preparation")
    for key in ("counts", "shards", "max_len", "time", "interval"):
        if key not in manifest:
            raise ManifestError(f"{path}: missing field {key!r}")
    return manifest


def shard_path(prepared_dir: str | Path, entry: dict[str, Any]) -> Path:
    return Path(prepared_dir) / SHARD_DIR / entry["file"]


def verify_shards(prepared_dir: str | Path, manifest: dict[str, Any] | None = None,
                  check: str = "sha256", files: list[str] | None = None) -> None:
    """Raise ManifestError naming the first shard whose size or sha256 differs from the manifest.

    `check`: "sha256" (reads every byte), "size" (stat only) or "none". `files` limits the check
    to some shards (a rank checks only its own).
    """
    if check == "none":
        return
    if check not in ("size", "sha256"):
        raise ValueError(f"check: expected 'sha256', 'size' or 'none', got {check!r}")
    manifest = manifest or read_manifest(prepared_dir)
    for entry in manifest["shards"]:
        if files is not None and entry["file"] not in files:
            continue
        path = shard_path(prepared_dir, entry)
        if not path.is_file():
            raise ManifestError(f"shard {path}: listed in the manifest but missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise ManifestError(f"shard {path}: {size} bytes, the manifest says {entry['bytes']} "
                                "(truncated or replaced?)")
        if check == "sha256" and sha256_file(path) != entry["sha256"]:
            raise ManifestError(f"shard {path}: sha256 differs from the manifest (corrupt or replaced)")
