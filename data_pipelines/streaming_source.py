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

from data_pipelines.config import PrepConfig
from data_pipelines.report import DataError, DropLog
from data_pipelines.sources import load_source
from data_pipelines.sources.common import csv_frames, csv_header, require
from data_pipelines.sources.tabular import _columns, load_item_table
from data_pipelines.sources.tabular_checks import checked_frames

log = logging.getLogger("data_pipelines.streaming")


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
        _columns(pd.DataFrame(columns=csv_header(path)), path, cols)
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
    for df, rows in checked_frames(frames, cfg, path, unit, src.drops):
        src.rows_read = rows + src.drops.counts.get("malformed_line", 0)   # dropped lines were read
        yield df
