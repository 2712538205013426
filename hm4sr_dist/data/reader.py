"""Per-rank reader of prepared shards: shard assignment, shuffling buffer, prefix expansion,
batching to the `Batch` contract, and the same number of steps on every rank.

Training (`split="train"`) yields `Batch`; every batch has exactly `batch_size` rows (all-gathered
negatives need equal shapes on every rank). Equalising (`equalize`):
- "pad" (default): every rank runs ceil(max_r N_r / B) steps; a rank that runs out of samples
  starts a fresh shuffled pass over its own shards, so a few samples repeat and none is lost.
- "drop": every rank runs floor(min_r N_r / B) steps; the rest of the epoch is skipped.
N_r, the samples of rank r, comes from the manifest, so every rank computes every rank's count
without talking to the others.

Length bucketing (train with shuffling, `bucket_pool_batches` > 1, default 64): the shuffled
sample stream is cut into pools of `bucket_pool_batches * batch_size` samples; each pool is sorted
by input length (min(end, max_len); ties in random order), cut into batches, and the batches are
yielded in random order. The samples consumed (steps * batch_size of the same stream) are exactly
those without bucketing, so steps, batch sizes, "pad"/"drop" and determinism are unchanged; only
rows move between batches, so a batch's longest sequence (its `Batch.trimmed()` width) shrinks.

Evaluation (`split="valid"|"test"`) yields `EvalBatch(batch, mask, users)`: `mask` (B,) bool is True on
real rows. Every user is seen exactly once over all ranks; every rank runs ceil(max_r U_r / B)
steps; padded rows copy a real row (so the model never sees seq_len 0) and carry mask False, so
metrics must be summed as (metric * mask) and divided by the sum of masks over all ranks.

Shards are dealt to ranks by sample count (largest first, to the least-loaded rank); for training
the order among equal-sized shards is reshuffled every epoch from (seed, epoch).

Integrity (unless `verify="none"`): at construction this rank's shards are checked against the
manifest's sizes (`verify="sha256"`: also their digests, reading every byte first); while
streaming, every shard's bytes are hashed as they are read and compared with the manifest's
sha256 at its end, and every sample's item IDs (1..n_items) and timestamps (the data's range) are
checked as it is decoded. Either failure is a `ShardError` naming the shard (and the sample).

Resuming (train only): `state_dict()` = epoch, `batches_yielded` in it (counted as each batch is
handed out, so it is valid at any point) and the fields that define the stream (`STREAM_FIELDS`:
seed, rank, world size, batch size, shuffling, bucketing, max_len, a digest of the shard list).
`load_state_dict(state)` on a reader built with the same settings refuses any differing field
(ValueError naming it), and the next iteration yields exactly the batches the saved reader would
have yielded next. It fast-forwards: a rank's epoch is a pure function of (seed, epoch, rank, pass),
so the stream is regenerated and the first `batches_yielded` batches are skipped uncollated; mid-pool
and "pad"-pass positions need nothing special. The skipped samples are still read and decoded (they
feed the shuffle buffer and the bucketing pools), so skipping costs 0.88-0.95x the CPU time of
iterating on Beauty (B = 512: 29-34k samples/s skipped vs 26-33k iterated) and 0.65-0.75x on the
tests' toy set (B = 7, where collating weighs more): resuming at the end of a Beauty epoch re-reads
it for ~4 s of CPU per rank. A new iteration or `set_epoch` starts the epoch at its first batch
(so load the state after `set_epoch`, not before).

Prefetching (`prefetch_batches`, default 4; 0 = everything on the caller's thread): reading,
decoding, prefix expansion, bucketing and collation run in one background thread per iteration
that stays up to `prefetch_batches` batches ahead behind a bounded queue (the training step spends
most of its time in torch kernels, which release the GIL, so one thread overlaps the two; see
docs for the measurements). The producer computes the same (batch index, batch) stream as the
synchronous path; the position in `state_dict()` advances only when the CONSUMER receives a
batch, so a state taken with batches queued resumes at the first batch the consumer has not
seen. An exception in the producer is re-raised by the consumer's next `next()` (the same
exception, with a note saying where it came from). The thread is stopped and joined when the
iteration ends, when a new iteration, `set_epoch`, `load_state_dict` or `close()` is called, and
when an abandoned iterator is closed (`run_epoch` closes it) or garbage-collected.

Placement (`placement`, a `BatchPlacement`; the Ray Train worker passes the run's): every batch
is handed over shaped and on its device. With a prefetch thread and a real GPU the thread cuts the
batch, pins it and starts its copy on a side CUDA stream; the consumer's thread waits for that copy
as it takes the batch (`_deliver`, where the resume position also advances), so batch k+1 crosses
the bus while step k computes. Without a thread, or on the CPU, the consumer places it. None: host
batches at the full `max_len` width (tests, tools).

The folder may be a local path, a `file://` URI, any `pyarrow.fs.FileSystem.from_uri` URI
(`s3://...`, `gs://...`) or a path inside an explicit pyarrow `filesystem`
(`manifest.DataLocation`).
"""

