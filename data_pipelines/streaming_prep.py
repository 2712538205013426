"""Preparation of logs larger than memory: the same output as `preprocess.preprocess` +
`shards.write_shards`, with peak memory set by `memory_budget_mb` instead of the log size.

    python -m data_pipelines.prepare --source tabular --interactions big.parquet \
        --user-col uid --item-col iid --time-col ts --out-dir outputs/big --memory-budget-mb 1024

An external sort on local disk (`spill_dir`, default beside the output), in passes that each hold
one chunk, bucket or user range:
  1. read the log in chunks, append rows to N Parquet files by hash(user)  (streaming_source,
  2. per bucket: drop duplicates, code users/items as integers               streaming_partition)
  3. k-core rounds: per-pass counts of users/items over the coded buckets    (streaming_kcore)
  4. dense ID maps by the in-memory rules (sorted raw IDs, numeric if all ints)
  5. kept rows -> files per range of dense users                             (streaming_shards)
  6. per range: sort by (user, time, input order) -> the per-user WebDataset shards
Held whole: only O(users + items) arrays (counts, code -> ID maps, raw ID tables); the budget
sizes the chunks, buckets and ranges from what is left after those and the interpreter.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipelines.canonical import CanonicalData
from data_pipelines.config import PrepConfig, check_memory_budget
from data_pipelines.preprocess import EmptyResultError, raw_id_column, split_sizes
from data_pipelines.report import DataError
from data_pipelines.shards import shard_count
from data_pipelines.streaming_kcore import IdMaps, check_not_empty, id_maps, kcore
from data_pipelines.streaming_partition import code_buckets, partition
from data_pipelines.streaming_shards import (ShardWriter, ray_split_bounds, split_by_range,
                                             user_ranges, write_ranges)
from data_pipelines.streaming_source import open_source
from hm4sr_dist.memory import peak_resident_bytes, resident_bytes

log = logging.getLogger("data_pipelines.streaming")

# Working bytes per row of each pass, measured on the benchmark's log (strings of ~10 chars) with
# headroom: a pandas chunk with object strings and its checks; a bucket in Arrow + its numpy codes
# and sort permutations; a range's int64 rows, sort order and gathered copies.
CHUNK_BYTES_PER_ROW = 600
BUCKET_BYTES_PER_ROW = 450
RANGE_BYTES_PER_ROW = 200
# Floors that keep files and row groups from getting tiny (the tests lower them to force many
# chunks, buckets and ranges on a small log).
MIN_CHUNK_ROWS, MIN_BUCKET_ROWS, MIN_RANGE_ROWS = 20_000, 10_000, 10_000


@dataclass
class Plan:
    budget: int               # bytes, the whole process
    baseline: int             # RSS before any work (interpreter, imports)
    chunk_rows: int
    n_buckets: int


def plan(cfg: PrepConfig, estimated_rows: int) -> Plan:
    budget = cfg.memory_budget_mb << 20
    baseline = resident_bytes()
    working = budget - baseline
    if working < 64 << 20:
        raise DataError(f"memory_budget_mb: {cfg.memory_budget_mb} MB leaves "
                        f"{working >> 20} MB after the {baseline >> 20} MB this process already "
                        "uses; raise it (>= baseline + 64 MB)")
    chunk_rows = int(min(2_000_000, max(MIN_CHUNK_ROWS, working // 4 // CHUNK_BYTES_PER_ROW)))
    bucket_rows = max(MIN_BUCKET_ROWS, working // 3 // BUCKET_BYTES_PER_ROW)
    n_buckets = int(min(4096, max(2, -(-estimated_rows // bucket_rows))))
    return Plan(budget, baseline, chunk_rows, n_buckets)


def range_rows(budget: int, resident: int, shard_bytes: int) -> int:
    """Rows per user range in passes 5-6: half of what the budget leaves now, after one shard's
    tar block. What passes 1-4 leave resident (the ID maps, and memory the allocators freed but
    keep) is not known in advance: 565 MB of a 768 MB budget at 20M actions, against the 171 MB
    the plan started from, so ranges sized from the plan's start overshot the budget."""
    return max(MIN_RANGE_ROWS, (budget - resident - shard_bytes) // 2 // RANGE_BYTES_PER_ROW)


class StreamedLog:
    """What `prepare.py` needs of a prepared log, without holding its actions.

    Duck-types `Prepared` for `items.align_items` and `preprocess.split_sizes` (`user_raw`,
    `item_raw`, `n_items`, `lengths()`); the shards, time range and interval statistics come
    from `write_shards`.
    """

    def __init__(self, ids: IdMaps, rounds: int, spill: Path, cfg: PrepConfig, plan_: Plan,
                 coded, kept, progress):
        self.user_raw, self.item_raw = ids.user_raw, ids.item_raw
        self.kcore_rounds = rounds
        self._ids, self._spill, self._cfg, self._plan = ids, spill, cfg, plan_
        self._coded, self._kept, self._progress = coded, kept, progress
        self._interval: dict | None = None
        self.time_min = self.time_max = 0

    n_users = property(lambda self: len(self.user_raw))
    n_items = property(lambda self: len(self.item_raw))
    n_actions = property(lambda self: int(self._ids.lengths.sum()))

    def lengths(self) -> np.ndarray:
        return self._ids.lengths

    @property
    def samples(self) -> dict[str, int]:
        return split_sizes(self)

    def write_users(self, path: Path) -> None:
        pq.write_table(pa.table({"user_id": pa.array(np.arange(self.n_users, dtype=np.int64)),
                                 "raw_id": raw_id_column(self.user_raw)}), path)

    def write_shards(self, shard_dir: Path, target_bytes: int, min_shards: int) -> list[dict]:
        lengths = self._ids.lengths
        bounds = ray_split_bounds(len(lengths), shard_count(lengths, target_bytes, min_shards))
        rows = range_rows(self._cfg.memory_budget_mb << 20, resident_bytes(), target_bytes)
        starts = user_ranges(lengths, rows)
        folder = self._spill / "ranges"
        split_by_range(self._coded, self._kept, self._ids, starts, folder, self._progress)
        writer = ShardWriter(shard_dir, bounds)
        stats = write_ranges(folder, len(starts), self._coded.n_buckets, starts, self._ids, writer,
                             self._cfg.mu, self._progress)
        self.time_min, self.time_max = stats.pop("time_min"), stats.pop("time_max")
        order = ("mu", "max_train_interval_seconds", "max_input_interval_seconds",
                 "max_train_bucket", "zero_intervals_share", "bucket_histogram")
        self._interval = {k: stats[k] for k in order}
        log.info("streaming passes 5-6 done: %d user ranges, %d shards; peak RSS %d MB (budget %d MB)",
                 len(starts), len(writer.entries), peak_resident_bytes() >> 20, self._cfg.memory_budget_mb)
        return writer.entries

    def interval_stats(self) -> dict:
        assert self._interval is not None, "write_shards first"
        return self._interval


def prepare_log(cfg: PrepConfig, spill: Path) -> tuple[CanonicalData, StreamedLog]:
    """Passes 1-4 (the shards follow from `StreamedLog.write_shards`)."""
    problem = check_memory_budget(cfg.memory_budget_mb)
    if problem or cfg.memory_budget_mb <= 0:
        raise DataError(f"memory_budget_mb: {problem or 'the streaming path needs a budget > 0'}")
    if cfg.k_core < 1:
        raise DataError(f"k_core: expected >= 1, got {cfg.k_core}")
    progress = _Progress(cfg.progress)
    started = time.time()
    src = open_source(cfg)
    the_plan = plan(cfg, src.estimated_rows)
    log.info("streaming preparation: budget %d MB (baseline %d MB), chunks of %s rows, "
             "%d buckets (estimated %s rows), spill in %s", cfg.memory_budget_mb,
             the_plan.baseline >> 20, f"{the_plan.chunk_rows:,}", the_plan.n_buckets,
             f"{src.estimated_rows:,}", spill)
    rows = partition(src.chunks(the_plan.chunk_rows), spill / "raw", the_plan.n_buckets, progress)
    data = CanonicalData(src.source, src.name, None, src.items, src.inputs, src.rows_read,
                         src.drops, src.category_names)
    src._frames = None  # let the reader (and a whole-read log of the other sources) go
    if rows == 0:
        raise EmptyResultError(f"{src.name}: no valid interactions were read")
    coded = code_buckets(spill / "raw", spill / "coded", the_plan.n_buckets, progress)
    if coded.duplicates:
        _, user, item, ts = coded.first_duplicate
        data.drops.note("duplicate_row", coded.duplicates, f"e.g. user {user!r}, item {item!r}, t={ts}")
    kept = kcore(coded, cfg.k_core, max(cfg.k_core, 3), progress)
    data.drops.note(f"kcore_{cfg.k_core}", kept.removed)
    check_not_empty(kept, coded, cfg.k_core, src.name)
    ids = id_maps(coded, kept, progress)
    log.info("streaming passes 1-4 done in %.1fs: %s rows read, %s users, %s items, %s actions "
             "kept after %d k-core rounds; peak RSS so far %d MB", time.time() - started,
             f"{src.rows_read:,}", f"{len(ids.user_raw):,}", f"{len(ids.item_raw):,}",
             f"{int(ids.lengths.sum()):,}", kept.rounds, peak_resident_bytes() >> 20)
    return data, StreamedLog(ids, kept.rounds, spill, cfg, the_plan, coded, kept, progress)


def spill_folder(cfg: PrepConfig) -> Path:
    out = Path(cfg.out_dir)
    base = Path(cfg.spill_dir) if cfg.spill_dir else out.parent
    return base / f".{out.name}.spill-{os.getpid()}"


def remove_spill(spill: Path) -> None:
    shutil.rmtree(spill, ignore_errors=True)


class _Progress:
    """Progress lines on long work: at most one every 2 s, plus the ones marked `force`."""

    def __init__(self, enabled: bool):
        self.enabled, self.last = enabled, 0.0

    def __call__(self, message: str, force: bool = False) -> None:
        now = time.time()
        if self.enabled and (force or now - self.last >= 2.0):
            log.info("%s (RSS %d MB, peak %d MB)", message, resident_bytes() >> 20, peak_resident_bytes() >> 20)
            self.last = now
