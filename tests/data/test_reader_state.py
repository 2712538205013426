"""Mid-epoch resume of the training reader (`ShardReader.state_dict` / `load_state_dict`), as
torchtitan tests its data loader: iterate k batches, take the state, build a new reader, load it,
and the next batches equal those of the uninterrupted run (same rows, order and padding)."""

from __future__ import annotations

import json
from dataclasses import fields
from itertools import islice

import pytest
import torch

from hm4sr_dist.batch import Batch
from hm4sr_dist.data import ShardReader

B, POOL = 7, 4  # on `prepared_sequences`: 534 train samples; rank 1 of 2 holds 265 in 39 steps
SETTINGS = {"split": "train", "batch_size": B, "seed": 3, "shuffle_buffer": 64}


def make(d, epoch: int = 1, **kw) -> ShardReader:
    return ShardReader(d, **{**SETTINGS, "epoch": epoch, **kw})


def assert_same(got: list[Batch], want: list[Batch]) -> None:
    assert len(got) == len(want)
    for x, y in zip(got, want):
        for f in fields(Batch):
            assert torch.equal(getattr(x, f.name), getattr(y, f.name)), f.name


def stop_and_resume(d, k: int, **kw) -> tuple[dict, list[Batch], list[Batch]]:
    """Take the state after k batches; returns it, the rest of that run, and what a new reader
    that loaded it yields."""
    first = make(d, **kw)
    it = iter(first)
    assert len(list(islice(it, k))) == k
    state = json.loads(json.dumps(first.state_dict()))       # what a checkpoint stores
    fresh = make(d, epoch=0, **kw)                             # the epoch comes from the state
    fresh.load_state_dict(state)
    return state, list(it), list(fresh)


@pytest.mark.parametrize("pool", [0, POOL], ids=["unbucketed", "bucketed"])
@pytest.mark.parametrize("rank,world_size", [(0, 1), (1, 2)])
def test_resume_yields_exactly_the_remaining_batches(prepared_sequences, pool, rank, world_size):
    kw = {"rank": rank, "world_size": world_size, "bucket_pool_batches": pool}
    reader = make(prepared_sequences, **kw)
    full, steps = list(reader), len(reader)
    first_pad = reader.num_samples // B       # the first batch holding samples of the "pad" pass
    assert first_pad < steps                  # (precondition: the epoch reaches the pad pass)
    # 1, POOL + 2: mid-pool; POOL: a pool boundary; first_pad, first_pad + 1: in the pad pass
    # (rank 1 of 2: batches 37 and 38 of 39, mid-pool; 1 rank: batch 76 of 77, a pool's start)
    checkpoints = sorted({0, 1, POOL, POOL + 2, first_pad, first_pad + 1, steps - 1, steps})
    for k in checkpoints:
        state, rest, resumed = stop_and_resume(prepared_sequences, k, **kw)
        assert state["epoch"] == 1 and state["batches_yielded"] == k
        assert_same(rest, full[k:])           # taking the state does not disturb the run
        assert_same(resumed, full[k:])


def test_bucketing_is_on_in_the_bucketed_case(prepared_sequences):
    on = [b.target.tolist() for b in make(prepared_sequences, bucket_pool_batches=POOL)]
    assert on != [b.target.tolist() for b in make(prepared_sequences, bucket_pool_batches=0)]


def test_position_advances_per_batch_and_resets_on_a_new_iteration(prepared_sequences):
    reader = make(prepared_sequences, bucket_pool_batches=POOL)
    assert reader.state_dict()["batches_yielded"] == 0
    first = []
    for k, batch in enumerate(reader, start=1):
        first.append(batch)
        assert reader.state_dict()["batches_yielded"] == k
    assert k == len(reader)
    again = iter(reader)                      # iterating again: the epoch from its start
    assert reader.state_dict()["batches_yielded"] == 0
    assert_same(list(again), first)


def test_set_epoch_resets_the_position_even_a_loaded_one(prepared_sequences):
    d = prepared_sequences
    epoch1, epoch2 = list(make(d, epoch=1)), list(make(d, epoch=2))
    reader = make(d, epoch=1)
    list(islice(iter(reader), 3))
    state = reader.state_dict()
    reader.set_epoch(2)
    assert reader.state_dict()["epoch"] == 2 and reader.state_dict()["batches_yielded"] == 0
    assert_same(list(reader), epoch2)
    resumed = make(d, epoch=1)
    resumed.set_epoch(1)
    resumed.load_state_dict(state)            # set_epoch, then load: resumes
    assert_same(list(resumed), epoch1[3:])
    restarted = make(d, epoch=0)
    restarted.load_state_dict(state)
    restarted.set_epoch(1)                    # load, then set_epoch: back to the first batch
    assert restarted.state_dict()["batches_yielded"] == 0
    assert_same(list(restarted), epoch1)


def test_mismatched_states_are_refused(prepared_sequences):
    d = prepared_sequences
    two = make(d, rank=0, world_size=2)
    list(islice(iter(two), 2))
    state = two.state_dict()
    with pytest.raises(ValueError, match="world_size is 2 in the saved state but 1"):
        make(d).load_state_dict(state)
    for field, value in [("seed", 4), ("batch_size", 8), ("bucket_pool_batches", 0), ("max_len", 5)]:
        other = make(d, rank=0, world_size=2, **{field: value})
        with pytest.raises(ValueError, match=f"reader state: {field} is"):
            other.load_state_dict(state)
    with pytest.raises(ValueError, match="data is 'elsewhere'"):
        make(d, rank=0, world_size=2).load_state_dict({**state, "data": "elsewhere"})
    reader = make(d, rank=0, world_size=2, epoch=5)
    with pytest.raises(ValueError, match="batches_yielded 1000 is outside epoch 1's"):
        reader.load_state_dict({**state, "batches_yielded": 1000})
    assert reader.epoch == 5                  # a refused state changes nothing
    with pytest.raises(ValueError, match="train split"):
        ShardReader(d, "valid", B).state_dict()
