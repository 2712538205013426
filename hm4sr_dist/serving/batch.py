"""Batch top-K (`hm4sr-recommend`): every user of a prepared split, or of a histories file, to a
Parquet table of recommendations, on a Ray Data actor pool.

    hm4sr-recommend EXPORT --out recs.parquet --split test [--k 10] [--exclude-history]
    hm4sr-recommend EXPORT --out recs/ --histories histories.csv [--actors 4] [--batch-size 256]

Input
- `--split test` (or `valid`) with the prepared folder the export was trained on (`--prepared`,
  default: the folder the export's manifest names): each user's INPUT history of that split, read
  from the shards by the evaluator's own code (`ShardReader`'s user stream, `records.user_samples`):
  the sample (items, times, end) the evaluator ranks, as the history items[:end], times[:end].
  The scorer keeps its last `max_len` items (the reader's `collate`, `Scorer.batch`), so the model
  sees exactly the rows `evaluate_sums` scores on the reader's batches: same items, same times, same
  cut. Users without a sample in the split (fewer than 3 events) are skipped, as the evaluator
  skips them. The export must come from this data (same data fingerprint), or dense item IDs
  could differ.
- `--histories FILE`: a Parquet (.parquet, .pq) or CSV (.csv, optionally compressed: .csv.gz)
  file with columns `user`, `item`, `time` (others are ignored), one row per event:
    user  the raw user ID (string or integer; written back as its text),
    item  the raw item ID as the export's items.parquet spells it (string, or integer for its
          decimal spelling),
    time  whole unix seconds (an integer column; in CSV, digits), 0 .. 9999-12-31.
  A user's rows must be ordered by time (oldest first; equal times keep file order); they need not
  be contiguous. Users come out in the order of their first row. A bad row is an error naming the
  file, the row (1-based data row; in a CSV also its line, the header being line 1) and the
  column, before any computation.

Output: Parquet, one row per (user, rank): `user` (string, the raw user ID), `rank` (int32,
0-based), `item` (string, the raw item ID), `score` (float32, eq. 19's score, the evaluator's
number). Per user the k items are in the `Scorer`'s order: score descending, ties lower dense ID
first (so the target's position equals the evaluator's rank when no other item has exactly its
score). `--out x.parquet` writes one file; any other name a folder of `part-NNNNN.parquet` files
plus `_recommend.json` (read it with `pyarrow.parquet.read_table(folder)`, which skips `_` files).

Idempotent by output: the result is written under a temporary name beside `--out` and renamed
when complete, so `--out` is a whole output or absent. Each output records its request (the
export's identity and manifest sha256, k, --exclude-history, the source: split + data
fingerprint, or the histories file's sha256) in the Parquet metadata (key `hm4sr.recommend`) and,
for a folder, in `_recommend.json`. A folder output is also resumable: its parts are closed after
whole users and recorded in `.<out>.partial/_progress.json`, so the same request started again
after a failure, Ctrl-C or a lost node continues after the last closed part (a single .parquet
file starts again). Re-running the same request over a complete output says so
and returns without computing; a different request is an error unless `--force` (which replaces
it). Anything else already at `--out` is refused (it is not ours to replace).

Compute: histories are read and checked on the driver, cut into blocks of `--batch-size` users
and sent through `Dataset.map_batches` with `TopKActor` on `ActorPoolStrategy(size=--actors)`:
each actor loads the export once (`Scorer.from_export`), on its own GPU when the cluster has GPUs
(`num_gpus=1` per actor), else on one CPU; the driver streams the results into the Parquet writer
and prints a progress line every `--progress-every` batches (users done / total, users/s). The
export folder (and the prepared folder for `--split`) must be readable by every node at the same
path. Without a cluster address (RAY_ADDRESS) a local Ray is started.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hm4sr_dist.data.manifest import ManifestError, local_folder, read_manifest, sha256_file
from hm4sr_dist.data.records import ShardError, user_samples
from hm4sr_dist.serving.export import (
    ITEMS_FILE,
    MANIFEST_FILE,
    ExportError,
    ItemIdMap,
    check_files,
    clear_stale_tmp,
    process_alive,
    read_export_manifest,
)
from hm4sr_dist.serving.scorer import DEFAULT_ITEM_CHUNK, MAX_UNIX_SECONDS, ScoringError

FORMAT = "hm4sr-recommend"
FORMAT_VERSION = 1
METADATA_KEY = b"hm4sr.recommend"
FOLDER_RECORD = "_recommend.json"
PROGRESS_FILE = "_progress.json"        # a folder output being written: what a resume skips
COLUMNS = ("user", "item", "time")
SPLITS = ("valid", "test")
DEFAULT_BATCH = 256
DEFAULT_PROGRESS_EVERY = 10
ROWS_PER_FILE = 4_000_000              # a folder output's part size
MAX_BLOCKS = 1024                      # Ray Data blocks of histories (each a few batches at most)
OUTPUT_SCHEMA = pa.schema([("user", pa.string()), ("rank", pa.int32()), ("item", pa.string()),
                           ("score", pa.float32())])


class BatchError(ValueError):
    """A request `hm4sr-recommend` refuses, or an input it cannot read; names the file (and row)."""


# -- the histories ----------------------------------------------------------------------------------

@dataclass
class Histories:
    """Users and their dense (items, times) histories, oldest first, as Arrow columns: `user`
    (string), `items` and `times` (list<int64>); `where` is how messages name their source."""

    table: pa.Table
    where: str
    skipped: int = 0                   # users of the split without a sample in it

    @property
    def n_users(self) -> int:
        return self.table.num_rows


def _list_column(counts: np.ndarray, values: np.ndarray) -> pa.Array:
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    if offsets[-1] < 2**31:
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, pa.int64()))
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int64()))


def split_histories(prepared_dir: str | Path, split: str, max_len: int, cut: bool = True,
                    verify: str = "size") -> Histories:
    """The input history of every user with a sample in `split`, from the prepared shards.

    The shards are streamed by `ShardReader` (its integrity checks: shard sizes, sha256 while
    reading, item IDs and times in the data's range, the manifest's user / sample counts) and each
    user expanded by `records.user_samples`, the evaluator's only sample expansion. A sample
    (items, times, end) is ranked by the evaluator on collate's items[max(0, end - L):end]; the
    history kept here is items[:end] (with `cut`: its last `max_len` items, which is what the
    scorer keeps of it anyway). Raw user IDs come from the folder's users.parquet."""
    from hm4sr_dist.data.reader import ShardReader

    if split not in SPLITS:
        raise BatchError(f"split: expected one of {', '.join(SPLITS)}, got {split!r} (the training "
                         "split has one sample per prefix, not one history per user)")
    reader = ShardReader(prepared_dir, split, batch_size=1, prefetch_batches=0, max_len=max_len,
                         verify=verify)
    raw_users = _raw_users(prepared_dir, reader.manifest)
    users: list[str] = []
    counts: list[int] = []
    items_parts: list[np.ndarray] = []
    times_parts: list[np.ndarray] = []
    skipped = 0
    for key, items, times in reader._user_stream(reader.my_shards(), keys=True):
        uid = int(key[1:])                                 # the shard key u<id> (records.user_key)
        samples = list(user_samples(items, times, split))
        if not samples:
            skipped += 1
            continue
        for _, _, end in samples:                           # one per user in valid / test
            start = max(0, end - max_len) if cut else 0
            if uid not in raw_users:
                raise BatchError(f"{reader.dir}: shard user {key} has no row in its users table")
            users.append(raw_users[uid])
            counts.append(end - start)
            items_parts.append(items[start:end])
            times_parts.append(times[start:end])
    if not users:
        raise BatchError(f"{reader.dir}: no user has a {split} sample")
    counts_arr = np.asarray(counts, dtype=np.int64)
    table = pa.table({"user": pa.array(users, pa.string()),
                      "items": _list_column(counts_arr, np.concatenate(items_parts)),
                      "times": _list_column(counts_arr, np.concatenate(times_parts))})
    return Histories(table, f"the {split} split of {reader.dir}", skipped)


