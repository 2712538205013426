"""`load_catalog`: the item tables of a prepared folder as the model's `ItemCatalog`.

Feature tables (`text_features.npy`, `image_features.npy`; float16 since preparation writes them
so, float32 in folders prepared before) are memory-mapped read-only, never read into memory: all
workers of a node share one page-cache copy and the model upcasts them block by block
(`hm4sr_dist.model.items`). Mapping needs a local file (a node-local disk or a shared mount);
for a folder on object storage, stage the `.npy` files on the node first (not done here).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from hm4sr_dist.data.manifest import ManifestError, local_folder, read_manifest
from hm4sr_dist.model.catalog import ItemCatalog
from hm4sr_dist.model.feature_file import FeatureTableError, open_feature_table
from hm4sr_dist.model.time import max_bucket_for

DEFAULT_MU = 100.0  # eq. 12; the preparation's default and the paper's value


def map_feature_table(path: str | Path, rows: int, width: int | None = None,
                      dtype: str | None = None) -> torch.Tensor:
    """`hm4sr_dist.model.feature_file.open_feature_table`, its errors as ManifestError (a user error
    of the prepared folder, naming the file)."""
    try:
        return open_feature_table(path, rows, width, dtype)
    except FeatureTableError as exc:
        raise ManifestError(str(exc)) from exc


def _table(prepared_dir: Path, name: str, rows: int) -> torch.Tensor:
    path = prepared_dir / name
    if not path.is_file():
        raise ManifestError(f"{path}: listed in the manifest but missing")
    arr = np.load(path, allow_pickle=False)
    if arr.shape[0] != rows:
        raise ManifestError(f"{path}: {arr.shape[0]} rows, expected n_items + 1 = {rows}")
    return torch.from_numpy(np.ascontiguousarray(arr))


def load_catalog(prepared_dir: str | Path, mu: float | None = None) -> ItemCatalog:
    """Item tables + time axis of a prepared folder (a local path).

    Row 0 of every table is the padding item (zeros). Text/image features are memory-mapped as
    stored (float16, or float32 for older folders; `catalog.feature_files` names the files).
    `categories` is a float32 0/1 multi-hot, in memory.
    `max_interval_bucket` = floor(mu * log2(a_max + 1)) for the largest interval a_max between
    consecutive items of any user's training part (mu defaults to the value the data was prepared
    with, 100 unless changed); `time_origin` = the first timestamp; `n_days` = days spanned + 1.
    A modality the data lacks (e.g. images of MovieLens) is None.
    """
    prepared_dir = local_folder(prepared_dir)  # a URI's manifest + tables staged on this node
    manifest = read_manifest(prepared_dir)
    n_items = int(manifest["counts"]["items"])
    rows = n_items + 1
    features = manifest.get("features", {})
    tables, files = {}, {}
    for m in ("text", "image"):
        entry = features.get(m)
        if entry is None:
            tables[m] = None
            continue
        path = prepared_dir / entry["file"]
        tables[m] = map_feature_table(path, rows, entry.get("width"), entry.get("dtype"))
        files[m] = str(path)
    cats = manifest.get("categories")
    categories = _table(prepared_dir, cats["file"], rows).float() if cats else None
    interval = manifest["interval"]
    mu = float(mu if mu is not None else interval.get("mu", DEFAULT_MU))
    time = manifest["time"]
    return ItemCatalog(
        n_items=n_items, text_features=tables["text"], image_features=tables["image"],
        categories=categories, feature_files=files,
        max_interval_bucket=max_bucket_for(int(interval["max_train_interval_seconds"]), mu),
        time_origin=int(time["min"]), n_days=int(time["n_days"]),
    ).validate()
