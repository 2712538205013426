"""Background prefetch of the shard reader (`ShardReader(prefetch_batches=...)`, `Prefetcher`):
the same batches as the synchronous path, an exact resume position while batches sit in the
queue, producer errors raised in the consumer, no thread left behind, and the data-wait time
`run_epoch` reports."""

from __future__ import annotations

import gc
import json
import shutil
import threading
import time
from dataclasses import fields
from itertools import islice

import pytest
import torch

from hm4sr_dist.batch import Batch
from hm4sr_dist.data import ShardError, ShardReader
from hm4sr_dist.data.prefetch import Prefetcher
from hm4sr_dist.objective import LossTerms
from hm4sr_dist.train.loop import EpochProgress, StepResult, run_epoch

B, POOL = 7, 4
SETTINGS = {"split": "train", "batch_size": B, "seed": 3, "shuffle_buffer": 64, "epoch": 1}


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("hm4sr-prefetch")]


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture(autouse=True)
def no_thread_survives_a_test():
    yield
    gc.collect()
    wait_for(lambda: not prefetch_threads())


def as_lists(batches) -> list:
    out = []
    for x in batches:
        if isinstance(x, Batch):
            out.append([getattr(x, f.name).tolist() for f in fields(Batch)])
        else:  # EvalBatch
            out.append([getattr(x.batch, f.name).tolist() for f in fields(Batch)]
                       + [x.mask.tolist(), x.users.tolist()])
    return out


@pytest.mark.parametrize("split", ["train", "valid", "test"])
@pytest.mark.parametrize("pool", [0, POOL], ids=["unbucketed", "bucketed"])
@pytest.mark.parametrize("rank,world_size", [(0, 1), (1, 2)])
def test_prefetch_yields_exactly_the_synchronous_batches(prepared_sequences, split, pool, rank, world_size):
    kw = {**SETTINGS, "split": split, "bucket_pool_batches": pool, "rank": rank, "world_size": world_size}
    sync = ShardReader(prepared_sequences, prefetch_batches=0, **kw)
    want = as_lists(sync)
    assert len(want) == len(sync) > 3
    for depth in (1, 4, 64):
        got = as_lists(ShardReader(prepared_sequences, prefetch_batches=depth, **kw))
        assert got == want, depth


def test_state_counts_what_the_consumer_received_not_what_is_queued(prepared_sequences):
    d = prepared_sequences
    full = as_lists(ShardReader(d, prefetch_batches=0, bucket_pool_batches=POOL, **SETTINGS))
    for k in (0, 1, POOL + 1, len(full) - 2):
        reader = ShardReader(d, prefetch_batches=3, bucket_pool_batches=POOL, **SETTINGS)
        it = iter(reader)
        got = as_lists(islice(it, k))
        fetcher = reader._fetcher()
        wait_for(lambda: fetcher._queue.full() or not fetcher.alive)   # the producer is ahead
        assert fetcher._queue.qsize() > 0 or k >= len(full) - 3
        state = json.loads(json.dumps(reader.state_dict()))
        assert state["batches_yielded"] == k
        resumed = ShardReader(d, prefetch_batches=3, bucket_pool_batches=POOL, **{**SETTINGS, "epoch": 0})
        resumed.load_state_dict(state)
        assert as_lists(resumed) == full[k:]
        assert got + as_lists(it) == full                  # taking the state disturbs nothing
        assert reader.state_dict()["batches_yielded"] == len(full)


def test_resume_across_prefetch_settings(prepared_sequences):
    """A state saved by a prefetching reader resumes a synchronous one and vice versa."""
    d = prepared_sequences
    full = as_lists(ShardReader(d, prefetch_batches=0, **SETTINGS))
    for saved_depth, loaded_depth in ((4, 0), (0, 4)):
        saver = ShardReader(d, prefetch_batches=saved_depth, **SETTINGS)
        it = iter(saver)
        list(islice(it, 5))
        loader = ShardReader(d, prefetch_batches=loaded_depth, **SETTINGS)
        loader.load_state_dict(saver.state_dict())
        assert as_lists(loader) == full[5:]
        saver.close()


def test_a_producer_error_is_raised_in_the_consumer(prepared_sequences, tmp_path):
    d = tmp_path / "copy"
    shutil.copytree(prepared_sequences, d)
    reader = ShardReader(d, prefetch_batches=2, bucket_pool_batches=0, verify="none", **SETTINGS)
    victim = reader.my_shards()[1]          # the second shard this rank reads: after a few batches
    shard = d / "shards" / reader.shards[victim]["file"]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    got, it = 0, iter(reader)
    with pytest.raises(ShardError, match=rf"shard .*{shard.name}: ") as info:
        for _ in it:
            got += 1
    assert got > 0                                            # batches before the bad shard arrived
    assert any("prefetch thread" in note for note in getattr(info.value, "__notes__", []))
    assert reader.state_dict()["batches_yielded"] == got
    wait_for(lambda: not prefetch_threads())


def test_prefetcher_reraises_the_producers_exception_with_its_cause():
    def make(stop):
        yield 1
        try:
            raise KeyError("inner")
        except KeyError as exc:
            raise RuntimeError("producer failed") from exc
    it = Prefetcher(make, depth=2)
    assert next(it) == 1
    with pytest.raises(RuntimeError, match="producer failed") as info:
        next(it)
    assert isinstance(info.value.__cause__, KeyError)
    with pytest.raises(StopIteration):
        next(it)
    assert not it.alive


