"""The preprocessing rules (dedupe, stable time sort, k-core, dense IDs, splits, intervals) against
brute-force references, through the default engine (the Ray Data pipeline) on small logs: each
prepared folder is read back, shard by shard, into raw IDs."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from data_pipelines.config import PrepConfig
from data_pipelines.prepare import prepare
from data_pipelines.preprocess import EmptyResultError, Prepared, interval_stats, sorted_id_order
from hm4sr_dist.data.records import iter_shard_tarfile, split_ends
from tests.data.fixtures import expected_sequences, make_log


def python_sorted_ids(values: list[str]) -> list[str]:
    """The dense-ID rule in plain Python: distinct IDs in first-seen order, then numerically
    (stable: equal integers keep that order) when all are int64 integers, else by code point."""
    unique = list(dict.fromkeys(values))
    try:
        keys = [int(v) for v in unique]
    except ValueError:
        return sorted(unique)
    if any(not -(1 << 63) <= x < (1 << 63) for x in keys):
        return sorted(unique)
    return [v for _, v in sorted(zip(keys, unique), key=lambda kv: kv[0])]


def prepared_log(tmp: Path, rows, k: int, name: str = "p") -> tuple[dict, Path]:
    """`rows` (user, item, timestamp) as a Parquet log, prepared with the default engine."""
    tmp.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=["u", "i", "t"]).to_parquet(tmp / f"{name}.parquet")
    cfg = PrepConfig("tabular", str(tmp / name), interactions=str(tmp / f"{name}.parquet"), name=name,
                     user_col="u", item_col="i", time_col="t", k_core=k, min_shards=3, progress=False,
                     text=False, images=False)
    return prepare(cfg), tmp / name


def read_back(out: Path) -> tuple[dict[str, list[tuple[str, int]]], list[str], list[str]]:
    """({raw user: [(raw item, t), ...] in shard order}, raw users by dense ID, raw items by dense ID)."""
    users = pd.read_parquet(out / "users.parquet")
    items = pd.read_parquet(out / "items.parquet")
    assert users["user_id"].tolist() == list(range(len(users)))
    assert items["item_id"].tolist() == list(range(1, len(items) + 1))   # 0 = the padding item
    user_raw, item_raw = users["raw_id"].tolist(), items["raw_id"].tolist()
    got = {}
    for shard in sorted((out / "shards").glob("*.tar")):
        for key, seq_items, times in iter_shard_tarfile(shard):
            got[user_raw[int(key[1:])]] = [(item_raw[i - 1], int(t)) for i, t in zip(seq_items, times)]
    return got, user_raw, item_raw


@pytest.mark.parametrize("k", [1, 3, 5])
def test_prepared_sequences_equal_the_brute_force_reference(tmp_path, local_ray, monkeypatch, k):
    """Duplicates dropped (first stays), k-core with users at max(k, 3), time ties in input
    order, users and items numbered in sorted raw-ID order; on a power-law log whose k-core
    takes several rounds. The item vocabulary is merged every few rows (as a large log merges it)."""
    from data_pipelines import ray_prep

    monkeypatch.setattr(ray_prep, "VOCAB_MERGE_ROWS", 5)
    rng = random.Random(k)
    log = make_log(seed=3, n_users=60, n_items=12)
    log += [(f"V{rng.randint(0, 30)}", f"J{int(rng.paretovariate(1.2)) % 40}", 1_300_000_000 + rng.randint(0, 50))
            for _ in range(600)]
    log += log[::17]                                                    # more exact duplicates
    manifest, out = prepared_log(tmp_path, log, k)
    expected = expected_sequences(log, k=k)
    got, user_raw, item_raw = read_back(out)
    assert got == expected                          # includes the stable order of equal timestamps
    counts = manifest["counts"]
    assert counts["dropped"]["duplicate_row"] == len(log) - len(set(log))
    assert counts["dropped"][f"kcore_{k}"] == len(set(log)) - sum(len(v) for v in expected.values())
    assert k == 1 or counts["kcore_rounds"] >= 2
    assert user_raw == python_sorted_ids(list(expected)) and item_raw == python_sorted_ids(
        [i for seq in expected.values() for i, _ in seq])


def test_numeric_ids_sort_numerically_and_short_users_go(tmp_path, local_ray):
    rows = [("10", "2", 1), ("9", "10", 2), ("10", "10", 3), ("9", "2", 4), ("10", "11", 5),
            ("9", "11", 6), ("7", "2", 7), ("7", "10", 8)]         # user 7: 2 actions < 3
    manifest, out = prepared_log(tmp_path, rows, k=1)
    got, user_raw, item_raw = read_back(out)
    assert user_raw == ["9", "10"] and item_raw == ["2", "10", "11"]
    assert manifest["counts"]["samples"] == {"train": 0, "valid": 2, "test": 2}
    assert manifest["counts"]["dropped"]["kcore_1"] == 2


def test_empty_after_kcore_is_an_error(tmp_path, local_ray):
    with pytest.raises(EmptyResultError, match="nothing left after the 5-core"):
        prepared_log(tmp_path, [("a", "x", 1), ("b", "y", 2)], k=5)


@pytest.mark.parametrize("ids", [
    ["10", "9", "007", "7", "-3", "0"],                       # Arrow's cast: ties keep first-seen order
    ["+5", " 7", "1_0", "\u0663", "4"],                       # only Python's int reads these
    ["9", "10", "x"],                                          # one non-integer: code point order
    ["b", "\u00e9", "a", "B", "\U0001f600", "ab", ""],        # multi-byte UTF-8 = code point order
    ["1", "99999999999999999999"],                             # beyond int64: strings
])
def test_id_order_is_the_python_rule(ids):
    """Both engines order distinct IDs in Arrow (`sorted_id_order`); the order must be the plain
    Python rule's, chunk by chunk too (chunk 2 splits every list)."""
    expected = python_sorted_ids(ids)
    for chunk in (2, 1 << 16):
        order = sorted_id_order(pa.array(ids, pa.string()), chunk=chunk)
        assert [ids[j] for j in order] == expected


def test_split_edge_cases():
    assert list(split_ends(3, "train")) == [] and list(split_ends(3, "valid")) == [1]
    assert list(split_ends(5, "train")) == [1, 2] and list(split_ends(5, "test")) == [4]
    assert list(split_ends(2, "test")) == [] and list(split_ends(1, "valid")) == []


def test_interval_stats_brute_force():
    rng = np.random.default_rng(5)
    lengths = rng.integers(1, 9, size=30)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    times = np.concatenate([np.sort(rng.integers(0, 10**6, size=n)) for n in lengths]).astype(np.int64)
    prep = Prepared(np.arange(30), np.arange(6), offsets, np.ones(offsets[-1], np.int64), times, 1)
    best_train = best_input = 0
    for u in range(prep.n_users):
        _, t = prep.user(u)
        n = len(t)
        best_train = max([best_train, *[int(b - a) for a, b in zip(t[: n - 2], t[1: n - 2])]])
        best_input = max([best_input, *[int(b - a) for a, b in zip(t[: n - 1], t[1: n - 1])]])
    stats = interval_stats(prep, mu=100.0)
    assert stats["max_train_interval_seconds"] == best_train
    assert stats["max_input_interval_seconds"] == best_input
    assert stats["max_train_bucket"] == math.floor(100 * math.log2(best_train + 1))
    assert sum(stats["bucket_histogram"].values()) == sum(max(n - 3, 0) for n in lengths)
