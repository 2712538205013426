"""The preparation as one Ray Data pipeline, from raw files to shards (the default engine; the
design: docs/data_pipeline_design.md). On a cluster its tasks spread over the nodes.

    read parts -> groupby(bucket).map_groups: one deduplicated row per user (list columns)
    -> items as int32 codes of a sorted vocabulary (per-batch distinct items merged on the driver: O(items))
    -> k-core rounds: one map per round, per-batch item counts summed on the driver, users below
    -> dense item IDs (first kept seq per item, ordered on the driver: O(items))
    -> per user: time sort, dense items, the npy payload, the manifest's counts
    -> sort by raw user ID -> dense user IDs -> repartition(n_shards) -> the deterministic datasink

Rows live in Ray's object store (spilled to disk past its size); the driver holds O(items) and
the per-batch counts. Every step after the first shuffle reads one row per user, so no step
depends on how Ray cuts or merges blocks. Counts that a batch adds up (duplicates, interval
statistics, sizes) ride in a `stats` column that only the batch's first row fills.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data.context import ShuffleStrategy

from data_pipelines.canonical import CanonicalData
from data_pipelines.config import PrepConfig
from data_pipelines.preprocess import (EmptyResultError, Prepared, interval_counts, interval_summary,
                                       merge_interval_counts, sorted_id_order)
from data_pipelines.ray_read import ReadReport, merged_report, plan_parts, read_rows
from data_pipelines.report import DataError
from data_pipelines.shards import TAR_BLOCK, estimated_bytes, shard_count_for, write_samples
from data_pipelines.sources.common import file_name
from data_pipelines.sources.tabular import files as tabular_files, load_item_table
from hm4sr_dist.data.records import SPLITS, encode_user, split_count, user_key

log = logging.getLogger("data_pipelines.ray_prep")
ROWS_PER_PARTITION = 1 << 20      # shuffle partitions (and the rows one map_groups call holds)
USERS_ROW_GROUP = 1 << 20         # pq.write_table's default row group: users.parquet byte-identical
NO_STATS = None
SHUFFLE = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED


def prepare_log(cfg: PrepConfig) -> tuple[CanonicalData, "RayLog"]:
    """Read, dedupe, k-core, order and encode the log; the shards follow from `RayLog`."""
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True   # the sorted users keep their order into shards
    before = ctx.shuffle_strategy
    # Ray 2.60's default shuffle (SHUFFLE_V2) starts aggregator actors that hold CPUs: on a
    # 2-core box, ml-100k took 17 s warm with it and 2.7 s with the pull-based sort shuffle
    # (same bytes; docs/scaling.md has the 20M figures of both)
    ctx.shuffle_strategy = SHUFFLE
    try:
        return _prepare_log(cfg)
    finally:
        ctx.shuffle_strategy = before


def _prepare_log(cfg: PrepConfig) -> tuple[CanonicalData, "RayLog"]:
    started = time.time()
    parts, estimated = plan_parts(cfg)
    n_parts = max(2, math.ceil(estimated / ROWS_PER_PARTITION))
    report = ReadReport.remote()
    try:
        users = _run(lambda: read_rows(cfg, parts, 4 * n_parts, report)
                     .groupby("bucket", num_partitions=n_parts)
                     .map_groups(histories, batch_format="pyarrow").materialize())
        drops, rows_read, extra = merged_report(ray.get(report.all.remote()), cfg.strict)
    finally:
        ray.kill(report)
    data = _canonical(cfg, extra, drops, rows_read)
    read = _stats(users)
    total = sum(s["rows"] for s in read)
    placement = {"read": Counter(extra.pop("nodes")), "dedupe": Counter(s["node"] for s in read)}
    log.info("read %s rows (%s dropped) in %d parts on %d node(s); %s users, %s rows after dropping "
             "duplicates (%d groups on %d node(s))", f"{rows_read:,}", f"{sum(drops.counts.values()):,}",
             len(parts), len(placement["read"]), f"{users.count():,}", f"{total:,}", len(read),
             len(placement["dedupe"]))
    if total == 0:
        raise EmptyResultError(f"{data.name}: no valid interactions were read")
    dups = [s["dup"] for s in read if s["dup"]]
    if dups:
        _, user, item, ts = min(dups)
        drops.note("duplicate_row", sum(s["dups"] for s in read), f"e.g. user {user!r}, item {item!r}, t={ts}")
    vocab = _vocabulary(users)
    users = _run(lambda: users.map_batches(_coded, fn_kwargs={"vocab": vocab}, batch_format="pyarrow")
                 .materialize())
    k, k_user = cfg.k_core, max(cfg.k_core, 3)
    died, rounds, kept = _kcore(users, len(vocab), k, k_user)
    drops.note(f"kcore_{k}", total - kept)
    if kept == 0:
        raise EmptyResultError(f"{data.name}: nothing left after the {k}-core filter "
                               f"({total - kept} of {total} actions removed in {rounds} rounds); "
                               "lower k_core or check the input")
    state = {"died": died, "r": rounds, "k_user": k_user}
    item_raw, dense = _item_order(users, state, vocab)
    final = _run(lambda: users.map_batches(finish, batch_format="pyarrow",
                                           fn_kwargs={**state, "dense": dense, "mu": cfg.mu})
                 .materialize())
    prep = RayLog(final, item_raw, rounds, cfg.mu)
    prep.placement = {**placement, **prep.placement}
    log.info("placement (tasks per node, per step): %s",
             json.dumps({step: dict(nodes) for step, nodes in prep.placement.items()}))
    log.info("kept %s users, %s items, %s actions after %d k-core rounds (%.1fs)", f"{prep.n_users:,}",
             f"{prep.n_items:,}", f"{prep.n_actions:,}", rounds, time.time() - started)
    return data, prep


# -- one row per user --------------------------------------------------------------------------
def histories(rows: pa.Table) -> pa.Table:
    """map_groups UDF on one bucket of rows: duplicates (user, item, timestamp) dropped, the first
    in input order staying; one row per user with its items, times and seqs in input order."""
    rows = {name: rows[name].combine_chunks() for name in ("user", "item", "timestamp", "seq")}
    users = pc.dictionary_encode(rows["user"])
    u = users.indices.to_numpy()
    i = pc.dictionary_encode(rows["item"]).indices.to_numpy()
    t = rows["timestamp"].to_numpy()
    s = rows["seq"].to_numpy()
    order = np.lexsort((s, t, i, u))
    same = (u[order][1:] == u[order][:-1]) & (i[order][1:] == i[order][:-1]) & (t[order][1:] == t[order][:-1])
    dup = np.zeros(len(u), dtype=bool)
    dup[order[1:][same]] = True                  # all but the lowest seq of each equal run
    first_dup = None
    if dup.any():
        j = int(np.flatnonzero(dup)[np.argmin(s[dup])])
        first_dup = [int(s[j]), rows["user"][j].as_py(), rows["item"][j].as_py(), int(t[j])]
    keep = np.flatnonzero(~dup)
    keep = keep[np.lexsort((s[keep], u[keep]))]  # by user, then input order
    uk = u[keep]
    starts = np.flatnonzero(np.r_[True, uk[1:] != uk[:-1]])
    offsets = pa.array(np.r_[starts, len(keep)].astype(np.int32))
    take = pa.array(keep)
    stats = {"rows": len(keep), "dups": int(dup.sum()), "dup": first_dup, "node": _node()}
    return pa.table({
        "user": users.dictionary.take(pa.array(uk[starts])),
        "items": pa.ListArray.from_arrays(offsets, rows["item"].take(take)),
        "times": pa.ListArray.from_arrays(offsets, rows["timestamp"].take(take)),
        "seqs": pa.ListArray.from_arrays(offsets, rows["seq"].take(take)),
        "stats": _stats_column(len(starts), stats),
    })


def _node() -> str:
    """The Ray node a task runs on (the placement the cluster test and the progress lines show)."""
    return ray.get_runtime_context().get_node_id()


def _stats_column(n: int, stats: dict) -> pa.Array:
    return pa.array([json.dumps(stats)] + [NO_STATS] * (n - 1), pa.string()) if n else pa.array([], pa.string())


def _stats(ds) -> list[dict]:
    only = ds.select_columns(["stats"]).map_batches(_filled, batch_format="pyarrow")
    return [json.loads(v) for v in _arrow(only, pa.schema([("stats", pa.string())]))["stats"].to_pylist()]


def _filled(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_valid(batch["stats"]))


def _arrow(ds, empty: pa.Schema) -> pa.Table:
    """A small dataset's rows on the driver, as one Arrow table (`empty`'s columns when none)."""
    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    return pa.concat_tables(tables) if tables else empty.empty_table()


# -- item codes ----------------------------------------------------------------------------------
def _distinct(batch: pa.Table) -> pa.Table:
    return pa.table({"item": pc.unique(pc.list_flatten(batch["items"].combine_chunks()))})


VOCAB_MERGE_ROWS = 1 << 22   # per-batch distinct items gathered before the driver merges them


def _vocabulary(users) -> pa.Array:
    """The distinct raw items, sorted (O(items) on the driver): item code = index in it. Each
    batch's distinct items stream to the driver, which merges them as they come; at 100M actions
    a `groupby("item").count()` shuffle of the same rows took 684 s of a 2-core box."""
    distinct, pending, held = pa.array([], pa.string()), [], 0
    for batch in users.map_batches(_distinct, batch_format="pyarrow").iter_batches(
            batch_size=None, batch_format="pyarrow"):
        pending.append(batch["item"].combine_chunks().cast(pa.string()))
        held += batch.num_rows
        if held >= VOCAB_MERGE_ROWS:
            distinct, pending, held = _union(distinct, pending), [], 0
    distinct = _union(distinct, pending)
    return distinct.take(pc.sort_indices(distinct))


def _union(distinct: pa.Array, pending: list[pa.Array]) -> pa.Array:
    merged = pc.unique(pa.chunked_array([distinct, *pending], pa.string()))
    return merged.combine_chunks() if isinstance(merged, pa.ChunkedArray) else merged


def _coded(batch: pa.Table, vocab: pa.Array) -> pa.Table:
    """The user rows with each item as its int32 code: the k-core rounds then index numpy arrays
    instead of hashing strings."""
    lists = batch["items"].combine_chunks()
    codes = pc.index_in(pc.list_flatten(lists), value_set=vocab).cast(pa.int32())
    offsets = lists.offsets                       # of a slice: shifted by its first offset
    rebuilt = pa.ListArray.from_arrays(pc.subtract(offsets, offsets[0]), codes)
    return batch.set_column(batch.schema.get_field_index("items"), "items", rebuilt)


# -- k-core --------------------------------------------------------------------------------------
NEVER = np.iinfo(np.int32).max      # the round of an item that never falls below k


def _kept(batch: pa.Table, died: np.ndarray, r: int, k_user: int):
    """(flat item codes, owning row, kept mask, users alive) of round r. An item is alive in r
    unless it fell in an earlier round; a user is alive in r iff it held >= k_user rows of items
    alive in r-1 (counts only fall, so this is "never fell below")."""
    lists = batch["items"].combine_chunks()
    codes = pc.list_flatten(lists).to_numpy()
    owner = pc.list_parent_indices(lists).to_numpy()
    fell = died[codes]
    if r == 1:
        user_alive = np.ones(batch.num_rows, dtype=bool)
    else:
        user_alive = np.bincount(owner[fell >= r - 1], minlength=batch.num_rows) >= k_user
    kept = user_alive[owner] & (fell >= r)
    return codes, owner, kept, user_alive


def _round_counts(batch: pa.Table, died: np.ndarray, r: int, k_user: int) -> pa.Table:
    """Round r's kept rows per item code, and (on the batch's first row only, so that the sums
    over the items add up over batches) the batch's kept rows and users below `k_user`."""
    codes, owner, kept, user_alive = _kept(batch, died, r, k_user)
    count = np.bincount(owner[kept], minlength=batch.num_rows)
    below = int((user_alive & (count > 0) & (count < k_user)).sum())
    per_item = np.bincount(codes[kept], minlength=len(died))
    present = np.flatnonzero(per_item)
    firsts = np.zeros((2, len(present)), dtype=np.int64)
    if len(present):
        firsts[:, 0] = int(kept.sum()), below
    return pa.table({"code": present.astype(np.int32), "n": per_item[present].astype(np.int64),
                     "kept": firsts[0], "below": firsts[1]})


