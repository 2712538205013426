"""Parquet/CSV input for everyone else: an interaction table with user, item and time columns,
plus an optional item table (id, text columns, a category column, an image column). The
interactions are read in pieces by the engines (`ray_read.py`, `streaming_source.py`) with the
row rule of `tabular_checks.py`; this module reads the item table and names the files.

The time column may hold integer seconds (or milliseconds with `time_unit: ms`) or datetimes.
A category cell may be a list or a '|'-separated string.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from data_pipelines.canonical import items_frame
from data_pipelines.config import PrepConfig
from data_pipelines.report import DataError
from data_pipelines.sources.common import CSV_SUFFIXES, file_name, open_input, require
from hm4sr_dist.data.manifest import is_uri


def read_table(path: str | Path) -> pd.DataFrame:
    """A whole (item) table, from a local path or a URI."""
    require(path, "table")
    name = file_name(path)
    suffix = Path(name).suffix
    if suffix not in (".parquet", *CSV_SUFFIXES):
        raise DataError(f"{path}: expected .parquet or .csv")
    with open_input(path, random_access=suffix == ".parquet") as source:
        try:
            if suffix == ".parquet":
                return pd.read_parquet(source)
            return pd.read_csv(source, sep="\t" if ".tsv" in name else ",", dtype=str, keep_default_na=False)
        except Exception as exc:  # noqa: BLE001 - pyarrow/pandas raise many types; name the file
            raise DataError(f"{path}: cannot read table ({exc})") from None


def _columns(df: pd.DataFrame, path: Path, names: list[str]) -> None:
    missing = [c for c in names if c and c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; columns are {list(df.columns)}")


def _categories(cell: object) -> list[str]:
    if cell is None or (isinstance(cell, float) and np.isnan(cell)):
        return []
    if isinstance(cell, (list, tuple, np.ndarray)):
        return [str(c) for c in cell if str(c)]
    return [c.strip() for c in str(cell).split("|") if c.strip()]


def load_item_table(cfg: PrepConfig):
    """The item table of `cfg.items` (ID, text columns joined, categories, image), as items_frame."""
    ipath = cfg.items if is_uri(cfg.items) else Path(cfg.items)
    idf = read_table(ipath)
    _columns(idf, ipath, [cfg.item_id_col, *cfg.text_cols, cfg.category_col, cfg.image_col])
    cats = [_categories(c) for c in idf[cfg.category_col]] if cfg.category_col else [[]] * len(idf)
    texts = [". ".join(str(v) for v in vals if str(v) and str(v) != "nan")
             for vals in zip(*[idf[c] for c in cfg.text_cols])] if cfg.text_cols else [""] * len(idf)
    images = ([None if not v or str(v) == "nan" else str(v) for v in idf[cfg.image_col]]
              if cfg.image_col else [None] * len(idf))
    return items_frame([str(v) for v in idf[cfg.item_id_col]], texts, cats, images)


def files(cfg: PrepConfig) -> list[str | Path]:
    """The interaction and item tables (local paths, or URIs as given)."""
    return [require(p if is_uri(p) else Path(p), "table") for p in (cfg.interactions, cfg.items) if p]