def test_the_queue_is_bounded():
    made = []

    def make(stop):
        for i in range(1000):
            made.append(i)
            yield i
    it = Prefetcher(make, depth=3)
    wait_for(lambda: len(made) >= 4)
    time.sleep(0.2)
    assert len(made) == 4                   # 3 queued + 1 waiting to be put
    assert list(islice(it, 5)) == [0, 1, 2, 3, 4]
    it.close()
    assert not it.alive


@pytest.mark.parametrize("how", ["break+gc", "set_epoch", "new_iteration", "close", "load_state"])
def test_an_abandoned_epoch_leaves_no_thread(prepared_sequences, how):
    reader = ShardReader(prepared_sequences, prefetch_batches=2, **SETTINGS)
    state = reader.state_dict()
    it = iter(reader)
    next(it)
    assert len(prefetch_threads()) >= 1
    if how == "break+gc":
        for _ in it:
            break
        del it
        gc.collect()
    elif how == "set_epoch":
        reader.set_epoch(2)
    elif how == "new_iteration":
        again = iter(reader)
        assert len(list(again)) == len(reader)
        reader.close()                      # (a finished epoch reads the next one ahead)
    elif how == "close":
        reader.close()
    else:
        reader.load_state_dict(state)
    wait_for(lambda: not prefetch_threads())


def test_run_epoch_closes_the_iterator_when_a_step_fails(prepared_sequences):
    reader = ShardReader(prepared_sequences, prefetch_batches=2, **SETTINGS)

    def step(batch):
        raise FloatingPointError("nan loss")
    with pytest.raises(FloatingPointError):
        run_epoch(step, reader)
    assert not prefetch_threads()           # closed at once, not at garbage collection


def _fake_step(seconds: float):
    def step(batch: Batch) -> StepResult:
        time.sleep(seconds)
        return StepResult(LossTerms(total=torch.tensor(1.0), main=torch.tensor(1.0)))
    return step


def test_run_epoch_reports_the_time_blocked_on_data(prepared_sequences):
    batches = list(ShardReader(prepared_sequences, prefetch_batches=0, **SETTINGS))[:12]

    def slow():
        for batch in batches:
            time.sleep(0.03)
            yield batch
    starved = run_epoch(_fake_step(0.01), slow())
    assert starved.batches == 12
    assert 0.6 < starved.data_wait_fraction() <= 1.0
    assert starved.means()["data_wait_fraction"] == starved.data_wait_fraction()
    fed = run_epoch(_fake_step(0.03), iter(batches))
    assert fed.data_wait_fraction() < 0.2
    # a mid-epoch checkpoint stores the progress; old checkpoints (no wait field) still load
    restored = EpochProgress(**json.loads(json.dumps(starved.as_dict())))
    assert restored.data_wait_seconds == starved.data_wait_seconds
    legacy = {k: v for k, v in starved.as_dict().items() if k != "data_wait_seconds"}
    assert EpochProgress(**legacy).data_wait_seconds == 0.0


def test_prefetch_hides_a_slow_reader_behind_the_step(prepared_sequences):
    """A reader as slow as the step: synchronously the step waits for every batch; with
    prefetch the reading overlaps the step (a sleep releases the GIL, as torch kernels do)."""
    def slowed(reader):
        inner = reader._indexed_train_batches

        def slow(*args, **kwargs):
            for item in inner(*args, **kwargs):
                time.sleep(0.02)
                yield item
        reader._indexed_train_batches = slow
        return reader
    fractions = {}
    for depth in (0, 4):
        reader = slowed(ShardReader(prepared_sequences, prefetch_batches=depth, **SETTINGS))
        progress = run_epoch(_fake_step(0.03), islice(iter(reader), 25))
        reader.close()
        fractions[depth] = progress.data_wait_fraction()
    assert fractions[0] > 0.3
    assert fractions[4] < 0.15 and fractions[4] < fractions[0] / 3


def test_prefetch_batches_is_checked(prepared_sequences):
    with pytest.raises(ValueError, match="prefetch_batches"):
        ShardReader(prepared_sequences, prefetch_batches=-1, **SETTINGS)


def test_the_next_epoch_is_read_ahead_when_an_epoch_ends(prepared_sequences):
    d = prepared_sequences
    kw = {**SETTINGS, "bucket_pool_batches": POOL}
    want = {e: as_lists(ShardReader(d, prefetch_batches=0, **{**kw, "epoch": e})) for e in (1, 2, 3)}
    reader = ShardReader(d, prefetch_batches=2, **kw)
    assert as_lists(reader) == want[1]
    assert reader._ahead is not None and reader._ahead[1].alive      # epoch 2, started already
    ahead = reader._ahead[1]
    reader.set_epoch(2)
    it = iter(reader)
    assert reader._fetcher() is ahead                                  # adopted, not restarted
    assert as_lists(it) == want[2]
    assert reader.state_dict() == {**reader.state_dict(), "epoch": 2, "batches_yielded": len(want[2])}
    reader.set_epoch(1)                                                # not the epoch read ahead
    assert reader._ahead is None and as_lists(reader) == want[1]
    reader.set_epoch(2)
    state = reader.state_dict()
    list(islice(iter(reader), 3))
    resumed = ShardReader(d, prefetch_batches=2, **kw)
    assert as_lists(resumed) == want[1]                                # reads epoch 2 ahead ...
    resumed.load_state_dict({**reader.state_dict()})                   # ... but resumes mid-epoch 2
    assert as_lists(resumed) == want[2][3:]
    assert state["batches_yielded"] == 0
    del reader, resumed, it                                            # dropped: threads stop
    gc.collect()
    wait_for(lambda: not prefetch_threads())