def _kcore(users, n_items: int, k: int, k_user: int) -> tuple[np.ndarray, int, int]:
    """(round each item code fell in, NEVER if not; rounds; rows kept): `preprocess.kcore`'s
    loop, one Ray Data map job per round over the user rows. The per-batch item counts (sparse:
    the codes a batch holds) are summed on the driver into one O(items) array: a hash
    aggregation per round cost seconds of scheduling each on a loaded 2-core box."""
    died = np.full(n_items, NEVER, dtype=np.int32)
    schema = pa.schema([("code", pa.int32()), ("n", pa.int64()), ("kept", pa.int64()), ("below", pa.int64())])
    r = 0
    while True:
        r += 1
        counts = _arrow(users.map_batches(_round_counts, batch_format="pyarrow",
                                          fn_kwargs={"died": died, "r": r, "k_user": k_user}), schema)
        per_item = np.bincount(counts["code"].to_numpy(), weights=counts["n"].to_numpy(),
                               minlength=n_items).astype(np.int64)
        falling = np.flatnonzero((per_item > 0) & (per_item < k))
        kept, below = (int(pc.sum(counts[c]).as_py() or 0) for c in ("kept", "below"))
        log.info("k-core round %d: %s rows kept; %s users and %s items below %d/%d", r, f"{kept:,}",
                 f"{below:,}", f"{len(falling):,}", k_user, k)
        if below == 0 and len(falling) == 0:
            return died, r, kept
        died = died.copy()
        died[falling] = r