def _raw_users(prepared_dir: str | Path, manifest: dict) -> dict[int, str]:
    """Dense user ID (the shard key) -> raw user ID, from the folder's users table."""
    name = (manifest.get("tables") or {}).get("users") or "users.parquet"
    folder = local_folder(prepared_dir)
    path = folder / name
    try:
        table = pq.read_table(path, columns=["user_id", "raw_id"])
    except (OSError, ValueError, KeyError) as exc:
        raise BatchError(f"{path}: cannot read user_id and raw_id ({exc})") from None
    return {int(u): str(r) for u, r in zip(table.column("user_id").to_pylist(),
                                           table.column("raw_id").to_pylist())}


def file_histories(path: str | Path, id_map: ItemIdMap, max_len: int, cut: bool = True) -> Histories:
    """The histories of a Parquet or CSV file of (user, item, time) events (module docstring),
    every row checked; raw item IDs mapped to the export's dense IDs. With `cut` each history keeps
    its last `max_len` events (what the scorer keeps of it)."""
    path = Path(path)
    table, csv = _read_events(path)
    n = table.num_rows
    if n == 0:
        raise BatchError(f"{path}: no rows")

    def row_name(i: int) -> str:
        return f"row {i + 1} (line {i + 2})" if csv else f"row {i + 1}"

    def fail(i: int, column: str, value: Any, problem: str) -> BatchError:
        return BatchError(f"{path}: {row_name(i)}, column {column!r} = {value!r}: {problem}")

    columns = {}
    for name in COLUMNS:
        col = table.column(name).combine_chunks()
        if col.null_count:
            i = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
            raise fail(i, name, None, "missing value")
        columns[name] = col
    users = _id_column(columns["user"], "user", path, fail)
    items = _id_column(columns["item"], "item", path, fail)
    times = _time_column(columns["time"], path, fail)

    index = pc.index_in(items, value_set=pa.array(id_map.raw_ids, items.type))
    if index.null_count:
        i = int(np.flatnonzero(index.is_null().to_numpy(zero_copy_only=False))[0])
        raise fail(i, "item", items[i].as_py(), "unknown raw item ID (not in the export's items.parquet)")
    dense = index.to_numpy().astype(np.int64) + 1

    encoded = pc.dictionary_encode(users)               # codes in order of first appearance
    codes = encoded.indices.to_numpy().astype(np.int64)
    names = encoded.dictionary
    order = np.argsort(codes, kind="stable")            # grouped by user, file order within
    codes_s, times_s = codes[order], times[order]
    back = np.flatnonzero((codes_s[1:] == codes_s[:-1]) & (times_s[1:] < times_s[:-1]))
    if back.size:
        rows = order[back + 1]
        j = int(np.argmin(rows))
        i, prev = int(rows[j]), int(order[back[j]])
        raise fail(i, "time", int(times[i]), f"earlier than this user's previous event ({row_name(prev)}, "
                   f"{int(times[prev])}); a user's rows must be ordered by time, oldest first")
    counts = np.bincount(codes, minlength=len(names)).astype(np.int64)
    keep = slice(None)
    if cut:
        starts = np.zeros(len(counts), dtype=np.int64)
        np.cumsum(counts[:-1], out=starts[1:])
        position = np.arange(n, dtype=np.int64) - starts[codes_s]
        keep = position >= (counts - max_len)[codes_s]
        counts = np.minimum(counts, max_len)
    table = pa.table({"user": names.cast(pa.string()),
                      "items": _list_column(counts, dense[order][keep]),
                      "times": _list_column(counts, times_s[keep])})
    return Histories(table, str(path))