from __future__ import annotations

import copy
import hashlib
import threading
import weakref
from itertools import islice
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np
import torch

from hm4sr_dist.batch import Batch
from hm4sr_dist.data.placement import BatchPlacement
from hm4sr_dist.data.prefetch import Prefetcher, Stopped
from hm4sr_dist.data.manifest import (SHARD_DIR, DataLocation, ManifestError, read_manifest,
                                      verify_shards)
from hm4sr_dist.data.records import (BACKENDS, SPLITS, Bounds, Sample, ShardError, split_ends,
                                     user_samples)

BUCKET_TAG = 2**31 + 1  # rng stream of length bucketing; pass streams use n_pass < 2**30
STATE_VERSION = 1
# what defines a rank's training stream besides the epoch: a saved state must match them all
STREAM_FIELDS = ("split", "seed", "rank", "world_size", "batch_size", "shuffle", "shuffle_buffer",
                 "equalize", "max_len", "bucket_pool_batches", "data")


class EvalBatch(NamedTuple):
    batch: Batch
    mask: torch.Tensor   # (B,) bool, True on real rows
    users: torch.Tensor  # (B,) int64, the user id of each row (from its shard key u<id>); -1 on padding


def assign_shards(counts: list[int], world_size: int, order: list[int]) -> list[list[int]]:
    """Deal shard indices to ranks, largest count first (ties in `order`), to the least-loaded rank."""
    ranked = sorted(order, key=lambda i: -counts[i])  # stable: equal counts keep `order`
    loads = [0] * world_size
    out: list[list[int]] = [[] for _ in range(world_size)]
    for i in ranked:
        r = min(range(world_size), key=lambda k: (loads[k], k))
        out[r].append(i)
        loads[r] += counts[i]
    return out


_NO_FETCHER = lambda: None  # noqa: E731 - a dead weak reference


def collate(samples: list[Sample], max_len: int) -> Batch:
    """Right-padded Batch from (items, times, end) samples, keeping the last `max_len` inputs."""
    b = len(samples)
    item_seq = np.zeros((b, max_len), dtype=np.int64)
    time_seq = np.zeros((b, max_len), dtype=np.int64)
    seq_len = np.empty(b, dtype=np.int64)
    target = np.empty(b, dtype=np.int64)
    for row, (items, times, end) in enumerate(samples):
        start = max(0, end - max_len)
        k = end - start
        item_seq[row, :k] = items[start:end]
        time_seq[row, :k] = times[start:end]
        seq_len[row] = k
        target[row] = items[end]
    return Batch(torch.from_numpy(item_seq), torch.from_numpy(time_seq),
                 torch.from_numpy(seq_len), torch.from_numpy(target))


