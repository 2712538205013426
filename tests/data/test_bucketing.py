"""Length-bucketed training batches (`ShardReader(bucket_pool_batches=...)`): the same samples,
steps and batch sizes as without bucketing, only regrouped so that batches are narrower."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from hm4sr_dist.data import ShardReader
from hm4sr_dist.data.manifest import MANIFEST_NAME, SCHEMA_VERSION, SHARD_DIR, sha256_file
from hm4sr_dist.data.records import encode_user, split_count, user_key

B, POOL, MAX_LEN = 8, 6, 20
T0 = 1_300_000_000


def write_prepared(root: Path, lengths: list[int], n_shards: int, max_len: int) -> Path:
    """A prepared folder written directly (no Ray): user u holds items u*1000+1 .. u*1000+n, so a
    sample's target names its (user, end) uniquely."""
    (root / SHARD_DIR).mkdir(parents=True)
    entries = []
    for s in range(n_shards):
        users = list(range(s, len(lengths), n_shards))
        name = f"shard-{s:05d}.tar"
        with tarfile.open(root / SHARD_DIR / name, "w", format=tarfile.USTAR_FORMAT) as tar:
            for u in users:
                n = lengths[u]
                payload = encode_user(u * 1000 + 1 + np.arange(n), T0 + 3600 * np.arange(n))
                info = tarfile.TarInfo(f"{user_key(u)}.seq.npy")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
        path = root / SHARD_DIR / name
        entries.append({"file": name, "sha256": sha256_file(path), "bytes": path.stat().st_size,
                        "users": len(users), "actions": sum(lengths[u] for u in users),
                        **{sp: sum(split_count(lengths[u], sp) for u in users)
                           for sp in ("train", "valid", "test")}})
    manifest = {"schema_version": SCHEMA_VERSION, "max_len": max_len, "shards": entries,
                "counts": {"users": len(lengths), "actions": sum(lengths)},
                "time": {"min": T0, "max": T0 + 3600 * max(lengths), "n_days": 10},
                "interval": {"mu": 100.0, "max_train_bucket": 1}}
    (root / MANIFEST_NAME).write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """Mostly short users and a few long ones (as Amazon Beauty), 7 uneven shards."""
    rng = np.random.default_rng(5)
    lengths = [int(min(60, 3 + rng.geometric(0.2))) for _ in range(150)] + [45, 52, 60, 33, 27]
    return write_prepared(tmp_path_factory.mktemp("bucketing"), lengths, n_shards=7, max_len=MAX_LEN)


def read(d: Path, **kw) -> list:
    kw = {"split": "train", "batch_size": B, "seed": 4, "epoch": 1, **kw}
    return list(ShardReader(d, **kw))


def targets(batches) -> Counter:
    return Counter(t for b in batches for t in b.target.tolist())


def mean_width(batches) -> float:
    return float(np.mean([int(b.seq_len.max()) for b in batches]))


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("equalize", ["pad", "drop"])
def test_bucketing_keeps_each_ranks_samples_steps_and_batch_size(mixed, world_size, equalize):
    for rank in range(world_size):
        kw = {"rank": rank, "world_size": world_size, "equalize": equalize}
        on = ShardReader(mixed, "train", B, seed=4, epoch=1, bucket_pool_batches=POOL, **kw)
        off = ShardReader(mixed, "train", B, seed=4, epoch=1, bucket_pool_batches=0, **kw)
        got, want = list(on), list(off)
        assert len(on) == len(off) == len(got) == len(want)
        assert all(len(b) == B for b in got)
        assert all((b.seq_len >= 1).all() and (b.seq_len <= MAX_LEN).all() for b in got)
        assert targets(got) == targets(want)             # same multiset, "pad" repeats included
        if equalize == "pad":                            # every sample of the rank at least once
            assert len(targets(got)) == on.num_samples
        else:                                            # "drop": no sample twice
            assert max(targets(got).values()) == 1


def test_rows_are_intact_after_regrouping(mixed):
    """Each row is still a real prefix: items u*1000+1.. in order, target the next item, right-padded."""
    for b in read(mixed, bucket_pool_batches=POOL):
        for row in range(B):
            n, tgt = int(b.seq_len[row]), int(b.target[row])
            end = tgt % 1000 - 1                             # target = item at position `end`
            assert b.item_seq[row, :n].tolist() == list(range(tgt - n, tgt))  # the last n inputs
            assert n == min(end, MAX_LEN) and (b.item_seq[row, n:] == 0).all()


def test_bucketing_is_deterministic_per_seed_and_epoch(mixed):
    a = read(mixed, bucket_pool_batches=POOL)
    b = read(mixed, bucket_pool_batches=POOL)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.item_seq, y.item_seq) and torch.equal(x.time_seq, y.time_seq)
        assert torch.equal(x.target, y.target) and torch.equal(x.seq_len, y.seq_len)
    other_epoch = read(mixed, bucket_pool_batches=POOL, epoch=2)
    assert [x.target.tolist() for x in a] != [x.target.tolist() for x in other_epoch]
    other_seed = read(mixed, bucket_pool_batches=POOL, seed=5)
    assert [x.target.tolist() for x in a] != [x.target.tolist() for x in other_seed]
    rd = ShardReader(mixed, "train", B, seed=4, epoch=0, bucket_pool_batches=POOL)
    rd.set_epoch(1)                                      # set_epoch == constructing at that epoch
    assert [x.target.tolist() for x in rd] == [x.target.tolist() for x in a]


def test_bucketing_narrows_batches(mixed):
    on, off = read(mixed, bucket_pool_batches=POOL), read(mixed, bucket_pool_batches=0)
    assert mean_width(on) < 0.8 * mean_width(off)
    # within one pool, the batches cover disjoint (touching) ranges of lengths
    for start in range(0, len(on) - POOL + 1, POOL):
        spans = sorted((int(b.seq_len.min()), int(b.seq_len.max())) for b in on[start:start + POOL])
        assert all(hi <= lo for (_, hi), (lo, _) in zip(spans, spans[1:]))


def test_off_switches_and_validation(mixed):
    off = [b.target.tolist() for b in read(mixed, bucket_pool_batches=0)]
    assert [b.target.tolist() for b in read(mixed, bucket_pool_batches=1)] == off
    assert [b.target.tolist() for b in read(mixed)] != off          # on by default
    unshuffled = [b.target.tolist() for b in read(mixed, shuffle=False, bucket_pool_batches=0)]
    assert [b.target.tolist() for b in read(mixed, shuffle=False)] == unshuffled  # file order kept
    with pytest.raises(ValueError, match="bucket_pool_batches"):
        ShardReader(mixed, "train", B, bucket_pool_batches=-1)


@pytest.mark.parametrize("split", ["valid", "test"])
def test_evaluation_splits_are_not_bucketed(mixed, split):
    for world_size in (1, 2):
        for rank in range(world_size):
            a = list(ShardReader(mixed, split, B, rank, world_size, bucket_pool_batches=POOL))
            b = list(ShardReader(mixed, split, B, rank, world_size, bucket_pool_batches=0))
            assert len(a) == len(b)
            for x, y in zip(a, b):
                assert torch.equal(x.mask, y.mask) and torch.equal(x.batch.item_seq, y.batch.item_seq)
                assert torch.equal(x.batch.target, y.batch.target)
