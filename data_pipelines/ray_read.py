"""Reading raw logs as a Ray Dataset of canonical rows, for the Ray Data preparation (`ray_prep.py`).

The input is cut into *parts* listed in input order: a run of Parquet row groups (~1M rows), a
whole CSV file, or (sequence, MovieLens, Amazon) one task that runs the source's own adapter, which
yields the log in frames as it parses it (`sources.read_source`), so the task holds one frame and
the item table, never the whole log.
Each part is read by one Ray task (`map_batches` over the part indices, a generator of blocks), so
a cluster reads parts in parallel. Every row gets `seq` = (part << 40) + its index among the
part's valid rows: monotone in input order, which decides duplicates and time ties downstream.

Drops are counted per part with the adapters' own rules (`DropLog`, `file:row`/`file:line`
examples) and sent with the part's rows read to one `ReadReport` actor; `merged_report` adds them
up in part order, which is the order a sequential read counts them in.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from data_pipelines.config import PrepConfig
from data_pipelines.report import DataError, DropLog
from data_pipelines.sources import read_source
from data_pipelines.sources.common import CSV_SUFFIXES, csv_frames, csv_header, file_name, open_input, require
from data_pipelines.sources.tabular import _columns
from data_pipelines.sources.tabular_checks import checked_frames
from hm4sr_dist.data.manifest import DataLocation, is_uri

PART_ROWS = 1 << 20          # Parquet row groups are joined into parts of at least this many rows
BLOCK_ROWS = 1 << 18         # rows per block a read task yields
SEQ_SHIFT = 40               # seq = (part << 40) + row: 2^40 rows per part, 2^23 parts
ROW_SCHEMA = pa.schema([("user", pa.string()), ("item", pa.string()), ("timestamp", pa.int64()),
                        ("seq", pa.int64()), ("bucket", pa.int64())])


@ray.remote(num_cpus=0)
class ReadReport:
    """What each part's task counted (rows read, drops; the adapter's item table and name for a
    whole-source part), keyed by part: a retried task overwrites its own entry."""

    def __init__(self):
        self.parts: dict[int, dict] = {}

    def add(self, index: int, report: dict) -> None:
        self.parts[index] = report

    def all(self) -> dict[int, dict]:
        return self.parts


def plan_parts(cfg: PrepConfig) -> tuple[list[dict], int]:
    """(parts in input order, estimated rows: sizes the shuffle's partitions)."""
    if cfg.source != "tabular":
        from data_pipelines.sources import input_files

        size = sum(Path(p).stat().st_size for p in input_files(cfg))
        return [{"kind": "adapter"}], max(1, size // 16)
    path = require(cfg.interactions if is_uri(cfg.interactions) else Path(cfg.interactions), "table")
    cols = [cfg.user_col, cfg.item_col, cfg.time_col]
    suffix = Path(file_name(path)).suffix
    if suffix == ".parquet":
        with open_input(path, random_access=True) as source:
            try:
                parquet = pq.ParquetFile(source)
                meta, names = parquet.metadata, parquet.schema_arrow.names
            except Exception as exc:  # noqa: BLE001 - name the file whatever pyarrow raised
                raise DataError(f"{path}: cannot read table ({exc})") from None
        _columns(pd.DataFrame(columns=names), path, cols)
        parts, groups, rows, row0 = [], [], 0, 0
        for g in range(meta.num_row_groups):
            groups.append(g)
            rows += meta.row_group(g).num_rows
            if rows >= PART_ROWS or g == meta.num_row_groups - 1:
                parts.append({"kind": "parquet", "path": str(path), "groups": groups, "row0": row0})
                row0 += rows
                groups, rows = [], 0
        return parts or [{"kind": "parquet", "path": str(path), "groups": [], "row0": 0}], meta.num_rows
    if suffix in CSV_SUFFIXES:
        _columns(pd.DataFrame(columns=csv_header(path)), path, cols)
        size = DataLocation(path).size() if is_uri(path) else path.stat().st_size
        return [{"kind": "csv", "path": str(path)}], max(1, (size or 0) // 12)
    raise DataError(f"{path}: expected .parquet or .csv")


def read_rows(cfg: PrepConfig, parts: list[dict], n_buckets: int, report) -> "ray.data.Dataset":
    """The canonical rows (user, item, timestamp, seq, bucket) of every part, lazily."""
    lenient = dataclasses.replace(cfg, strict=False)  # the driver raises strict errors, in order
    return ray.data.range(len(parts), override_num_blocks=len(parts)).map_batches(
        _read_parts, batch_size=1, batch_format="numpy",
        fn_kwargs={"cfg": lenient, "parts": parts, "n_buckets": n_buckets, "report": report})


def _read_parts(batch: dict, cfg: PrepConfig, parts: list[dict], n_buckets: int, report):
    for index in batch["id"]:
        yield from _read_part(int(index), parts[int(index)], cfg, n_buckets, report)


def _read_part(index: int, part: dict, cfg: PrepConfig, n_buckets: int, report):
    drops, extra = DropLog(), {}
    if part["kind"] == "adapter":   # frames of CHUNK_ROWS rows as the adapter parses them
        source = read_source(cfg)
        frames = source.frames
    else:
        counted = _TabularFrames(part, cfg, drops)
        frames = (df for df, _ in counted)
    seq = index << SEQ_SHIFT
    for df in frames:
        if len(df):
            yield _block(df, seq, n_buckets)
            seq += len(df)
    if part["kind"] == "adapter":  # after the last frame: the item table, the lines read, the drops
        data = source.finish()
        drops, rows_read = data.drops, data.rows_read
        extra = {"source": data.source, "name": data.name, "items": data.items,
                 "inputs": [str(p) for p in data.inputs], "category_names": data.category_names}
    else:                          # the dropped CSV lines were read too
        rows_read = counted.rows + drops.counts.get("malformed_line", 0)
    ray.get(report.add.remote(index, {"rows_read": rows_read, "counts": list(drops.counts.items()),
                                      "examples": drops.examples, "node": ray.get_runtime_context().get_node_id(),
                                      **extra}))


class _TabularFrames:
    """The part's valid rows as canonical frames (with the data rows seen); `rows` when done."""

    def __init__(self, part: dict, cfg: PrepConfig, drops: DropLog):
        self.part, self.cfg, self.drops, self.rows = part, cfg, drops, 0

    def __iter__(self):
        part, cfg = self.part, self.cfg
        path = part["path"] if is_uri(part["path"]) else Path(part["path"])   # a URI is read through pyarrow
        unit = {"s": 1.0, "ms": 1000.0}.get(cfg.time_unit)
        if unit is None:
            raise DataError(f"time_unit: expected 's' or 'ms', got {cfg.time_unit!r}")
        cols = [cfg.user_col, cfg.item_col, cfg.time_col]
        with open_input(path, random_access=True) if part["kind"] == "parquet" else nullcontext() as source:
            if part["kind"] == "parquet":
                # no pre-buffering: its read cache keeps every column chunk read
                reader = pq.ParquetFile(source, pre_buffer=False, buffer_size=1 << 20)
                raw = (b.to_pandas() for b in reader.iter_batches(batch_size=BLOCK_ROWS, columns=cols,
                                                                 row_groups=part["groups"]))
            else:
                raw = (chunk[cols] for chunk in csv_frames(path, self.drops, chunksize=BLOCK_ROWS))
            row0 = part.get("row0", 0)
            for df, rows in checked_frames(raw, cfg, path, unit, self.drops, row0=row0):
                self.rows = rows - row0
                yield df, rows


def _block(df: pd.DataFrame, seq0: int, n_buckets: int) -> pa.Table:
    users = df["user"].to_numpy(object)
    # pandas' keyed SipHash: the same bucket in every process and run (Python's hash is salted)
    bucket = (pd.util.hash_array(users, categorize=False) % np.uint64(n_buckets)).astype(np.int64)
    return pa.table({"user": pa.array(users, pa.string()), "item": pa.array(df["item"].to_numpy(object), pa.string()),
                     "timestamp": pa.array(df["timestamp"].to_numpy(np.int64)),
                     "seq": pa.array(np.arange(seq0, seq0 + len(df), dtype=np.int64)),
                     "bucket": pa.array(bucket)}, schema=ROW_SCHEMA)


def merged_report(parts: dict[int, dict], strict: bool) -> tuple[DropLog, int, dict]:
    """(the drops of all parts as one sequential read counts them, rows read, the whole-source
    part's extras and `nodes`: the node of each part's task); with `strict`, the first bad row in
    input order raises as `DropLog` would."""
    drops = DropLog()
    rows = 0
    extra: dict = {}
    nodes = [parts[i]["node"] for i in sorted(parts)]
    for index in sorted(parts):
        part = parts[index]
        rows += part["rows_read"]
        if strict and part["counts"] and not drops.counts:
            reason = part["counts"][0][0]
            raise DataError(f"{part['examples'][reason][0]} ({reason})")
        for reason, n in part["counts"]:
            drops.counts[reason] += n
        for reason, shown in part["examples"].items():
            room = drops.max_examples - len(drops.examples.setdefault(reason, []))
            drops.examples[reason].extend(shown[:max(room, 0)])
        extra = {k: v for k, v in part.items() if k not in ("rows_read", "counts", "examples", "node")} or extra
    return drops, rows, {**extra, "nodes": nodes}
