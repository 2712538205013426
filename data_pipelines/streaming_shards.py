"""Streaming preparation, passes 5-6: kept rows -> ranges of dense user IDs -> per-user sequences
-> the WebDataset shards of `shards.py`, plus the manifest's interval statistics.

Pass 5 re-scans the coded buckets once and splits the kept rows, already in dense IDs, into R
files per range of dense users (each range sized to the budget). Pass 6 loads one range at a time,
sorts it by (user, time, input position), the order of the in-memory stable time sort, and hands
each user's record to the shard being written. Shard boundaries are the ones Ray Data's split
repartition gives `shards.write_shards` (equal user counts, cut at int(j * n / n_shards)
accumulated in floating point), and each tar is streamed to disk member by member with the
members `shards.DeterministicTarDatasink` writes (`shards.add_member`: same members, same bytes). The manifest counts come from the sequences as written: reading
every shard back (`shards.scan_shard`, `verify=True`) doubles the time of this pass
(about 1 ms per user on 2 shared cores), so it is off by default.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_pipelines.preprocess import Prepared, interval_stats
from data_pipelines.shards import add_member, open_tar_stream, scan_shard
from data_pipelines.streaming_kcore import IdMaps, Kept
from data_pipelines.streaming_partition import Coded
from hm4sr_dist.data.manifest import sha256_file
from hm4sr_dist.data.records import SPLITS, encode_user, split_count, user_key


def ray_split_bounds(n_rows: int, n_blocks: int) -> list[int]:
    """Block starts of Ray Data's `repartition(n_blocks)` without shuffle (split_repartition)."""
    if n_blocks == 1:
        return [0, n_rows]
    cuts, cur = [0], 0.0
    for _ in range(n_blocks - 1):
        cur += n_rows / n_blocks
        cuts.append(int(cur))
    return cuts + [n_rows]


def user_ranges(lengths: np.ndarray, rows_per_range: int) -> np.ndarray:
    """Starts of consecutive dense-user ranges holding about `rows_per_range` kept rows each."""
    ends = np.cumsum(lengths)
    starts = [0]
    while ends[-1] - (ends[starts[-1] - 1] if starts[-1] else 0) > rows_per_range:
        base = ends[starts[-1] - 1] if starts[-1] else 0
        nxt = int(np.searchsorted(ends, base + rows_per_range, side="right"))
        starts.append(max(nxt, starts[-1] + 1))  # a user longer than the range gets its own
        if starts[-1] >= len(lengths):
            starts.pop()
            break
    return np.array(starts, dtype=np.int64)


def split_by_range(coded: Coded, kept: Kept, ids: IdMaps, starts: np.ndarray, folder: Path,
                   progress) -> None:
    """Pass 5: every kept row, in dense IDs, into the file of its (range, bucket)."""
    folder.mkdir(parents=True, exist_ok=True)
    for b in range(coded.n_buckets):
        u, i, t, s = coded.load(b, "u", "i", "t", "s")
        m = kept.mask(u, i)
        uid, iid, t, s = ids.user_dense[u[m]], ids.item_dense[i[m]], t[m], s[m]
        r = np.searchsorted(starts, uid, side="right") - 1
        order = np.argsort(r, kind="stable")
        bounds = np.searchsorted(r[order], np.arange(len(starts) + 1))
        rows = np.stack([uid, iid, t, s])[:, order]
        for k in range(len(starts)):
            if bounds[k + 1] > bounds[k]:
                np.save(folder / f"range-{k:05d}-{b:05d}.npy", rows[:, bounds[k]:bounds[k + 1]])
        progress(f"bucket {b + 1}/{coded.n_buckets} split into {len(starts)} user ranges",
                 force=b + 1 == coded.n_buckets)


