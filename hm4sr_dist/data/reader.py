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

Evaluation (`split="valid"|"test"`) yields `EvalBatch(batch, mask)`: `mask` (B,) bool is True on
real rows. Every user is seen exactly once over all ranks; every rank runs ceil(max_r U_r / B)
steps; padded rows copy a real row (so the model never sees seq_len 0) and carry mask False, so
metrics must be summed as (metric * mask) and divided by the sum of masks over all ranks.

Shards are dealt to ranks by sample count (largest first, to the least-loaded rank); for training
the order among equal-sized shards is reshuffled every epoch from (seed, epoch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch

from hm4sr_dist.batch import Batch
from hm4sr_dist.data.manifest import read_manifest, shard_path, verify_shards, ManifestError
from hm4sr_dist.data.records import BACKENDS, SPLITS, ShardError, split_ends

Sample = tuple  # (items: ndarray, times: ndarray, end: int)
BUCKET_TAG = 2**31 + 1  # rng stream of length bucketing; pass streams use n_pass < 2**30


class EvalBatch(NamedTuple):
    batch: Batch
    mask: torch.Tensor  # (B,) bool, True on real rows


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
                 bucket_pool_batches: int = 64):
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
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {sorted(BACKENDS)}, got {backend!r}")
        self.dir = Path(prepared_dir)
        self.manifest = read_manifest(self.dir)
        self.split, self.batch_size = split, batch_size
        self.rank, self.world_size = rank, world_size
        self.shuffle = (split == "train") if shuffle is None else shuffle
        self.seed, self.epoch = seed, epoch
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.equalize, self.backend = equalize, backend
        self.max_len = int(max_len or self.manifest["max_len"])
        self.bucket_pool_batches = bucket_pool_batches
        self.shards = self.manifest["shards"]
        self.counts = [int(s[split]) for s in self.shards]
        if split == "train" and len(self.shards) < world_size:
            raise ManifestError(f"{self.dir}: {len(self.shards)} shards for {world_size} ranks; "
                                "re-prepare with --min-shards >= world size")
        verify_shards(self.dir, self.manifest, check=verify,
                      files=[self.shards[i]["file"] for i in self.my_shards()])

    # -- assignment ------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

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
    def _user_stream(self, shard_ids: list[int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        read = BACKENDS[self.backend]
        for i in shard_ids:
            entry = self.shards[i]
            path = shard_path(self.dir, entry)
            users = samples = 0
            for _key, items, times in read(path):
                users += 1
                samples += len(split_ends(len(items), self.split))
                yield items, times
            if users != entry["users"] or samples != entry[self.split]:
                raise ManifestError(f"shard {path}: holds {users} users / {samples} {self.split} "
                                    f"samples, the manifest says {entry['users']} / "
                                    f"{entry[self.split]}")

    def _samples(self, shard_ids: list[int], rng: np.random.Generator | None) -> Iterator[Sample]:
        """Expanded samples; with `rng`, shard order and a buffer of samples are shuffled."""
        if rng is not None:
            shard_ids = list(shard_ids)
            rng.shuffle(shard_ids)
        stream = ((items, times, end) for items, times in self._user_stream(shard_ids)
                  for end in split_ends(len(items), self.split))
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
        mine = self.my_shards()
        steps, b = len(self), self.batch_size
        if self.split == "train":
            if self.num_samples == 0:
                raise ManifestError(f"{self.dir}: rank {self.rank} got no training samples")
            yield from self._train_batches(mine, steps, b)
        else:
            yield from self._eval_batches(mine, steps, b)

    def _train_batches(self, mine: list[int], steps: int, b: int) -> Iterator[Batch]:
        def endless() -> Iterator[Sample]:
            for n_pass in range(1 << 30):  # "pad": a fresh shuffled pass when samples run out
                rng = (np.random.default_rng([self.seed, self.epoch, self.rank, n_pass])
                       if self.shuffle else None)
                yield from self._samples(mine, rng)
        stream = endless()
        pool_batches = self.bucket_pool_batches if self.shuffle else 0
        if pool_batches <= 1:
            for _ in range(steps):
                yield collate([next(stream) for _ in range(b)], self.max_len)
            return
        # a stream of its own (n_pass < 2**30 never reaches BUCKET_TAG): the samples drawn above
        # are the same with and without bucketing
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, BUCKET_TAG])
        done = 0
        while done < steps:
            n = min(pool_batches, steps - done)
            pool = [next(stream) for _ in range(n * b)]
            for rows in self._bucket(pool, n, b, rng):
                yield collate(rows, self.max_len)
            done += n

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

    def _eval_batches(self, mine: list[int], steps: int, b: int) -> Iterator[EvalBatch]:
        stream = self._samples(mine, None)
        filler: Sample | None = None
        for _ in range(steps):
            rows: list[Sample] = []
            for sample in stream:
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
            yield EvalBatch(collate(rows, self.max_len), mask)
        if next(stream, None) is not None:
            raise ShardError(f"{self.dir}: rank {self.rank} has samples beyond its {steps} steps "
                             "(manifest counts are wrong)")