# -- dense IDs -----------------------------------------------------------------------------------
def _first_seen(batch: pa.Table, died: np.ndarray, r: int, k_user: int) -> pa.Table:
    """The first kept seq of each item code the batch holds (its user rows are in input order)."""
    codes, _, kept, _ = _kept(batch, died, r, k_user)
    seqs = pc.list_flatten(batch["seqs"].combine_chunks()).to_numpy()[kept]
    first = np.full(len(died), np.iinfo(np.int64).max)
    np.minimum.at(first, codes[kept], seqs)
    present = np.flatnonzero(first < np.iinfo(np.int64).max)
    return pa.table({"code": present.astype(np.int32), "seq": first[present]})


def _item_order(users, state: dict, vocab: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """(dense item ID - 1 -> raw ID, item code -> dense item ID or 0): kept items by first kept
    appearance, then `sorted_id_order` (the rule of `preprocess._sorted_ids`). O(items)."""
    per_batch = _arrow(users.map_batches(_first_seen, fn_kwargs=state, batch_format="pyarrow"),
                       pa.schema([("code", pa.int32()), ("seq", pa.int64())]))
    first = np.full(len(vocab), np.iinfo(np.int64).max)
    np.minimum.at(first, per_batch["code"].to_numpy(), per_batch["seq"].to_numpy())
    codes = np.flatnonzero(first < np.iinfo(np.int64).max)
    codes = codes[np.argsort(first[codes], kind="stable")]      # first kept appearance
    order = sorted_id_order(vocab.take(pa.array(codes)))
    dense = np.zeros(len(vocab), dtype=np.int64)
    dense[codes[order]] = np.arange(1, len(order) + 1)
    return vocab.take(pa.array(codes[order])), dense


def _int_keys(users: pa.Array) -> pa.Array:
    """Each raw user ID as Python's `int` reads it (int64), null where it is not one."""
    try:
        return pc.cast(users, pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        out = []
        for v in users.to_pylist():
            try:
                x = int(v)
                out.append(x if -(1 << 63) <= x < (1 << 63) else None)
            except (ValueError, TypeError):
                out.append(None)
        return pa.array(out, pa.int64())


def finish(batch: pa.Table, died: np.ndarray, r: int, k_user: int, dense: np.ndarray, mu: float) -> pa.Table:
    """Kept users of the final round: stable time sort (ties in input order), dense item IDs, the
    `seq.npy` payload, the keys of the dense user order, and the batch's manifest counts."""
    codes, owner, kept, _ = _kept(batch, died, r, k_user)
    at = np.flatnonzero(kept)
    owner = owner[at]
    times = pc.list_flatten(batch["times"].combine_chunks()).to_numpy()[at]
    seqs = pc.list_flatten(batch["seqs"].combine_chunks()).to_numpy()[at]
    dense = dense[codes[at]]
    live, first_at, lengths = np.unique(owner, return_index=True, return_counts=True)
    order = np.lexsort((seqs, times, owner))
    items, times = dense[order].astype(np.int64), times[order]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    payloads = [encode_user(items[offsets[j]:offsets[j + 1]], times[offsets[j]:offsets[j + 1]])
                for j in range(len(live))]
    users = batch["user"].combine_chunks().take(pa.array(live))
    keys = _int_keys(users)
    part = Prepared(np.arange(len(live)), np.zeros(0), offsets, items, times, 0)
    stats = {"users": len(live), "actions": int(lengths.sum()), "node": _node(),
             "bytes": estimated_bytes(lengths) - 2 * TAR_BLOCK, "not_int": keys.null_count,
             "tmin": int(times.min(initial=1 << 62)), "tmax": int(times.max(initial=-1)),
             "interval": interval_counts(part, mu),
             **{s: int(sum(split_count(int(n), s) for n in lengths)) for s in SPLITS}}
    return pa.table({"user": users, "int_key": keys, "first_seq": pa.array(seqs[first_at]),
                     "payload": pa.array(payloads, pa.binary()), "stats": _stats_column(len(live), stats)})


# -- dense user IDs, users.parquet and shards ----------------------------------------------------
class RayLog:
    """What `prepare.py` needs of the prepared log (as `streaming_prep.StreamedLog`), held as
    Ray datasets: the user rows sorted into dense user order, and the merged counts."""

    def __init__(self, final, item_raw: pa.Array, rounds: int, mu: float):
        stats = _stats(final)
        self.placement = {"encode": Counter(s["node"] for s in stats)}   # node -> tasks, per step
        self.item_raw, self.kcore_rounds = item_raw, rounds
        self.n_users = sum(s["users"] for s in stats)
        self.n_actions = sum(s["actions"] for s in stats)
        self.n_items = len(item_raw)
        self.samples = {s: sum(x[s] for x in stats) for s in SPLITS}
        self.bytes = sum(s["bytes"] for s in stats) + 2 * TAR_BLOCK
        self.time_min = min(s["tmin"] for s in stats)
        self.time_max = max(s["tmax"] for s in stats)
        merged = None
        for s in stats:
            merged = merge_interval_counts(merged, s["interval"])
        self._interval = interval_summary(merged, mu)
        # every kept raw ID an integer: numeric order, equal integers by first appearance
        self.sort_keys = ["int_key", "first_seq"] if sum(s["not_int"] for s in stats) == 0 else ["user"]
        self.sorted = _run(lambda: final.select_columns(["user", "int_key", "first_seq", "payload"])
                           .sort(self.sort_keys).materialize())

    def interval_stats(self) -> dict:
        return self._interval

    def write_users(self, path: Path) -> None:
        """users.parquet as `pq.write_table` writes it (same row groups), streamed in order."""
        schema = pa.schema([("user_id", pa.int64()), ("raw_id", pa.string())])
        uid = 0
        with pq.ParquetWriter(path, schema) as writer:
            for batch in self.sorted.select_columns(["user"]).iter_batches(
                    batch_size=USERS_ROW_GROUP, batch_format="pyarrow"):
                n = batch.num_rows
                writer.write_table(pa.table({"user_id": pa.array(np.arange(uid, uid + n, dtype=np.int64)),
                                             "raw_id": batch["user"].cast(pa.string())}, schema=schema))
                uid += n
        if uid != self.n_users:
            raise RuntimeError(f"{path}: wrote {uid} users, expected {self.n_users}")

    def write_shards(self, shard_dir: Path | str, target_bytes: int, min_shards: int, *,
                     filesystem=None) -> list[dict]:
        n_shards = shard_count_for(self.bytes, self.n_users, target_bytes, min_shards)
        heads = _arrow(self.sorted.map_batches(_head, batch_size=None, batch_format="pyarrow"),
                       pa.schema([("user", pa.string()), ("int_key", pa.int64()), ("first_seq", pa.int64()),
                                  ("n", pa.int64())]))
        heads = heads.sort_by([(k, "ascending") for k in self.sort_keys])
        offsets, at = {}, 0
        for user, n in zip(heads["user"].to_pylist(), heads["n"].to_pylist()):
            offsets[user] = (at, n)
            at += n
        if at != self.n_users:
            raise RuntimeError(f"the sorted users hold {at} rows, expected {self.n_users}")
        keyed = self.sorted.map_batches(_keyed, batch_size=None, batch_format="pyarrow",
                                        fn_kwargs={"offsets": offsets})
        entries = _run(lambda: write_samples(keyed, shard_dir, n_shards, filesystem=filesystem))
        log.info("wrote %d shards of %s users; object store spilled %s MiB so far", len(entries),
                 f"{self.n_users:,}", spilled_mib())
        return entries


def spilled_mib() -> str:
    """Bytes the object store spilled to disk (Ray's own memory summary), or '?' if unreadable."""
    try:
        from ray._private.internal_api import memory_summary

        summary = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
        found = re.search(r"Spilled (\d+) MiB", summary)
        return found.group(1) if found else "0"
    except Exception:  # noqa: BLE001 - an internal API: the figure is informative only
        return "?"


def _head(block: pa.Table) -> pa.Table:
    """One row per block of the sorted users: its first user's sort keys and its row count."""
    head = block.slice(0, 1).select(["user", "int_key", "first_seq"])
    return head.append_column("n", pa.array([block.num_rows] * head.num_rows, pa.int64()))


def _keyed(block: pa.Table, offsets: dict) -> dict:
    """WebDataset rows: the block's users numbered from its offset in the dense user order."""
    if block.num_rows == 0:
        return {"__key__": np.array([], dtype=object), "seq.npy": np.array([], dtype=object)}
    at, n = offsets.get(block["user"][0].as_py(), (None, None))
    if at is None or n != block.num_rows:  # the blocks differ from the ones counted: never guess
        raise RuntimeError(f"sorted block starting at user {block['user'][0].as_py()!r} was not counted "
                           f"as {block.num_rows} rows")
    keys = [user_key(at + j) for j in range(block.num_rows)]
    return {"__key__": np.array(keys, dtype=object),
            "seq.npy": np.array(block["payload"].to_pylist(), dtype=object)}


# -- the driver's view -----------------------------------------------------------------------------
def _canonical(cfg: PrepConfig, extra: dict, drops, rows_read: int) -> CanonicalData:
    if cfg.source == "tabular":
        items = load_item_table(cfg) if cfg.items else None
        inputs = tabular_files(cfg)                       # local paths, or URIs as given
        return CanonicalData("tabular", cfg.name or Path(file_name(cfg.interactions)).stem, None, items,
                             inputs, rows_read, drops)
    return CanonicalData(extra["source"], extra["name"], None, extra["items"],
                         [Path(p) for p in extra["inputs"]], rows_read, drops, extra["category_names"])


def _run(step):
    """Run a Ray step; a `DataError` raised inside a task comes back as the same `DataError`."""
    try:
        return step()
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - Ray wraps task errors in its own types
        cause = _data_error(exc)
        if cause is None:
            raise
        raise DataError(str(cause)) from None


def _data_error(exc: BaseException | None, depth: int = 0) -> DataError | None:
    if exc is None or depth > 12:
        return None
    if isinstance(exc, DataError) and not isinstance(exc, ray.exceptions.RayError):
        return exc
    for nxt in (getattr(exc, "cause", None), exc.__cause__, exc.__context__):
        if isinstance(nxt, BaseException) and (found := _data_error(nxt, depth + 1)) is not None:
            return found
    return None
