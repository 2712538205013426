"""`load_catalog`: the item tables of a prepared folder as the model's `ItemCatalog`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from hm4sr_dist.data.manifest import ManifestError, read_manifest
from hm4sr_dist.model.catalog import ItemCatalog
from hm4sr_dist.model.time import max_bucket_for

DEFAULT_MU = 100.0  # eq. 12; the preparation's default and the paper's value


def _table(prepared_dir: Path, name: str, rows: int) -> torch.Tensor:
    path = prepared_dir / name
    if not path.is_file():
        raise ManifestError(f"{path}: listed in the manifest but missing")
    arr = np.load(path, allow_pickle=False)
    if arr.shape[0] != rows:
        raise ManifestError(f"{path}: {arr.shape[0]} rows, expected n_items + 1 = {rows}")
    return torch.from_numpy(np.ascontiguousarray(arr))


def load_catalog(prepared_dir: str | Path, mu: float | None = None) -> ItemCatalog:
    """Item tables + time axis of a prepared folder.

    Row 0 of every table is the padding item (zeros). `categories` is a float32 0/1 multi-hot.
    `max_interval_bucket` = floor(mu * log2(a_max + 1)) for the largest interval a_max between
    consecutive items of any user's training part (mu defaults to the value the data was prepared
    with, 100 unless changed); `time_origin` = the first timestamp; `n_days` = days spanned + 1.
    A modality the data lacks (e.g. images of MovieLens) is None.
    """
    prepared_dir = Path(prepared_dir)
    manifest = read_manifest(prepared_dir)
    n_items = int(manifest["counts"]["items"])
    rows = n_items + 1
    features = manifest.get("features", {})
    text = _table(prepared_dir, features["text"]["file"], rows).float() if "text" in features else None
    image = _table(prepared_dir, features["image"]["file"], rows).float() if "image" in features else None
    cats = manifest.get("categories")
    categories = _table(prepared_dir, cats["file"], rows).float() if cats else None
    interval = manifest["interval"]
    mu = float(mu if mu is not None else interval.get("mu", DEFAULT_MU))
    time = manifest["time"]
    return ItemCatalog(
        n_items=n_items, text_features=text, image_features=image, categories=categories,
        max_interval_bucket=max_bucket_for(int(interval["max_train_interval_seconds"]), mu),
        time_origin=int(time["min"]), n_days=int(time["n_days"]),
    ).validate()