def _read_events(path: Path) -> tuple[pa.Table, bool]:
    """(table with at least the user, item and time columns, is it a CSV)."""
    if not path.is_file():
        raise BatchError(f"{path}: no such histories file")
    name = path.name.lower()
    csv = ".csv" in name
    if not csv and not name.endswith((".parquet", ".pq")):
        raise BatchError(f"{path}: expected a .parquet or .csv histories file")
    try:
        if csv:
            from pyarrow import csv as pacsv

            table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in COLUMNS}, strings_can_be_null=False))
        else:
            present = set(pq.read_schema(path).names)
            table = pq.read_table(path, columns=[c for c in COLUMNS if c in present])
    except (OSError, ValueError) as exc:                 # ArrowInvalid is a ValueError
        raise BatchError(f"{path}: cannot read as {'CSV' if csv else 'Parquet'} ({exc})") from None
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise BatchError(f"{path}: missing column(s) {', '.join(map(repr, missing))}; a histories "
                         f"file has columns {', '.join(map(repr, COLUMNS))}; it has "
                         f"{', '.join(map(repr, table.column_names))}")
    return table, csv


def _id_column(col: pa.Array, name: str, path: Path, fail: Callable) -> pa.Array:
    """A user or item column as strings: strings as they are, integers in decimal."""
    if pa.types.is_integer(col.type):
        return col.cast(pa.string())
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        empty = pc.equal(pc.utf8_length(col), 0).to_numpy(zero_copy_only=False)
        if empty.any():
            i = int(np.flatnonzero(empty)[0])
            raise fail(i, name, "", "empty ID")
        return col.cast(pa.string())
    raise BatchError(f"{path}: column {name!r} has type {col.type}; expected strings or integers "
                     f"(the raw {name} IDs)")


def _time_column(col: pa.Array, path: Path, fail: Callable) -> np.ndarray:
    """Whole unix seconds in [0, MAX_UNIX_SECONDS] as int64 (an integer column, or decimal text)."""
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        text = pc.utf8_trim_whitespace(col)
        digits = pc.match_substring_regex(text, r"^[0-9]{1,12}$").to_numpy(zero_copy_only=False)
        if not digits.all():
            i = int(np.flatnonzero(~digits)[0])
            value = col[i].as_py()
            try:
                int(value)
            except ValueError:
                raise fail(i, "time", value, "expected whole unix seconds (an integer)") from None
            raise fail(i, "time", value, f"outside [0, {MAX_UNIX_SECONDS}] (1970 to 9999)")
        times = text.cast(pa.int64()).to_numpy()
        bad = np.flatnonzero(times > MAX_UNIX_SECONDS)        # 12 digits reach past 9999
        if bad.size:
            i = int(bad[0])
            raise fail(i, "time", col[i].as_py(), f"outside [0, {MAX_UNIX_SECONDS}] (1970 to 9999)")
    elif pa.types.is_integer(col.type):
        values = col.to_numpy()
        bad = np.flatnonzero(values > MAX_UNIX_SECONDS if pa.types.is_unsigned_integer(col.type)
                             else (values < 0) | (values > MAX_UNIX_SECONDS))
        if bad.size:
            i = int(bad[0])
            raise fail(i, "time", col[i].as_py(), f"outside [0, {MAX_UNIX_SECONDS}] (1970 to 9999)")
        return values.astype(np.int64)
    else:
        raise BatchError(f"{path}: column 'time' has type {col.type}; expected whole unix seconds "
                         "(an integer column)")
    return times


