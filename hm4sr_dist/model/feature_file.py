"""Frozen item-feature tables (`.npy`) mapped read-only: the model's view of them, used when the
data layer loads a catalogue (`hm4sr_dist.data.catalog`, which turns a FeatureTableError into a
ManifestError) and when a pickled `FrozenFeatures` is mapped again in another process."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

FEATURE_DTYPES = ("float16", "float32")


class FeatureTableError(ValueError):
    """A feature table that cannot be mapped as the manifest describes it; names the file."""


def open_feature_table(path: str | Path, rows: int, width: int | None = None,
                       dtype: str | None = None) -> torch.Tensor:
    """(rows, width) float16/float32 tensor viewing the .npy file `path` through a read-only mmap.

    Raises FeatureTableError naming the file when it is not a 2-D float16/float32 C-order array of
    `rows` rows (and `width` columns / `dtype`, when given). Writing into the tensor would fault:
    the table is frozen.
    """
    path = Path(path)
    if not path.is_file():
        raise FeatureTableError(f"{path}: listed in the manifest but missing")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise FeatureTableError(f"{path}: not a readable .npy table ({exc})") from exc
    expected = f"({rows}, {width if width is not None else 'w'})"
    if arr.ndim != 2 or arr.shape[0] != rows or (width is not None and arr.shape[1] != width):
        raise FeatureTableError(f"{path}: shape {arr.shape}, expected {expected} (n_items + 1 rows)")
    if arr.dtype.name not in FEATURE_DTYPES or not arr.dtype.isnative:
        raise FeatureTableError(f"{path}: dtype {arr.dtype.str}, expected native float16 or float32")
    if dtype is not None and arr.dtype.name != dtype:
        raise FeatureTableError(f"{path}: dtype {arr.dtype.name}, the manifest says {dtype}")
    if not arr.flags.c_contiguous:
        raise FeatureTableError(f"{path}: Fortran-ordered table; rewrite it in C order")
    with warnings.catch_warnings():   # read-only on purpose: torch warns about non-writable arrays
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(arr)