class ShardReader:
    """Iterable of `Batch` (train) or `EvalBatch` (valid/test) for one rank.

        reader = ShardReader("outputs/beauty", "train", batch_size=1024, rank=r, world_size=w,
                             seed=2020)
        for epoch in range(epochs):
            reader.set_epoch(epoch)
            for batch in reader: ...          # len(reader) steps, the same on every rank
    """

    def __init__(self, prepared_dir: str | Path, split: str = "train", batch_size: int = 1024,
                 rank: int = 0, world_size: int = 1, shuffle: bool | None = None, seed: int = 0,
                 epoch: int = 0, shuffle_buffer: int = 20000, equalize: str = "pad",
                 max_len: int | None = None, backend: str = "tarfile", verify: str = "size",
                 bucket_pool_batches: int = 64, prefetch_batches: int = 4, filesystem=None,
                 placement: BatchPlacement | None = None):
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        if equalize not in ("pad", "drop"):
            raise ValueError(f"equalize: expected 'pad' or 'drop', got {equalize!r}")
        if bucket_pool_batches < 0:
            raise ValueError(f"bucket_pool_batches: expected >= 0, got {bucket_pool_batches}")
        if prefetch_batches < 0:
            raise ValueError(f"prefetch_batches: expected >= 0, got {prefetch_batches}")
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {sorted(BACKENDS)}, got {backend!r}")
        self.location = DataLocation(prepared_dir, filesystem)
        self.dir = self.location.name()  # as given: a path or a URI (messages)
        self.manifest = read_manifest(self.location)
        self.split, self.batch_size = split, batch_size
        self.rank, self.world_size = rank, world_size
        self.shuffle = (split == "train") if shuffle is None else shuffle
        self.seed, self.epoch = seed, epoch
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.equalize, self.backend = equalize, backend
        self.max_len = int(max_len or self.manifest["max_len"])
        self.bucket_pool_batches = bucket_pool_batches
        self.prefetch_batches = prefetch_batches
        self.placement = placement      # None: host batches at their full width
        # what every decoded sample is checked against (verify="none": nothing, as before)
        self.check_bytes = verify != "none"
        self.bounds = Bounds.from_manifest(self.manifest) if verify != "none" else None
        self._fetcher: Callable[[], Prefetcher | None] = _NO_FETCHER  # weak: the live iteration's
        self._ahead: tuple[tuple, Prefetcher] | None = None  # the next epoch, started early
        self.shards = self.manifest["shards"]
        self.counts = [int(s[split]) for s in self.shards]
        self._position = 0              # batches of this epoch yielded by the current iteration
        self._resume: int | None = None  # position loaded by load_state_dict, not yet iterated
        if split == "train" and len(self.shards) < world_size:
            raise ManifestError(f"{self.dir}: {len(self.shards)} shards for {world_size} ranks; "
                                "re-prepare with --min-shards >= world size")
        verify_shards(self.location, self.manifest, check=verify,
                      files=[self.shards[i]["file"] for i in self.my_shards()])

    # -- assignment ------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """The next iteration yields `epoch` from its first batch (a loaded position is dropped:
        call `load_state_dict` after `set_epoch`, or instead of it). A prefetching iteration still
        running is stopped (the next epoch read ahead is kept when it is `epoch`)."""
        self._close_live()
        if self._ahead is not None and self._ahead[0][0] != epoch:
            self._close_ahead()
        self.epoch, self._resume, self._position = epoch, None, 0

    def close(self) -> None:
        """Stop the prefetch threads (the current iteration's and the next epoch's read ahead);
        idempotent. Dropping the reader does the same."""
        self._close_live()
        self._close_ahead()

    def _close_live(self) -> None:
        fetcher = self._fetcher()
        if fetcher is not None:
            fetcher.close()

    def _close_ahead(self) -> None:
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead[1].close()

    def _assignment(self) -> list[list[int]]:
        order = list(range(len(self.shards)))
        if self.shuffle:
            np.random.default_rng([self.seed, self.epoch]).shuffle(order)
        return assign_shards(self.counts, self.world_size, order)

    def my_shards(self) -> list[int]:
        return self._assignment()[self.rank]

    def rank_samples(self) -> list[int]:
        """Real samples of `split` held by each rank this epoch."""
        return [sum(self.counts[i] for i in part) for part in self._assignment()]

    @property
    def num_samples(self) -> int:
        return self.rank_samples()[self.rank]

    def __len__(self) -> int:
        per_rank, b = self.rank_samples(), self.batch_size
        if self.split != "train" or self.equalize == "pad":
            return -(-max(per_rank) // b)
        return min(per_rank) // b

    # -- reading ---------------------------------------------------------------------------
    def _user_stream(self, shard_ids: list[int], keys: bool = False) -> Iterator[tuple]:
        """(items, times) of every user of the shards in order; (key, items, times) with `keys`."""
        read = BACKENDS[self.backend]
        for i in shard_ids:
            entry = self.shards[i]
            where = self.location.child(SHARD_DIR, entry["file"])
            path = where.name()
            users = samples = 0
            digest = entry.get("sha256") if self.check_bytes else None
            for key, items, times in read(where, digest, self.bounds):
                users += 1
                samples += len(split_ends(len(items), self.split))
                yield (key, items, times) if keys else (items, times)
            if users != entry["users"] or samples != entry[self.split]:
                raise ManifestError(f"shard {path}: holds {users} users / {samples} {self.split} "
                                    f"samples, the manifest says {entry['users']} / "
                                    f"{entry[self.split]}")

    def _samples(self, shard_ids: list[int], rng: np.random.Generator | None) -> Iterator[Sample]:
        """Expanded samples; with `rng`, shard order and a buffer of samples are shuffled."""
        if rng is not None:
            shard_ids = list(shard_ids)
            rng.shuffle(shard_ids)
        stream = (sample for items, times in self._user_stream(shard_ids)
                  for sample in user_samples(items, times, self.split))
        if rng is None:
            yield from stream
            return
        buffer: list[Sample] = []
        for sample in stream:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            j = int(rng.integers(len(buffer)))
            buffer[j], sample = sample, buffer[j]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[Batch] | Iterator[EvalBatch]:
        self._close_live()  # a new iteration supersedes a prefetching one
        mine = self.my_shards()
        steps, b, epoch = len(self), self.batch_size, self.epoch
        if self.split != "train":
            if not self.prefetch_batches:
                return map(self._place, self._eval_batches(mine, steps, b))
            shadow = self._shadow()
            return self._consume(self._fetch(lambda stop: shadow._eval_batches(mine, steps, b, staged=True)),
                                 self._place)
        if self.num_samples == 0:
            raise ManifestError(f"{self.dir}: rank {self.rank} got no training samples")
        start = self._resume or 0  # a loaded position, else the epoch's first batch
        self._resume, self._position = None, start
        if not self.prefetch_batches:
            return self._train_batches(mine, steps, b, start, epoch)
        key = (epoch, start, steps, tuple(mine))
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == key:
            fetcher = ahead[1]                        # read ahead while the last epoch ended
        else:
            if ahead is not None:
                ahead[1].close()
            fetcher = self._train_fetcher(mine, steps, b, start, epoch)
        return self._consume(fetcher, lambda item: self._deliver(item, epoch, steps))

    def _shadow(self) -> "ShardReader":
        """A copy for a producer thread to read with: the thread holds no reference to this
        reader, so a dropped reader is freed at once and its prefetchers stop (`__del__`)."""
        shadow = copy.copy(self)
        shadow._fetcher, shadow._ahead = _NO_FETCHER, None
        return shadow

    def _fetch(self, make: Callable[[threading.Event], Iterator]) -> Prefetcher:
        return Prefetcher(make, self.prefetch_batches, name=f"hm4sr-prefetch-{self.split}-r{self.rank}")

    def _train_fetcher(self, mine: list[int], steps: int, b: int, start: int, epoch: int) -> Prefetcher:
        shadow = self._shadow()
        return self._fetch(lambda stop: shadow._indexed_train_batches(mine, steps, b, start, epoch, stop))

    def _consume(self, fetcher: Prefetcher, deliver: Callable | None) -> Iterator:
        """The items of `fetcher` (already running, so the first batch is being prepared before
        the caller asks), passed through `deliver` on the caller's thread."""
        self._fetcher = weakref.ref(fetcher)

        def consume() -> Iterator:
            try:
                for item in fetcher:
                    yield item if deliver is None else deliver(item)
            finally:          # the consumer finished, broke out, failed or dropped the iterator
                fetcher.close()
        return consume()

    def _deliver(self, item: tuple[int, Batch], epoch: int | None = None,
                 steps: int | None = None) -> Batch:
        k, batch = item
        self._position = k + 1  # counted as yielded once the consumer holds it
        if steps is not None and k + 1 == steps:
            self._read_ahead(epoch + 1)
        return self._place(batch)

    def _place(self, entry):
        """On the consumer's thread: the placement's batch (a staged copy is waited for)."""
        return entry if self.placement is None else self.placement(entry)

    def _stage(self, entry):
        """In a prefetch thread: shape and start copying to the GPU (a real one only)."""
        placement = self.placement
        return placement.stage(entry) if placement is not None and placement.stages_copies else entry

    def _read_ahead(self, epoch: int) -> None:
        """The consumer holds an epoch's last batch: start reading `epoch` (from its first batch)
        now, so its first bucketing pool is read during the last step and the evaluation instead
        of stalling the next epoch's first step. Used by the next iteration if it is that epoch
        from its start (`set_epoch(epoch)`); dropped otherwise."""
        self._close_ahead()
        current = self.epoch
        try:
            self.epoch = epoch                 # the assignment and step count of that epoch
            mine, steps, samples = self.my_shards(), len(self), self.num_samples
        finally:
            self.epoch = current
        if samples == 0 or steps == 0:
            return
        self._ahead = ((epoch, 0, steps, tuple(mine)),
                       self._train_fetcher(mine, steps, self.batch_size, 0, epoch))

    def __del__(self) -> None:
        ahead = getattr(self, "_ahead", None)
        if ahead is not None:
            ahead[1].close()

    def _train_batches(self, mine: list[int], steps: int, b: int, start: int,
                       epoch: int) -> Iterator[Batch]:
        """Batches `start`..steps-1 of the epoch on the caller's thread (no prefetch)."""
        for item in self._indexed_train_batches(mine, steps, b, start, epoch):
            yield self._deliver(item)

    def _indexed_train_batches(self, mine: list[int], steps: int, b: int, start: int, epoch: int,
                               stop: threading.Event | None = None) -> Iterator[tuple[int, Batch]]:
        """(k, batch k) for k = `start`..steps-1: the earlier batches are regenerated and skipped
        uncollated (the stream is a pure function of the state's fields). Touches no mutable
        reader state, so it can run in the prefetch thread; stops early once `stop` is set."""
        if start >= steps:
            return
        # prefetching and bucketing: a pool is only cut into batches once all of it is read, so a
        # second thread reads samples up to a pool (plus the queue) ahead: the next pool is read
        # while this one's batches are trained on, instead of stalling the step at every pool
        pool_batches = self._pool_batches()
        read_ahead = pool_batches + self.prefetch_batches if stop is not None and pool_batches else 0
        try:
            for k, rows in enumerate(self._train_rows(mine, steps, b, epoch, read_ahead, stop)):
                if stop is not None and stop.is_set():
                    return
                if k >= start:
                    batch = collate(rows, self.max_len)
                    yield k, (batch if stop is None else self._stage(batch))
        except Stopped:
            return

    def _train_rows(self, mine: list[int], steps: int, b: int, epoch: int, read_ahead: int = 0,
                    stop: threading.Event | None = None) -> Iterator[list[Sample]]:
        """The samples of each of `epoch`'s `steps` batches, in order. `read_ahead` > 0: the
        sample stream is read by a `Prefetcher` up to that many batches of samples ahead."""
        def endless() -> Iterator[Sample]:
            for n_pass in range(1 << 30):  # "pad": a fresh shuffled pass when samples run out
                rng = (np.random.default_rng([self.seed, epoch, self.rank, n_pass])
                       if self.shuffle else None)
                yield from self._samples(mine, rng)
        stream, ahead = endless(), None
        if read_ahead:
            def chunks(stop: threading.Event, source=stream, total=steps * b) -> Iterator[list[Sample]]:
                source = islice(source, total)  # exactly the samples the epoch draws
                while chunk := list(islice(source, b)):
                    yield chunk
            ahead = Prefetcher(chunks, read_ahead, name=f"hm4sr-prefetch-read-r{self.rank}")

            def samples(ahead=ahead) -> Iterator[Sample]:
                for chunk in ahead:
                    if stop is not None and stop.is_set():
                        raise Stopped  # leave a half-read pool at once, not after reading it
                    yield from chunk
            stream = samples()
        try:
            pool_batches = self._pool_batches()
            if pool_batches == 0:
                for _ in range(steps):
                    yield [next(stream) for _ in range(b)]
                return
            # a stream of its own (n_pass < 2**30 never reaches BUCKET_TAG): the samples drawn
            # above are the same with and without bucketing
            rng = np.random.default_rng([self.seed, epoch, self.rank, BUCKET_TAG])
            done = 0
            while done < steps:
                n = min(pool_batches, steps - done)
                pool = [next(stream) for _ in range(n * b)]
                yield from self._bucket(pool, n, b, rng)
                done += n
        finally:
            if ahead is not None:
                ahead.close()

    def _pool_batches(self) -> int:
        """Batches per length-bucketing pool; 0 = bucketing off."""
        return self.bucket_pool_batches if self.shuffle and self.bucket_pool_batches > 1 else 0

    def _bucket(self, pool: list[Sample], n: int, b: int,
                rng: np.random.Generator) -> Iterator[list[Sample]]:
        """`n` batches of `b` rows from `pool` (n * b samples): sorted by input length, ties in
        random order, batches in random order."""
        lengths = np.fromiter((min(end, self.max_len) for _, _, end in pool), dtype=np.int64,
                              count=len(pool))
        perm = rng.permutation(len(pool))
        order = perm[np.argsort(lengths[perm], kind="stable")]
        for k in rng.permutation(n):
            yield [pool[i] for i in order[k * b:(k + 1) * b]]

    def _eval_batches(self, mine: list[int], steps: int, b: int,
                      staged: bool = False) -> Iterator[EvalBatch]:
        """Every user of this rank once, in batches of `b` (masked padding rows); `staged`: in a
        prefetch thread, start each batch's copy to the GPU (`_stage`)."""
        # (user id, sample) in shard order; a user id is its shard key u<id> (records.user_key)
        stream = ((int(key[1:]), sample) for key, items, times in self._user_stream(mine, keys=True)
                  for sample in user_samples(items, times, self.split))
        filler: Sample | None = None
        for _ in range(steps):
            rows: list[Sample] = []
            users = np.full(b, -1, dtype=np.int64)
            for uid, sample in stream:
                users[len(rows)] = uid
                rows.append(sample)
                if len(rows) == b:
                    break
            real = len(rows)
            if rows:
                filler = rows[0]
            if filler is None:  # a rank without shards: a harmless one-item row, masked out
                filler = (np.ones(2, dtype=np.int64),
                          np.full(2, int(self.manifest["time"]["min"]), dtype=np.int64), 1)
            rows.extend([filler] * (b - real))
            mask = torch.zeros(b, dtype=torch.bool)
            mask[:real] = True
            entry = EvalBatch(collate(rows, self.max_len), mask, torch.from_numpy(users))
            yield self._stage(entry) if staged else entry
        if next(stream, None) is not None:
            raise ShardError(f"{self.dir}: rank {self.rank} has samples beyond its {steps} steps "
                             "(manifest counts are wrong)")

    # -- resuming --------------------------------------------------------------------------
    def _stream_fields(self) -> dict:
        digest = hashlib.sha256("\n".join(f"{e['file']} {e['sha256']}" for e in self.shards).encode())
        return {"split": self.split, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "batch_size": self.batch_size,
                "shuffle": self.shuffle, "shuffle_buffer": self.shuffle_buffer,
                "equalize": self.equalize, "max_len": self.max_len,
                "bucket_pool_batches": self._pool_batches(), "data": digest.hexdigest()[:16]}

    def _require_train(self, what: str) -> None:
        if self.split != "train":
            raise ValueError(f"{what}: reader state is kept for the train split, not {self.split!r}")

    def state_dict(self) -> dict:
        """The training position (JSON-able): epoch, batches of it already yielded, and the fields
        that define the stream. Valid at any time; after the k-th batch was handed out it resumes
        at batch k+1."""
        self._require_train("state_dict")
        position = self._position if self._resume is None else self._resume
        return {"version": STATE_VERSION, "epoch": self.epoch, "batches_yielded": position,
                **self._stream_fields()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`: the next iteration yields exactly the batches the saved reader
        would have yielded next. Raises ValueError naming the first field that differs."""
        self._require_train("load_state_dict")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"reader state: version {state.get('version')!r}, expected {STATE_VERSION}")
        mine = self._stream_fields()
        for field in STREAM_FIELDS:
            if state.get(field) != mine[field]:
                raise ValueError(f"reader state: {field} is {state.get(field)!r} in the saved state "
                                 f"but {mine[field]!r} in this reader (the position belongs to "
                                 "another stream)")
        previous, self.epoch = self.epoch, int(state["epoch"])
        position, steps = int(state["batches_yielded"]), len(self)
        if not 0 <= position <= steps:
            self.epoch = previous
            raise ValueError(f"reader state: batches_yielded {position} is outside epoch "
                             f"{state['epoch']}'s {steps} steps")
        self._close_live()  # a prefetching iteration of the old position is superseded
        self._resume = self._position = position
