"""Canonical interactions in chunks, for the streaming preparation (`streaming_prep.py`).

`tabular` Parquet/CSV logs are read in record batches and never held whole; every row gets the
same checks, drops and drop examples as `sources/tabular.py` (a vectorised fast path accepts only
values the row rule would accept unchanged; any other row goes through the row rule itself).
The other sources have no streaming reader: they are loaded whole by their adapter and then cut
into chunks (their raw files are small: the Amazon 5-core dumps, MovieLens, sequence files).

Each chunk is DataFrame[user: str, item: str, timestamp: int64, seq: int64], where `seq` is the
row's position among the valid rows (input order, which decides duplicates and time ties).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipelines.canonical import TimestampCheck
from data_pipelines.config import PrepConfig
from data_pipelines.report import DataError, DropLog
from data_pipelines.sources import load_source
from data_pipelines.sources.common import csv_frames, require
from data_pipelines.sources.tabular import _columns, load_item_table

log = logging.getLogger("data_pipelines.streaming")
DIGITS = r"[0-9]{1,15}"  # whole seconds/ms parsed exactly by int() and by astype(int64)


@dataclass
class ChunkedSource:
    """What `load_source` gives, minus the interactions frame: those come from `chunks()`."""

    source: str
    name: str
    items: pd.DataFrame | None
    inputs: list[Path]
    drops: DropLog
    estimated_rows: int              # for sizing the buckets (an upper estimate for CSV)
    category_names: list[str] = field(default_factory=list)
    rows_read: int = 0               # final once chunks() is exhausted
    _frames: Callable[[int], Iterator[pd.DataFrame]] | None = None

    def chunks(self, chunk_rows: int) -> Iterator[pd.DataFrame]:
        seq = 0
        for df in self._frames(chunk_rows):
            df["seq"] = np.arange(seq, seq + len(df), dtype=np.int64)
            seq += len(df)
            yield df


def open_source(cfg: PrepConfig) -> ChunkedSource:
    if cfg.source == "tabular":
        return _tabular(cfg)
    data = load_source(cfg)  # no streaming reader for this format: whole, then cut
    log.warning("source %r has no streaming reader: its log is read whole (%d rows), then "
                "prepared in streaming passes", cfg.source, len(data.interactions))
    frame = data.interactions.reset_index(drop=True)
    src = ChunkedSource(data.source, data.name, data.items, data.inputs, data.drops, len(frame),
                        data.category_names, data.rows_read)
    src._frames = lambda rows: (frame.iloc[lo:lo + rows].reset_index(drop=True)
                                for lo in range(0, len(frame), rows))
    return src


# -- tabular ---------------------------------------------------------------------------------
def _tabular(cfg: PrepConfig) -> ChunkedSource:
    path = require(Path(cfg.interactions), "table")
    unit = {"s": 1.0, "ms": 1000.0}.get(cfg.time_unit)
    if unit is None:
        raise DataError(f"time_unit: expected 's' or 'ms', got {cfg.time_unit!r}")
    drops = DropLog(strict=cfg.strict)
    cols = [cfg.user_col, cfg.item_col, cfg.time_col]
    if path.suffix == ".parquet":
        try:  # no pre-buffering: its read cache keeps every column chunk read (~15 B/row)
            meta = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
        except Exception as exc:  # noqa: BLE001 - name the file whatever pyarrow raised
            raise DataError(f"{path}: cannot read table ({exc})") from None
        _columns(pd.DataFrame(columns=meta.schema_arrow.names), path, cols)
        estimated = meta.metadata.num_rows
        def frames(rows):
            return (pa.Table.from_batches([b]).to_pandas()
                    for b in meta.iter_batches(batch_size=rows, columns=cols))
    elif path.suffix in (".csv", ".gz", ".tsv"):
        sep = "\t" if ".tsv" in path.name else ","
        try:
            head = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, nrows=0)
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"{path}: cannot read table ({exc})") from None
        _columns(head, path, cols)
        estimated = max(1, path.stat().st_size // 12)  # 12 bytes: about the shortest real line
        def frames(rows):
            return (chunk[cols] for chunk in csv_frames(path, drops, chunksize=rows))
    else:
        raise DataError(f"{path}: expected .parquet or .csv")
    item_table, inputs = None, [path]
    if cfg.items:
        item_table = load_item_table(cfg)
        inputs.append(Path(cfg.items))
    src = ChunkedSource("tabular", cfg.name or path.stem, item_table, inputs, drops, estimated)
    src._frames = lambda rows: _checked_chunks(src, frames(rows), cfg, path, unit)
    return src


def _checked_chunks(src: ChunkedSource, frames, cfg: PrepConfig, path: Path,
                    unit: float) -> Iterator[pd.DataFrame]:
    check = TimestampCheck(src.drops, cfg.max_future_seconds, unit)
    row0 = 0
    for df in frames:
        times = df[cfg.time_col]
        chk = check
        if pd.api.types.is_datetime64_any_dtype(times):  # as tabular.load: datetimes -> seconds
            times = times.map(lambda t: None if pd.isna(t) else int(pd.Timestamp(t).timestamp()))
            chk = TimestampCheck(src.drops, cfg.max_future_seconds)
        users, ok_u = _fast_ids(df[cfg.user_col])
        items, ok_i = _fast_ids(df[cfg.item_col])
        stamps, ok_t = _fast_times(times, chk)
        ok = ok_u & ok_i & ok_t
        if not ok.all():  # the row rule of tabular.load, in row order, for every other row
            u_raw, i_raw, t_raw = (df[cfg.user_col].to_numpy(object), df[cfg.item_col].to_numpy(object),
                                   times.to_numpy(object))
            keep = ok.copy()
            for r in np.flatnonzero(~ok):
                u, i, t = u_raw[r], i_raw[r], t_raw[r]
                where = f"{path}:row {row0 + r + 1}"
                if u is None or i is None or str(u) == "" or str(i) == "":
                    src.drops.drop("missing_field", where, f"empty {cfg.user_col!r} or {cfg.item_col!r}")
                    continue
                ts = chk(t, where, cfg.time_col)
                if ts is not None:
                    users[r], items[r], stamps[r], keep[r] = str(u), str(i), ts, True
            users, items, stamps = users[keep], items[keep], stamps[keep]
        row0 += len(df)
        src.rows_read = row0 + src.drops.counts.get("malformed_line", 0)   # dropped lines were read
        yield pd.DataFrame({"user": users, "item": items, "timestamp": stamps.astype(np.int64)})


def _fast_ids(col: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(str values, mask of rows whose value is a non-empty str or an int: kept as str(v))."""
    if pd.api.types.is_integer_dtype(col.dtype):
        return col.astype(str).to_numpy(object), np.ones(len(col), dtype=bool)
    values = col.to_numpy(object)
    ok = np.fromiter((type(v) is str and v != "" for v in values), dtype=bool, count=len(values))
    return values.copy(), ok


def _fast_times(col: pd.Series, check: TimestampCheck) -> tuple[np.ndarray, np.ndarray]:
    """(int64 seconds, mask of rows the row check would accept with exactly that value)."""
    out = np.zeros(len(col), dtype=np.int64)
    if pd.api.types.is_integer_dtype(col.dtype) and not col.hasnans:  # Int64 with <NA>: row check
        raw = col.to_numpy(np.int64)
        out = raw if check.unit == 1.0 else (raw / check.unit).astype(np.int64)
    elif pd.api.types.is_string_dtype(col.dtype) or col.dtype == object:
        text = col.astype(object).where(col.map(type) == str, "")  # non-str -> the row check
        digits = text.str.fullmatch(DIGITS).fillna(False).to_numpy(bool)
        raw = np.zeros(len(col), dtype=np.int64)
        raw[digits] = text[digits].astype(np.int64).to_numpy()
        out = raw if check.unit == 1.0 else (raw / check.unit).astype(np.int64)
        return out, digits & (out >= 0) & (out <= check.max_ts)
    else:
        return out, np.zeros(len(col), dtype=bool)
    return out, (out >= 0) & (out <= check.max_ts)