class ShardWriter:
    """Writes user records in dense order, straight into shard j's tar until user bounds[j+1]:
    a shard is never held in memory (on a skewed log the first shard, of the heaviest users, was
    380 MB of records at 100M actions)."""

    def __init__(self, shard_dir: Path, bounds: list[int], verify: bool = False):
        self.dir, self.bounds, self.verify = shard_dir, bounds, verify
        self.dir.mkdir(parents=True, exist_ok=True)
        self.next_uid, self.entries = 0, []
        self.counts = self._zero()
        self._file = self._tar = None

    @staticmethod
    def _zero() -> dict:
        return {"users": 0, "actions": 0, **{s: 0 for s in SPLITS}}

    def _name(self) -> str:
        return f"shard-{len(self.entries):05d}.tar"

    def add(self, uid: int, items: np.ndarray, times: np.ndarray) -> None:
        assert uid == self.next_uid, (uid, self.next_uid)
        if self._tar is None:
            self._file = open(self.dir / self._name(), "wb")
            self._tar = open_tar_stream(self._file)
        add_member(self._tar, user_key(uid), "seq.npy", encode_user(items, times))
        n = len(items)
        self.counts["users"] += 1
        self.counts["actions"] += n
        for split in SPLITS:
            self.counts[split] += split_count(n, split)
        self.next_uid += 1
        if self.next_uid == self.bounds[len(self.entries) + 1]:
            self._flush()

    def _flush(self) -> None:
        name = self._name()
        self._tar.close()
        self._file.close()
        self._file = self._tar = None
        if self.verify:
            info = scan_shard(self.dir / name)
            info.pop("first_key")
            assert info == self.counts, (name, info, self.counts)
        self.entries.append({"file": name, "sha256": sha256_file(self.dir / name),
                             "bytes": (self.dir / name).stat().st_size, **self.counts})
        self.counts = self._zero()


def write_ranges(folder: Path, n_ranges: int, n_buckets: int, starts: np.ndarray,
                 ids: IdMaps, writer: ShardWriter, mu: float, progress) -> dict:
    """Pass 6: sort each range, emit its users; returns interval stats merged over ranges."""
    merged: dict = {}
    for k in range(n_ranges):
        parts = [np.load(p) for p in (folder / f"range-{k:05d}-{b:05d}.npy" for b in range(n_buckets))
                 if p.is_file()]
        uid, iid, t, s = np.concatenate(parts, axis=1) if parts else np.zeros((4, 0), np.int64)
        del parts
        order = np.lexsort((s, t, uid))  # user, then time, then input order (stable sort ties)
        uid, iid, t = uid[order], iid[order], t[order]
        lo = int(starts[k])
        hi = int(starts[k + 1]) if k + 1 < n_ranges else len(ids.lengths)
        offsets = np.concatenate([[0], np.cumsum(ids.lengths[lo:hi])]).astype(np.int64)
        assert offsets[-1] == len(uid), (k, offsets[-1], len(uid))
        for j in range(hi - lo):
            writer.add(lo + j, iid[offsets[j]:offsets[j + 1]], t[offsets[j]:offsets[j + 1]])
        part = Prepared(np.arange(hi - lo), np.zeros(0), offsets, iid, t, 0)
        _merge_interval(merged, interval_stats(part, mu), ids.lengths[lo:hi])
        merged["time_min"] = min(merged.get("time_min", 1 << 62), int(t.min(initial=1 << 62)))
        merged["time_max"] = max(merged.get("time_max", -1), int(t.max(initial=-1)))
        progress(f"range {k + 1}/{n_ranges}: users {lo:,}-{hi - 1:,} -> shards "
                 f"({len(writer.entries)} written)", force=k + 1 == n_ranges)
        for b in range(n_buckets):
            (folder / f"range-{k:05d}-{b:05d}.npy").unlink(missing_ok=True)
    merged["zero_intervals_share"] = (merged.pop("_zeros") / merged["_gaps"]
                                      if merged["_gaps"] else 0.0)
    merged.pop("_gaps")
    return merged


def _merge_interval(acc: dict, part: dict, lengths: np.ndarray) -> None:
    """Per-range `interval_stats` -> whole-log ones: maxima, summed histograms, the zero share
    recovered as a count (training-part gaps per user: n - 3)."""
    gaps = int(np.maximum(lengths - 3, 0).sum())
    if not acc:
        acc.update({k: v for k, v in part.items() if k != "zero_intervals_share"})
        acc["bucket_histogram"] = dict(part["bucket_histogram"])
        acc["_zeros"], acc["_gaps"] = 0, 0
    else:
        for key in ("max_train_interval_seconds", "max_input_interval_seconds", "max_train_bucket"):
            acc[key] = max(acc[key], part[key])
        for key, n in part["bucket_histogram"].items():
            acc["bucket_histogram"][key] += n
    acc["_zeros"] += int(round(part["zero_intervals_share"] * gaps))
    acc["_gaps"] += gaps