def check_k(k: Any, histories: Histories, n_items: int, exclude_history: bool) -> None:
    """k is an int in 1..n_items, and with `exclude_history` no larger than any user's number of
    candidates (n_items less the distinct items of the history given)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise BatchError(f"k = {k!r}: expected an int >= 1")
    if k > n_items:
        raise BatchError(f"k = {k}: more than the {n_items} items of the catalogue")
    if not exclude_history:
        return
    items = histories.table.column("items").combine_chunks()
    offsets = items.offsets.to_numpy()
    values = items.values.to_numpy()
    counts = np.diff(offsets)
    owner = np.repeat(np.arange(len(counts)), counts)
    pairs = np.unique(owner * (n_items + 1) + values[offsets[0]:offsets[-1]])
    distinct = np.bincount(pairs // (n_items + 1), minlength=len(counts))
    worst = int(np.argmax(distinct))
    if k > n_items - distinct[worst]:
        user = histories.table.column("user")[worst].as_py()
        raise BatchError(f"k = {k}: more than the {n_items - distinct[worst]} candidate items of user "
                         f"{user!r} with --exclude-history ({n_items} items less its "
                         f"{distinct[worst]} distinct history items)")


# -- the actor --------------------------------------------------------------------------------------

class TopKActor:
    """One Ray Data actor: loads the export once and maps a block of histories (user, items,
    times) to its recommendation rows (user, rank, item, score). Also usable without Ray."""

    def __init__(self, export_dir: str, k: int, exclude_history: bool = False,
                 item_chunk_size: int = DEFAULT_ITEM_CHUNK, batch_size: int = DEFAULT_BATCH,
                 device: str = "cpu", threads: int = 0):
        import torch

        from hm4sr_dist.serving.scorer import Scorer

        if threads > 0:
            torch.set_num_threads(threads)
        self.k, self.exclude_history = int(k), bool(exclude_history)
        # the driver checked every sha256 once; an actor checks the sizes
        self.scorer = Scorer.from_export(export_dir, device=device, verify=False,
                                         item_chunk_size=item_chunk_size, batch_size=batch_size)
        self.raw_ids = pa.array(self.scorer.id_map.raw_ids, pa.string())

    def __call__(self, batch: pa.Table) -> pa.Table:
        items, times = (batch.column(c).combine_chunks() for c in ("items", "times"))
        offsets = items.offsets.to_numpy()
        item_values, time_values = items.values.to_numpy(), times.values.to_numpy()
        dense = [(item_values[offsets[i]:offsets[i + 1]], time_values[offsets[i]:offsets[i + 1]])
                 for i in range(batch.num_rows)]
        scores, ids = self.top_k(dense)
        n, k = scores.shape
        rows = np.repeat(np.arange(n), k)
        return pa.table({
            "user": pc.take(batch.column("user"), pa.array(rows)).cast(pa.string()),
            "rank": pa.array(np.tile(np.arange(k, dtype=np.int32), n)),
            "item": pc.take(self.raw_ids, pa.array(ids.reshape(-1) - 1)),
            "score": pa.array(scores.reshape(-1).astype(np.float32, copy=False)),
        }, schema=OUTPUT_SCHEMA)

    def top_k(self, dense: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        """(scores, dense ids), (B, k) numpy: `Scorer.recommend`'s computation on checked dense
        histories (the scorer's own batch, encoding and chunked top-K)."""
        size = self.scorer.batch_size
        parts = [self.scorer._top_k(dense[s:s + size], self.k, self.exclude_history)
                 for s in range(0, len(dense), size)]
        return (np.concatenate([p[0].numpy() for p in parts]),
                np.concatenate([p[1].numpy() for p in parts]))


# -- the output -------------------------------------------------------------------------------------

def _tmp_name(out: Path) -> Path:
    return out.with_name(f".{out.name}.tmp-{os.getpid()}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def is_folder_output(out: Path) -> bool:
    return out.suffix.lower() != ".parquet"


def read_record(out: str | Path) -> dict | None:
    """The record of a complete `hm4sr-recommend` output at `out`, None when there is none; raises
    BatchError for something else there (not ours to replace)."""
    out = Path(out)
    if not out.exists():
        return None
    if is_folder_output(out):
        if not out.is_dir():
            raise BatchError(f"{out}: exists and is not a folder (a name without .parquet is an "
                             "output folder); refusing to replace it")
        record_file = out / FOLDER_RECORD
        if not any(out.iterdir()):
            return None
        try:
            record = json.loads(record_file.read_text())
        except (OSError, ValueError):
            raise BatchError(f"{out}: exists, is not empty and holds no {FOLDER_RECORD} (not an "
                             f"{FORMAT} output); refusing to replace it") from None
        for name, size in (record.get("files") or {}).items():
            part = out / name
            if not part.is_file() or part.stat().st_size != size:
                raise BatchError(f"{out}: {name} is missing or changed since it was written "
                                 f"({FOLDER_RECORD}); remove the folder or pass --force")
    else:
        try:
            metadata = pq.read_schema(out).metadata or {}
            record = json.loads(metadata[METADATA_KEY])
        except (OSError, ValueError, KeyError):
            raise BatchError(f"{out}: exists and is not an {FORMAT} output (no {METADATA_KEY.decode()} "
                             "Parquet metadata); refusing to replace it") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise BatchError(f"{out}: not an {FORMAT} output; refusing to replace it")
    return record


class _Writer:
    """Parquet rows into the temporary output: one file, or a folder of parts.

    A folder output is resumable: its parts are written into `.<out>.partial/` beside `out`, each
    closed after a whole number of users, and `_progress.json` there records the request, the
    closed parts and the users they hold, so a run stopped in any way (an error, Ctrl-C, a killed
    node) and started again with the same request continues after the last closed part
    (`resume_at`). A single .parquet file is written through a temporary and is not resumable."""

    def __init__(self, out: Path, record: dict, k: int, rows_per_file: int = ROWS_PER_FILE):
        self.out, self.record, self.k = out, record, int(k)
        self.folder = is_folder_output(out)
        # a part ends between users, so the progress can count whole users
        self.rows_per_file = max(self.k, rows_per_file - rows_per_file % self.k)
        meta = {METADATA_KEY: json.dumps(record).encode()}
        self.schema = OUTPUT_SCHEMA.with_metadata(meta)
        self.writer: pq.ParquetWriter | None = None
        self.parts: list[Path] = []
        self.closed: dict[str, int] = {}
        self.in_part = 0
        self.resume_at = 0                      # users in closed parts when this run started
        self.users_closed = 0                   # users in the parts this run closed
        self.discarded = False                  # an unusable partial output was removed
        if self.folder:
            self.tmp = _partial_name(out)
            self._open_partial()
        else:
            self.tmp = _tmp_name(out)
            _remove(self.tmp)
            self.tmp.parent.mkdir(parents=True, exist_ok=True)

    # -- a resumable folder -------------------------------------------------------------------------
    def _open_partial(self) -> None:
        progress = _read_progress(self.tmp)
        # a live writer on this host holds it (one on another host sharing the folder is not seen)
        if (progress is not None and progress.get("host") == socket.gethostname()
                and progress.get("pid") != os.getpid() and process_alive(progress.get("pid"))):
            raise BatchError(f"{self.out}: another hm4sr-recommend (pid {progress['pid']}) is writing "
                             f"it ({self.tmp})")
        usable = (progress is not None and progress.get("request") == self.record["request"]
                  and all((self.tmp / n).is_file() and (self.tmp / n).stat().st_size == b
                          for n, b in progress.get("parts", {}).items()))
        self.discarded = progress is not None and not usable and int(progress.get("users", 0)) > 0
        if not usable:
            _remove(self.tmp)
            self.tmp.mkdir(parents=True)
            progress = {"parts": {}, "users": 0}
        for stray in self.tmp.glob("part-*.parquet"):    # a part open when the run stopped
            if stray.name not in progress["parts"]:
                stray.unlink()
        self.closed = dict(progress["parts"])
        self.parts = [self.tmp / n for n in sorted(self.closed)]
        self.resume_at = int(progress["users"])
        self._save_progress()

    def _save_progress(self) -> None:
        body = {"request": self.record["request"], "host": socket.gethostname(), "pid": os.getpid(),
                "parts": self.closed, "users": self.resume_at + self.users_closed}
        tmp = self.tmp / f".{PROGRESS_FILE}.tmp"
        tmp.write_text(json.dumps(body, indent=2))
        tmp.replace(self.tmp / PROGRESS_FILE)

    # -- writing ------------------------------------------------------------------------------------
    def write(self, table: pa.Table) -> None:
        table = table.select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA)
        table = table.replace_schema_metadata(self.schema.metadata)
        while table.num_rows:
            if self.writer is None:
                path = self.tmp / f"part-{len(self.parts):05d}.parquet" if self.folder else self.tmp
                self.parts.append(path)
                self.writer, self.in_part = pq.ParquetWriter(path, self.schema), 0
            room = self.rows_per_file - self.in_part if self.folder else table.num_rows
            piece, table = table.slice(0, room), table.slice(room)
            self.writer.write_table(piece)
            self.in_part += piece.num_rows
            if self.folder and self.in_part >= self.rows_per_file:
                self._close_part()

    def _close_part(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            if self.folder:
                part = self.parts[-1]
                self.closed[part.name] = part.stat().st_size
                self.users_closed += self.in_part // self.k     # parts end between users
                self._save_progress()

    def publish(self) -> None:
        """Close, then rename into place (an earlier output, replaced under --force, is moved aside
        first and deleted after, so `out` is always a whole output or absent)."""
        if self.writer is None and not self.parts:        # no rows at all: an empty, valid file
            self.writer = pq.ParquetWriter(self.tmp / "part-00000.parquet" if self.folder else self.tmp,
                                           self.schema)
            self.parts.append(self.tmp / "part-00000.parquet" if self.folder else self.tmp)
        self._close_part()
        if self.folder:
            files = {p.name: p.stat().st_size for p in self.parts}
            (self.tmp / FOLDER_RECORD).write_text(json.dumps(self.record | {"files": files}, indent=2))
            (self.tmp / PROGRESS_FILE).unlink()
        old = None
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            _remove(old)
            self.out.rename(old)
        self.tmp.rename(self.out)
        if old is not None:
            _remove(old)

    def abort(self) -> None:
        """A folder keeps its closed parts for a resume (the open one is dropped then); a single
        file's temporary is removed."""
        if self.folder:
            if self.writer is not None:
                self.writer.close()
                self.writer = None
            return
        try:
            self._close_part()
        finally:
            _remove(self.tmp)


def _partial_name(out: Path) -> Path:
    return out.with_name(f".{out.name}.partial")


def _read_progress(folder: Path) -> dict | None:
    try:
        progress = json.loads((folder / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return progress if isinstance(progress, dict) else None


# -- the run ----------------------------------------------------------------------------------------

def _request(manifest_sha: str, manifest: dict, k: int, exclude_history: bool, source: dict) -> dict:
    """What identifies an output's content (compared on a re-run)."""
    return {"export_identity": manifest.get("identity"), "export_manifest_sha256": manifest_sha,
            "k": int(k), "exclude_history": bool(exclude_history), "source": source}


def _differences(old: dict, new: dict) -> list[str]:
    out = []
    for key in new:
        if old.get(key) != new[key]:
            out.append(f"{key} {old.get(key)!r} -> {new[key]!r}")
    return out


@dataclass
class _Export:
    path: Path
    manifest: dict
    manifest_sha: str
    id_map: ItemIdMap

    @property
    def max_len(self) -> int:
        return int(self.manifest["max_len"])


def _open_export(export_dir: str | Path) -> _Export:
    path = Path(export_dir).resolve()
    manifest = read_export_manifest(path)
    check_files(path, manifest, verify=True)             # once here; the actors check sizes only
    id_map = ItemIdMap.from_parquet(path / ITEMS_FILE, int(manifest["n_items"]))
    return _Export(path, manifest, sha256_file(path / MANIFEST_FILE), id_map)


def _existing(out: Path, request: dict, force: bool) -> dict | None:
    """The record of a complete output of this same request (nothing to do), else None; a
    different request's output is an error unless `force`."""
    record = read_record(out)
    if record is None:
        return None
    if record.get("request") == request:
        return record
    if not force:
        diff = "; ".join(_differences(record.get("request") or {}, request))
        raise BatchError(f"{out}: holds the recommendations of another request ({diff}); pass --force "
                         "to replace them")
    return None


def recommend_split(export_dir: str | Path, prepared_dir: str | Path | None = None, split: str = "test",
                    k: int = 10, *, out: str | Path, exclude_history: bool = False,
                    actors: int | None = None, batch_size: int = DEFAULT_BATCH,
                    item_chunk_size: int = DEFAULT_ITEM_CHUNK, force: bool = False,
                    progress_every: int = DEFAULT_PROGRESS_EVERY,
                    log: Callable[[str], None] | None = print) -> dict:
    """Top-k of every user of `split` (default: the test split's inputs, what the evaluator ranks)
    of the prepared folder (default: the one the export was trained on) into `out`. Returns a
    summary: out, status ("written" or "complete": an identical earlier output left alone), users,
    rows, seconds, users_per_s."""
    export = _open_export(export_dir)
    if prepared_dir is None:
        prepared_dir = export.manifest["data"].get("path")
        if not prepared_dir:
            raise BatchError(f"{export.path / MANIFEST_FILE}: names no prepared folder; pass one")
    data = read_manifest(prepared_dir)
    trained_on, here = export.manifest["data"].get("fingerprint"), data.get("fingerprint")
    if trained_on and here and trained_on != here:
        raise BatchError(f"{prepared_dir}: data fingerprint {here[:12]}, but the export was trained on "
                         f"{trained_on[:12]} ({export.path / MANIFEST_FILE}); its item IDs may differ")
    if int(data["counts"]["items"]) != export.id_map.n_items:
        raise BatchError(f"{prepared_dir}: {data['counts']['items']} items, the export has "
                         f"{export.id_map.n_items}")
    source = {"split": split, "data_fingerprint": here}
    request = _request(export.manifest_sha, export.manifest, k, exclude_history, source)
    out = Path(out)
    done = _existing(out, request, force)
    if done is not None:
        return _already(out, done, log)
    histories = split_histories(prepared_dir, split, export.max_len, cut=not exclude_history)
    return _run(export, histories, k, out, request, exclude_history, actors, batch_size,
                item_chunk_size, progress_every, log)


def recommend_file(export_dir: str | Path, histories_file: str | Path, k: int = 10, *,
                   out: str | Path, exclude_history: bool = False, actors: int | None = None,
                   batch_size: int = DEFAULT_BATCH, item_chunk_size: int = DEFAULT_ITEM_CHUNK,
                   force: bool = False, progress_every: int = DEFAULT_PROGRESS_EVERY,
                   log: Callable[[str], None] | None = print) -> dict:
    """Top-k of every user of a histories file (module docstring: the format) into `out`; returns
    the summary of `recommend_split`."""
    export = _open_export(export_dir)
    path = Path(histories_file)
    if not path.is_file():
        raise BatchError(f"{path}: no such histories file")
    source = {"histories_sha256": sha256_file(path), "histories_bytes": path.stat().st_size}
    request = _request(export.manifest_sha, export.manifest, k, exclude_history, source)
    out = Path(out)
    done = _existing(out, request, force)
    if done is not None:
        return _already(out, done, log)
    histories = file_histories(path, export.id_map, export.max_len, cut=not exclude_history)
    return _run(export, histories, k, out, request, exclude_history, actors, batch_size,
                item_chunk_size, progress_every, log)


def _already(out: Path, record: dict, log: Callable | None) -> dict:
    result = record.get("result") or {}
    if log is not None:
        log(f"{out}: already complete for this request ({result.get('users')} users, k="
            f"{record['request']['k']}); nothing to do (remove it to compute it again)")
    return {"out": str(out), "status": "complete", "users": result.get("users"),
            "rows": result.get("rows"), "seconds": 0.0, "users_per_s": None}


def _resources(actors: int | None) -> tuple[int, bool]:
    """(actors, use GPUs): one actor per GPU of the cluster, else one per CPU less one."""
    import ray

    if not ray.is_initialized():
        ray.init()            # connects to RAY_ADDRESS / the job's cluster, else starts a local one
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    if actors is None:
        actors = gpus if gpus else max(1, cpus - 1)
    if actors < 1:
        raise BatchError(f"actors: expected >= 1, got {actors}")
    return actors, gpus > 0


def _run(export: _Export, histories: Histories, k: int, out: Path, request: dict, exclude_history: bool,
         actors: int | None, batch_size: int, item_chunk_size: int, progress_every: int,
         log: Callable | None) -> dict:
    check_k(k, histories, export.id_map.n_items, exclude_history)
    if batch_size < 1 or item_chunk_size < 0 or progress_every < 0:
        raise BatchError(f"batch size >= 1, item chunk >= 0 and progress_every >= 0, got {batch_size}, "
                         f"{item_chunk_size}, {progress_every}")
    clear_stale_tmp(out)
    actors, gpu = _resources(actors)
    total = histories.n_users
    n_batches = -(-total // batch_size)
    actors = min(actors, n_batches)
    started = time.time()
    record = {"format": FORMAT, "format_version": FORMAT_VERSION, "request": request,
              "result": {"users": total, "rows": total * int(k), "export": str(export.path),
                         "source": histories.where,
                         "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}}
    if log is not None:
        skipped = f" ({histories.skipped} users without a sample skipped)" if histories.skipped else ""
        log(f"scoring {total} users of {histories.where}{skipped} with {export.path} (k={k}"
            f"{', history excluded' if exclude_history else ''}): {actors} actor(s) on "
            f"{'GPU' if gpu else 'CPU'}, batches of {batch_size}")
    writer = _Writer(out, record, k, rows_per_file=ROWS_PER_FILE)
    if writer.discarded and log is not None:
        log(f"{writer.tmp}: an unfinished output of another request (or with changed parts) was "
            "discarded")
    try:
        rows = _score_into(writer, histories, export, k, exclude_history, actors, gpu, batch_size,
                           item_chunk_size, progress_every, started, log)
        seconds = time.time() - started
        writer.publish()
    except BaseException:
        writer.abort()
        raise
    rate = (total - writer.resume_at) / max(seconds, 1e-9)
    if log is not None:
        log(f"wrote {out}: {total} users x k={k} = {rows} rows in {seconds:.1f} s ({rate:.1f} users/s)")
    return {"out": str(out), "status": "written", "users": total, "rows": rows, "seconds": seconds,
            "users_per_s": rate, "resumed_at_user": writer.resume_at}


def _score_into(writer: _Writer, histories: Histories, export: _Export, k: int, exclude_history: bool,
                actors: int, gpu: bool, batch_size: int, item_chunk_size: int, progress_every: int,
                started: float, log: Callable | None) -> int:
    """Score the users the writer does not hold yet, in input order, into it; returns all rows."""
    import ray

    total, first = histories.n_users, writer.resume_at
    if first and log is not None:
        log(f"resuming: {first} of {total} users are in {writer.tmp} already")
    rows = first * k
    left = histories.table.slice(first)
    if left.num_rows == 0:
        return rows
    n_batches = -(-left.num_rows // batch_size)
    per_block = batch_size * -(-n_batches // MAX_BLOCKS)
    blocks = [left.slice(s, per_block) for s in range(0, left.num_rows, per_block)]
    ds = ray.data.from_arrow(blocks).map_batches(
        TopKActor, batch_size=batch_size, batch_format="pyarrow",
        fn_constructor_kwargs={"export_dir": str(export.path), "k": int(k),
                               "exclude_history": bool(exclude_history),
                               "item_chunk_size": int(item_chunk_size), "batch_size": int(batch_size),
                               "device": "cuda" if gpu else "cpu", "threads": 0 if gpu else 1},
        compute=ray.data.ActorPoolStrategy(size=min(actors, n_batches)), num_cpus=1,
        num_gpus=1 if gpu else None)
    ds.context.execution_options.preserve_order = True     # the file lists users in input order
    ds.context.enable_progress_bars = False                 # ours are the progress lines
    batches = 0
    for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        writer.write(table)
        rows += table.num_rows
        batches += 1
        if log is not None and progress_every and batches % progress_every == 0:
            done, elapsed = rows // k, time.time() - started
            log(f"  {done}/{total} users ({100.0 * done / total:.1f}%), "
                f"{(done - first) / max(elapsed, 1e-9):.1f} users/s")
    if rows != total * k:
        raise RuntimeError(f"hm4sr-recommend: {rows} rows for {total} users x k={k}")
    return rows


# -- command line -----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hm4sr-recommend",
        description="Batch top-K recommendations of an hm4sr-export for every user of a prepared "
                    "split (default: the test split's inputs, what the evaluator ranks) or of a "
                    "histories file, written as Parquet (user, rank, item, score), on a Ray Data "
                    "actor pool. Re-running the same request over a complete output does nothing.")
    parser.add_argument("export", help="the export folder (hm4sr-export)")
    parser.add_argument("--out", required=True,
                        help="the output: NAME.parquet (one file) or a folder of part files")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--split", choices=SPLITS, default=None,
                        help="every user of this split of the prepared folder (default: test)")
    source.add_argument("--histories", metavar="FILE",
                        help="a .parquet or .csv file with columns user, item, time (unix seconds), "
                             "one row per event, oldest first within a user")
    parser.add_argument("--prepared", metavar="DIR", default=None,
                        help="with --split: the prepared folder (default: the one the export names)")
    parser.add_argument("--k", type=int, default=10, help="items per user (default 10)")
    parser.add_argument("--exclude-history", action="store_true",
                        help="never recommend an item of the user's history")
    parser.add_argument("--actors", type=int, default=None,
                        help="actors (default: one per GPU of the cluster, else CPUs less one)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH,
                        help=f"users per batch (default {DEFAULT_BATCH})")
    parser.add_argument("--item-chunk", type=int, default=DEFAULT_ITEM_CHUNK,
                        help=f"items scored per block (default {DEFAULT_ITEM_CHUNK}; 0 = all at once)")
    parser.add_argument("--progress-every", type=int, default=DEFAULT_PROGRESS_EVERY,
                        help=f"a progress line every N batches (default {DEFAULT_PROGRESS_EVERY}; 0 = none)")
    parser.add_argument("--force", action="store_true",
                        help="replace an earlier output of a different request")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.prepared and args.histories:
        print("error: --prepared goes with --split, not --histories", file=sys.stderr)
        return 2

    def log(line: str) -> None:
        print(line, flush=True)

    common = dict(out=args.out, exclude_history=args.exclude_history, actors=args.actors,
                  batch_size=args.batch_size, item_chunk_size=args.item_chunk, force=args.force,
                  progress_every=args.progress_every, log=log)
    try:
        if args.histories:
            recommend_file(args.export, args.histories, args.k, **common)
        else:
            recommend_split(args.export, args.prepared, args.split or "test", args.k, **common)
    except (BatchError, ExportError, ManifestError, ShardError, ScoringError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
