"""Streaming preparation, passes 1-2: the log -> hash(user) buckets -> deduplicated, integer-coded
buckets.

Pass 1 appends every chunk's rows to N Parquet files by hash(user) (one row group per chunk and
bucket), so each user's whole history lands in one bucket, in input order.
Pass 2 reads one bucket at a time (it fits the budget by construction), drops duplicate
(user, item, timestamp) rows keeping the first, and codes it: users get global codes (buckets
hold disjoint users, so a running offset), items get codes from one growing table of the distinct
raw items (O(items) strings, held as one Arrow array). The coded bucket is four .npy arrays
(user code, item code, timestamp, input position) that the k-core passes re-read cheaply.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

log = logging.getLogger("data_pipelines.streaming")
SCHEMA = pa.schema([("user", pa.string()), ("item", pa.string()), ("timestamp", pa.int64()),
                    ("seq", pa.int64())])
COLUMNS = ("u", "i", "t", "s")  # user code, item code, timestamp, input position


def bucket_of(users: np.ndarray, n_buckets: int) -> np.ndarray:
    """Stable across runs and processes (pandas' keyed SipHash, not Python's salted hash)."""
    return (pd.util.hash_array(users, categorize=False) % np.uint64(n_buckets)).astype(np.int64)


def partition(chunks: Iterable[pd.DataFrame], folder: Path, n_buckets: int, progress) -> int:
    """Pass 1: append each chunk to its users' bucket files; returns the number of valid rows."""
    folder.mkdir(parents=True, exist_ok=True)
    writers = [pq.ParquetWriter(folder / f"bucket-{b:05d}.parquet", SCHEMA, compression="snappy")
               for b in range(n_buckets)]
    rows = 0
    try:
        for df in chunks:
            b = bucket_of(df["user"].to_numpy(object), n_buckets)
            order = np.argsort(b, kind="stable")  # input order inside each bucket
            table = pa.Table.from_pandas(df.iloc[order], schema=SCHEMA, preserve_index=False)
            bounds = np.searchsorted(b[order], np.arange(n_buckets + 1))
            for k in range(n_buckets):
                if bounds[k + 1] > bounds[k]:
                    writers[k].write_table(table.slice(bounds[k], bounds[k + 1] - bounds[k]))
            rows += len(df)
            progress(f"read {rows:,} valid rows into {n_buckets} bucket files")
        progress(f"read {rows:,} valid rows into {n_buckets} bucket files (done)", force=True)
    finally:
        for w in writers:
            w.close()
    return rows


@dataclass
class Coded:
    """The deduplicated log as coded buckets, plus the code -> raw ID tables."""

    folder: Path
    n_buckets: int
    rows: list = field(default_factory=list)    # rows per coded bucket
    user_raw: pa.Array | None = None            # code -> raw user ID
    item_raw: pa.Array | None = None            # code -> raw item ID
    duplicates: int = 0
    first_duplicate: tuple | None = None         # (seq, user, item, timestamp) of the earliest

    def load(self, b: int, *columns: str) -> list[np.ndarray]:
        return [np.load(self.folder / f"coded-{b:05d}.{c}.npy") for c in columns]

    @property
    def n_rows(self) -> int:
        return int(sum(self.rows))


def code_buckets(raw: Path, out: Path, n_buckets: int, progress) -> Coded:
    """Pass 2: dedupe and code each bucket; deletes each raw bucket file once coded."""
    out.mkdir(parents=True, exist_ok=True)
    coded = Coded(out, n_buckets)
    users: list[pa.Array] = []
    item_set = pa.array([], pa.string())
    n_users = 0
    for b in range(n_buckets):
        path = raw / f"bucket-{b:05d}.parquet"
        table = pq.read_table(path)
        path.unlink()
        if table.num_rows == 0:
            coded.rows.append(0)
            _save(out, b, *(np.zeros(0, dtype=d) for d in (np.int32, np.int32, np.int64, np.int64)))
            continue
        u_enc = pc.dictionary_encode(table.column("user").combine_chunks())
        i_enc = pc.dictionary_encode(table.column("item").combine_chunks())
        # bucket-local item dictionary -> global codes; unseen items extend the global table
        known = pc.index_in(i_enc.dictionary, value_set=item_set)
        new = known.is_null().to_numpy(zero_copy_only=False)
        to_global = known.fill_null(-1).to_numpy().astype(np.int64)
        to_global[new] = len(item_set) + np.arange(int(new.sum()))
        item_set = pa.concat_arrays([item_set, i_enc.dictionary.filter(pa.array(new))])
        u = (u_enc.indices.to_numpy() + n_users).astype(np.int32)
        i = to_global[i_enc.indices.to_numpy()].astype(np.int32)
        t = table.column("timestamp").to_numpy()
        s = table.column("seq").to_numpy()
        users.append(u_enc.dictionary)
        n_users += len(u_enc.dictionary)
        # duplicates: equal (user, item, t) after a stable sort; rows are in input order, so the
        # first of each run is the earliest occurrence, which stays
        order = np.lexsort((t, i, u))
        same = (u[order][1:] == u[order][:-1]) & (i[order][1:] == i[order][:-1]) & \
               (t[order][1:] == t[order][:-1])
        dup = np.zeros(len(u), dtype=bool)
        dup[order[1:][same]] = True
        if dup.any():
            first = int(np.flatnonzero(dup)[0])
            coded.duplicates += int(dup.sum())
            if coded.first_duplicate is None or s[first] < coded.first_duplicate[0]:
                coded.first_duplicate = (int(s[first]), table.column("user")[first].as_py(),
                                         table.column("item")[first].as_py(), int(t[first]))
            keep = ~dup
            u, i, t, s = u[keep], i[keep], t[keep], s[keep]
        _save(out, b, u, i, t, s)
        coded.rows.append(len(u))
        progress(f"bucket {b + 1}/{n_buckets}: {len(u):,} rows after dropping {int(dup.sum()):,} "
                 f"duplicates; {n_users:,} users, {len(item_set):,} items so far",
                 force=b + 1 == n_buckets)
        del table, u_enc, i_enc, u, i, t, s, order, same, dup
    coded.user_raw = pa.concat_arrays(users) if users else pa.array([], pa.string())
    coded.item_raw = item_set
    return coded


def _save(folder: Path, b: int, *arrays: np.ndarray) -> None:
    for name, a in zip(COLUMNS, arrays):
        np.save(folder / f"coded-{b:05d}.{name}.npy", a)
