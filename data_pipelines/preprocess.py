"""Preprocessing of spec §1 / paper §5.1.1 on canonical interactions.

1. drop duplicate (user, item, timestamp) rows (the first occurrence stays);
2. stable time sort per user (ties keep input order);
3. iterative k-core: drop users and items with fewer than k actions until both hold;
   Users also need n >= 3 for the leave-one-out split, so the user threshold is max(k, 3)
   inside the same loop (it differs from k only when k < 3);
4. dense IDs: items 1..n_items, users 0..n_users-1, both in sorted raw-ID order (numeric order
   when every raw ID is an integer); 0 = the padding item;
5. per-user arrays (CSR: offsets into flat item/time arrays) and interval statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from data_pipelines.report import DataError, DropLog
from hm4sr_dist.data.records import split_count


class EmptyResultError(DataError):
    """Nothing left after filtering."""


@dataclass
class Prepared:
    user_raw: np.ndarray      # (n_users,) raw user IDs, index = dense user ID
    item_raw: np.ndarray      # (n_items,) raw item IDs, index + 1 = dense item ID
    offsets: np.ndarray       # (n_users + 1,) int64: user u owns [offsets[u], offsets[u+1])
    items: np.ndarray         # (n_actions,) int64 dense item IDs, per user oldest first
    times: np.ndarray         # (n_actions,) int64 unix seconds
    kcore_rounds: int

    @property
    def n_users(self) -> int:
        return len(self.user_raw)

    @property
    def n_items(self) -> int:
        return len(self.item_raw)

    @property
    def n_actions(self) -> int:
        return len(self.items)

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def user(self, u: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.offsets[u], self.offsets[u + 1]
        return self.items[lo:hi], self.times[lo:hi]


def _sorted_ids(values: np.ndarray) -> np.ndarray:
    """Unique raw IDs, numerically sorted when all are integers (so '10' follows '9')."""
    unique = pd.unique(values)
    try:
        order = np.argsort(np.array([int(v) for v in unique], dtype=np.int64), kind="stable")
    except (ValueError, OverflowError):
        order = np.argsort(unique.astype(str), kind="stable")
    return unique[order]


def raw_id_column(values: np.ndarray | pa.Array) -> pa.Array:
    """Raw IDs as an Arrow string column, from `Prepared` (numpy) or the streaming path (Arrow)."""
    if isinstance(values, pa.Array):
        return values.cast(pa.string())
    return pa.array(values.astype(str), pa.string())


def sorted_id_order(distinct: pa.Array, chunk: int = 1 << 16) -> np.ndarray:
    """The order `_sorted_ids` puts these distinct raw IDs (strings) in, without making each a
    Python object: the streaming path calls it on millions of IDs within a memory budget.

    Arrow's integer cast accepts a subset of what Python's `int` does (no spaces, '_' or
    non-ASCII digits), so when it refuses, Python decides chunk by chunk, as `_sorted_ids` would.
    Strings otherwise sort by code point (= UTF-8 byte order, Arrow's order); distinct values
    have no ties there, so the sort's stability does not matter.
    """
    try:
        as_int = pc.cast(distinct, pa.int64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        as_int = _python_ints(distinct, chunk)
    if as_int is not None:
        return np.argsort(as_int, kind="stable")  # equal integers ('7', '007'): first seen first
    return pc.sort_indices(distinct).to_numpy()


def _python_ints(values: pa.Array, chunk: int) -> np.ndarray | None:
    out = np.empty(len(values), dtype=np.int64)
    for start in range(0, len(values), chunk):
        try:
            out[start:start + chunk] = [int(v) for v in values.slice(start, chunk).to_pylist()]
        except (ValueError, OverflowError, TypeError):
            return None
    return out


def kcore(user_codes: np.ndarray, item_codes: np.ndarray, k: int,
          k_user: int | None = None) -> tuple[np.ndarray, int]:
    """Boolean keep-mask of the iterative k-core over rows, and the number of rounds.

    Items need >= k rows, users >= k_user (default k).
    """
    k_user = k if k_user is None else k_user
    keep = np.ones(len(user_codes), dtype=bool)
    rounds = 0
    while True:
        rounds += 1
        u_count = np.bincount(user_codes[keep], minlength=user_codes.max(initial=-1) + 1)
        i_count = np.bincount(item_codes[keep], minlength=item_codes.max(initial=-1) + 1)
        bad = keep & ((u_count[user_codes] < k_user) | (i_count[item_codes] < k))
        if not bad.any():
            return keep, rounds
        keep &= ~bad


def preprocess(df: pd.DataFrame, drops: DropLog, k: int = 5, source_name: str = "") -> Prepared:
    if k < 1:
        raise DataError(f"k_core: expected >= 1, got {k}")
    if df.empty:
        raise EmptyResultError(f"{source_name}: no valid interactions were read")
    df = df.reset_index(drop=True)
    dup = df.duplicated(subset=["user", "item", "timestamp"], keep="first").to_numpy()
    if dup.any():
        first = df[dup].iloc[0]
        drops.note("duplicate_row", int(dup.sum()),
                   f"e.g. user {first['user']!r}, item {first['item']!r}, t={first['timestamp']}")
        df = df[~dup].reset_index(drop=True)

    user_codes, _ = pd.factorize(df["user"])
    item_codes, _ = pd.factorize(df["item"])
    keep, rounds = kcore(user_codes, item_codes, k, k_user=max(k, 3))
    removed = int((~keep).sum())
    drops.note(f"kcore_{k}", removed)
    df = df[keep]
    if df.empty:
        raise EmptyResultError(f"{source_name}: nothing left after the {k}-core filter "
                               f"({removed} of {len(keep)} actions removed in {rounds} rounds); "
                               "lower k_core or check the input")

    user_raw = _sorted_ids(df["user"].to_numpy())
    item_raw = _sorted_ids(df["item"].to_numpy())
    uid = pd.Index(user_raw).get_indexer(df["user"])
    iid = pd.Index(item_raw).get_indexer(df["item"]) + 1
    # Stable time sort per user: lexsort is stable, so equal (user, time) keep input order.
    order = np.lexsort((df["timestamp"].to_numpy(), uid))
    items = iid[order].astype(np.int64)
    times = df["timestamp"].to_numpy()[order].astype(np.int64)
    counts = np.bincount(uid, minlength=len(user_raw))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return Prepared(user_raw, item_raw, offsets, items, times, rounds)


def split_sizes(prep: Prepared) -> dict[str, int]:
    lengths = prep.lengths()
    return {s: int(sum(split_count(int(n), s) for n in lengths)) for s in ("train", "valid", "test")}


HIST_EDGES = [0, 1, 500, 1000, 1500, 2000, 2500, 3000, 1 << 62]


def interval_stats(prep: Prepared, mu: float) -> dict:
    """Largest gaps between consecutive items, within the training part (what training sees) and
    within the test input, plus a histogram of training-part buckets floor(mu*log2(a+1))."""
    return interval_summary(interval_counts(prep, mu), mu)


def interval_counts(prep: Prepared, mu: float) -> dict:
    """`interval_stats` as whole numbers that add up over disjoint sets of users (maxima, counts):
    a preparation done in pieces merges these, then calls `interval_summary` once."""
    lengths = prep.lengths()
    gaps = np.diff(prep.times)
    pos = np.arange(len(prep.times))
    owner = np.repeat(np.arange(prep.n_users), lengths)
    index_in_user = pos - prep.offsets[owner]
    # gaps[j] = times[j+1]-times[j], valid when j+1 is in the same user; j+1's index within user:
    nxt_idx = index_in_user[1:]
    same = owner[1:] == owner[:-1]
    n_of = lengths[owner[1:]]
    train_gap = same & (nxt_idx <= n_of - 3)   # both ends inside the training part items[:n-2]
    input_gap = same & (nxt_idx <= n_of - 2)   # both ends inside the test input items[:n-1]
    a_train = gaps[train_gap]
    a_input = gaps[input_gap]
    buckets = np.floor(mu * np.log2(a_train.astype(np.float64) + 1.0)).astype(np.int64)
    hist = np.histogram(buckets, bins=HIST_EDGES)[0] if len(buckets) else np.zeros(8, dtype=int)
    return {"max_train": int(a_train.max(initial=0)), "max_input": int(a_input.max(initial=0)),
            "max_bucket": int(buckets.max(initial=0)), "zeros": int((a_train == 0).sum()),
            "gaps": int(len(a_train)), "hist": [int(c) for c in hist]}


def merge_interval_counts(a: dict | None, b: dict) -> dict:
    if a is None:
        return dict(b)
    return {"max_train": max(a["max_train"], b["max_train"]), "max_input": max(a["max_input"], b["max_input"]),
            "max_bucket": max(a["max_bucket"], b["max_bucket"]), "zeros": a["zeros"] + b["zeros"],
            "gaps": a["gaps"] + b["gaps"], "hist": [x + y for x, y in zip(a["hist"], b["hist"])]}


def interval_summary(c: dict, mu: float) -> dict:
    # zeros / gaps is exactly numpy's mean of the boolean array (an exact float64 sum, one division)
    return {
        "mu": mu,
        "max_train_interval_seconds": c["max_train"],
        "max_input_interval_seconds": c["max_input"],
        "max_train_bucket": c["max_bucket"],
        "zero_intervals_share": c["zeros"] / c["gaps"] if c["gaps"] else 0.0,
        "bucket_histogram": {f"[{lo},{hi})": n for lo, hi, n in
                             zip(HIST_EDGES[:-1], ["inf" if h == 1 << 62 else h for h in HIST_EDGES[1:]],
                                 c["hist"])},
    }
