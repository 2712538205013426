"""The rules of spec §1 / paper §5.1.1 that both preparation engines share (ray_prep.py, and
streaming_prep.py on one machine), and the per-user arrays they are measured on.

1. duplicate (user, item, timestamp) rows dropped (the first occurrence stays);
2. stable time sort per user (ties keep input order);
3. iterative k-core: users and items with fewer than k actions dropped until both hold; users
   also need n >= 3 for the leave-one-out split, so the user threshold is max(k, 3) in the loop;
4. dense IDs: items 1..n_items, users 0..n_users-1, both in sorted raw-ID order (numeric order
   when every raw ID is an integer, `sorted_id_order`); 0 = the padding item;
5. interval statistics of the per-user sequences (`interval_counts`, `interval_summary`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_pipelines.report import DataError
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


def raw_id_column(values: np.ndarray | pa.Array) -> pa.Array:
    """Raw IDs as an Arrow string column, from `Prepared` (numpy) or the streaming path (Arrow)."""
    if isinstance(values, pa.Array):
        return values.cast(pa.string())
    return pa.array(values.astype(str), pa.string())


def sorted_id_order(distinct: pa.Array, chunk: int = 1 << 16) -> np.ndarray:
    """The dense-ID order of these distinct raw IDs (strings): numeric when every one is an
    integer as Python's `int` reads it (equal integers such as '7' and '007' keep the order they
    come in: first appearance), else code-point order. No Python object per ID when Arrow can
    cast: both engines call it on millions of IDs.

    Arrow's integer cast accepts a subset of what Python's `int` does (no spaces, '_' or
    non-ASCII digits), so when it refuses, Python decides chunk by chunk.
    Strings otherwise sort by code point (= UTF-8 byte order, Arrow's order); distinct values
    have no ties there, so the sort's stability does not matter.
    """
    try:
        as_int = pc.cast(distinct, pa.int64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        as_int = _python_ints(distinct, chunk)   # Python decides, chunk by chunk
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
