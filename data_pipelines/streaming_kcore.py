"""Streaming preparation, passes 3-4: iterative k-core by re-scanning the coded buckets, then the
dense ID maps.

Same result and round count as `preprocess.kcore`: there a row goes when its user or item count
(over the rows still kept) is below the threshold; since counts only fall, a kept row is exactly
one whose user and item have never fallen below, so per-pass counts of users and items
(O(users + items)) replace the per-row mask. A round whose counts leave every kept row in place
(no count in [1, threshold)) ends the loop, as `bad.any()` is False there.

Dense IDs follow `preprocess._sorted_ids`: `preprocess.sorted_id_order` orders the kept raw IDs,
taken in order of first kept appearance (the order `pd.unique` sees in the in-memory path), in
Arrow, since millions of Python strings would not fit the budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from data_pipelines.preprocess import EmptyResultError, sorted_id_order
from data_pipelines.streaming_partition import Coded


@dataclass
class Kept:
    u_count: np.ndarray       # kept rows per user code
    i_count: np.ndarray       # kept rows per item code
    rounds: int
    removed: int

    def mask(self, u: np.ndarray, i: np.ndarray) -> np.ndarray:
        return (self.u_count[u] > 0) & (self.i_count[i] > 0)


def kcore(coded: Coded, k: int, k_user: int, progress) -> Kept:
    n_u, n_i = len(coded.user_raw), len(coded.item_raw)
    u_alive, i_alive = np.ones(n_u, dtype=bool), np.ones(n_i, dtype=bool)
    rounds = 0
    while True:
        rounds += 1
        u_count = np.zeros(n_u, dtype=np.int64)
        i_count = np.zeros(n_i, dtype=np.int64)
        for b in range(coded.n_buckets):
            u, i = coded.load(b, "u", "i")
            keep = u_alive[u] & i_alive[i]
            u_count += np.bincount(u[keep], minlength=n_u)
            i_count += np.bincount(i[keep], minlength=n_i)
        kept = int(u_count.sum())
        bad_u = (u_count > 0) & (u_count < k_user)
        bad_i = (i_count > 0) & (i_count < k)
        progress(f"k-core pass {rounds}: {kept:,} rows kept; {int(bad_u.sum()):,} users and "
                 f"{int(bad_i.sum()):,} items below {k_user}/{k}", force=True)
        if not (bad_u.any() or bad_i.any()):
            return Kept(u_count, i_count, rounds, coded.n_rows - kept)
        u_alive &= u_count >= k_user
        i_alive &= i_count >= k


def check_not_empty(kept: Kept, coded: Coded, k: int, source_name: str) -> None:
    if kept.u_count.sum() == 0:  # the message of preprocess.preprocess
        raise EmptyResultError(f"{source_name}: nothing left after the {k}-core filter "
                               f"({kept.removed} of {coded.n_rows} actions removed in "
                               f"{kept.rounds} rounds); lower k_core or check the input")


@dataclass
class IdMaps:
    user_raw: pa.Array        # dense user -> raw ID (Prepared.user_raw, kept in Arrow)
    item_raw: pa.Array        # dense item - 1 -> raw ID (Prepared.item_raw, kept in Arrow)
    user_dense: np.ndarray    # user code -> dense user ID (-1: removed)
    item_dense: np.ndarray    # item code -> dense item ID, 1-based (0: removed)
    lengths: np.ndarray       # kept actions per dense user


def id_maps(coded: Coded, kept: Kept, progress) -> IdMaps:
    n_u, n_i = len(kept.u_count), len(kept.i_count)
    big = np.iinfo(np.int64).max
    u_first, i_first = np.full(n_u, big), np.full(n_i, big)
    for b in range(coded.n_buckets):
        u, i, s = coded.load(b, "u", "i", "s")
        m = kept.mask(u, i)
        u, i, s = u[m], i[m], s[m]
        # rows are in input order: return_index gives each code's first kept row
        codes, at = np.unique(u, return_index=True)
        u_first[codes] = s[at]
        codes, at = np.unique(i, return_index=True)
        i_first[codes] = np.minimum(i_first[codes], s[at])
    progress("dense IDs: first kept appearances found", force=True)
    user_raw, user_dense = _dense(coded.user_raw, u_first, kept.u_count > 0)
    progress(f"dense IDs: {len(user_raw):,} users ordered", force=True)
    item_raw, item_dense = _dense(coded.item_raw, i_first, kept.i_count > 0)
    progress(f"dense IDs: {len(item_raw):,} items ordered", force=True)
    lengths = np.zeros(len(user_raw), dtype=np.int64)
    alive = user_dense >= 0
    lengths[user_dense[alive]] = kept.u_count[alive]
    return IdMaps(user_raw, item_raw, user_dense, np.where(item_dense >= 0, item_dense + 1, 0), lengths)


def _dense(raw: pa.Array, first: np.ndarray, alive: np.ndarray) -> tuple[pa.Array, np.ndarray]:
    """(dense ID -> raw ID, code -> dense ID or -1); raw holds each code's ID once."""
    codes = np.flatnonzero(alive)
    codes = codes[np.argsort(first[codes], kind="stable")]        # first-appearance order
    order = sorted_id_order(raw.take(pa.array(codes)))
    dense = np.full(len(alive), -1, dtype=np.int64)
    dense[codes[order]] = np.arange(len(order))
    return raw.take(pa.array(codes[order])), dense
