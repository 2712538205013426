"""Preprocessing against brute-force references: dedupe, stable sort, k-core, IDs, splits, intervals."""

from __future__ import annotations

import math
import random

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from data_pipelines.canonical import interactions_frame
from data_pipelines.preprocess import (EmptyResultError, _sorted_ids, interval_stats, kcore, preprocess,
                                      sorted_id_order, split_sizes)
from data_pipelines.report import DropLog
from hm4sr_dist.data.records import split_ends
from tests.data.fixtures import expected_sequences, make_log


def brute_kcore(rows, k):
    rows = list(rows)
    while True:
        uc, ic = {}, {}
        for u, i in rows:
            uc[u] = uc.get(u, 0) + 1
            ic[i] = ic.get(i, 0) + 1
        kept = [(u, i) for u, i in rows if uc[u] >= k and ic[i] >= k]
        if kept == rows:
            return rows
        rows = kept


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_kcore_equals_brute_force(k):
    rng = random.Random(k)
    rows = [(rng.randint(0, 60), int(rng.paretovariate(1.2)) % 80) for _ in range(1500)]
    users = np.array([u for u, _ in rows])
    items = np.array([i for _, i in rows])
    keep, _ = kcore(users, items, k)
    assert [r for r, m in zip(rows, keep) if m] == brute_kcore(rows, k)


def test_preprocess_matches_reference_sequences():
    log = make_log(seed=3, n_users=40, n_items=12)
    drops = DropLog()
    prep = preprocess(interactions_frame(*zip(*log)), drops, k=3)
    expected = expected_sequences(log, k=3)
    assert drops.counts["duplicate_row"] == len(log) - len(set(log)) >= 1
    assert drops.counts["kcore_3"] == len(set(log)) - sum(len(v) for v in expected.values())
    got = {}
    for u in range(prep.n_users):
        items, times = prep.user(u)
        got[prep.user_raw[u]] = [(prep.item_raw[i - 1], int(t)) for i, t in zip(items, times)]
    assert got == expected                          # includes the stable order of equal timestamps
    assert list(prep.user_raw) == sorted(expected, key=lambda u: int(u[1:])) or \
        list(prep.user_raw) == sorted(expected)      # dense IDs follow sorted raw IDs
    assert prep.items.min() == 1 and prep.items.max() == prep.n_items  # 0 is the padding item


def test_numeric_ids_sort_numerically():
    df = interactions_frame(["10", "9", "10", "9", "10", "9"], ["2", "10", "10", "2", "11", "11"],
                            [1, 2, 3, 4, 5, 6])
    prep = preprocess(df, DropLog(), k=1)
    assert list(prep.user_raw) == ["9", "10"] and list(prep.item_raw) == ["2", "10", "11"]


@pytest.mark.parametrize("ids", [
    ["10", "9", "007", "7", "-3", "0"],                       # Arrow's cast: ties keep first-seen order
    ["+5", " 7", "1_0", "\u0663", "4"],                       # only Python's int reads these
    ["9", "10", "x"],                                          # one non-integer: code point order
    ["b", "\u00e9", "a", "B", "\U0001f600", "ab", ""],        # multi-byte UTF-8 = code point order
    ["1", "99999999999999999999"],                             # beyond int64: strings
])
def test_streaming_id_order_is_the_in_memory_one(ids):
    """The streaming path orders distinct IDs in Arrow; the order must be `_sorted_ids`'s, chunk
    by chunk too (chunk 2 splits every list)."""
    expected = list(_sorted_ids(np.array(ids, dtype=object)))
    for chunk in (2, 1 << 16):
        order = sorted_id_order(pa.array(ids, pa.string()), chunk=chunk)
        assert [ids[j] for j in order] == expected


def test_split_edge_cases():
    assert list(split_ends(3, "train")) == [] and list(split_ends(3, "valid")) == [1]
    assert list(split_ends(5, "train")) == [1, 2] and list(split_ends(5, "test")) == [4]
    assert list(split_ends(2, "test")) == [] and list(split_ends(1, "valid")) == []
    # k < 3: users still need 3 items for leave-one-out, and are dropped by the k-core loop
    df = interactions_frame(["a", "a", "b", "b", "b"], ["x", "y", "x", "y", "x"], [1, 2, 3, 4, 5])
    prep = preprocess(df, DropLog(), k=1)
    assert list(prep.user_raw) == ["b"]
    assert split_sizes(prep) == {"train": 0, "valid": 1, "test": 1}


def test_empty_after_kcore_is_an_error():
    df = interactions_frame(["a", "b"], ["x", "y"], [1, 2])
    with pytest.raises(EmptyResultError, match="nothing left after the 5-core"):
        preprocess(df, DropLog(), k=5)


def test_interval_stats_brute_force():
    log = make_log(seed=5, n_users=30, n_items=6)
    prep = preprocess(interactions_frame(*zip(*log)), DropLog(), k=2)
    best_train = best_input = 0
    for u in range(prep.n_users):
        _, t = prep.user(u)
        n = len(t)
        train = [int(b - a) for a, b in zip(t[: n - 2], t[1: n - 2])]
        best_train = max([best_train, *train])
        best_input = max([best_input, *[int(b - a) for a, b in zip(t[: n - 1], t[1: n - 1])]])
    stats = interval_stats(prep, mu=100.0)
    assert stats["max_train_interval_seconds"] == best_train
    assert stats["max_input_interval_seconds"] == best_input
    assert stats["max_train_bucket"] == math.floor(100 * math.log2(best_train + 1))
    assert sum(stats["bucket_histogram"].values()) == sum(max(len(prep.user(u)[1]) - 3, 0)
                                                          for u in range(prep.n_users))
