"""One shard sample = one user: key `u<uid>`, member `seq.npy`, an int64 array (2, n) holding the
user's items (row 0) and unix timestamps (row 1), oldest first, the whole kept history.

The reader expands a user into samples (prefixes) itself: on Beauty this stores 22k samples
instead of 198k prefix samples (see docs/data.md for the measurements).

This module and `manifest` are the on-disk format: numpy and the standard library only (no torch,
no model), because the preparation's Ray Data tasks import them.

Split of one user with n >= 3 items (spec §1, leave-one-out); a sample is (history, end):
input = items[max(0, end - L):end], target = items[end].
- train: end = 1 .. n-3  (every prefix of the training part items[:n-2]; n-3 samples)
- valid: end = n-2       (input = the training part)
- test:  end = n-1       (input = training part + validation item)
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

MEMBER = "seq.npy"
SPLITS = ("train", "valid", "test")
Sample = tuple  # (items: ndarray, times: ndarray, end: int); input = items[:end], target = items[end]


class ShardError(IOError):
    """A shard is unreadable, truncated or holds a malformed sample; the message names it.
    `transient`: the read failed on I/O that may pass (manifest.transient_io), not on the bytes."""

    transient = False


def user_key(uid: int) -> str:
    return f"u{uid:09d}"


def encode_user(items: np.ndarray, times: np.ndarray) -> bytes:
    """The `seq.npy` payload for one user (int64 always: timestamps must keep whole seconds)."""
    stream = io.BytesIO()
    np.save(stream, np.stack([np.asarray(items, dtype=np.int64), np.asarray(times, dtype=np.int64)]))
    return stream.getvalue()


@dataclass(frozen=True)
class Bounds:
    """What a decoded sample may hold: item IDs in 1..n_items, timestamps in [t_min, t_max]
    (the manifest's counts and time range)."""

    n_items: int
    t_min: int
    t_max: int

    @classmethod
    def from_manifest(cls, manifest: dict) -> "Bounds | None":
        """From a manifest's item count and time range (None where it lacks them)."""
        try:
            return cls(int(manifest["counts"]["items"]), int(manifest["time"]["min"]),
                       int(manifest["time"]["max"]))
        except (KeyError, TypeError):
            return None

    def check(self, items: np.ndarray, times: np.ndarray, where: str) -> None:
        bad = np.flatnonzero((items < 1) | (items > self.n_items))
        if bad.size:
            raise ShardError(f"{where}: item ID {int(items[bad[0]])} at position {int(bad[0])} is "
                             f"outside 1..{self.n_items} (corrupt shard?)")
        bad = np.flatnonzero((times < self.t_min) | (times > self.t_max))
        if bad.size:
            raise ShardError(f"{where}: timestamp {int(times[bad[0]])} at position {int(bad[0])} is "
                             f"outside the data's [{self.t_min}, {self.t_max}] (corrupt shard?)")


def decode_user(payload: bytes, where: str, bounds: Bounds | None = None) -> tuple[np.ndarray, np.ndarray]:
    try:
        arr = np.load(io.BytesIO(payload), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - any decoding failure is a corrupt sample
        raise ShardError(f"{where}: cannot decode {MEMBER}: {exc}") from None
    if arr.dtype != np.int64 or arr.ndim != 2 or arr.shape[0] != 2 or arr.shape[1] < 1:
        raise ShardError(f"{where}: {MEMBER} must be int64 of shape (2, n>=1), "
                         f"got {arr.dtype} {arr.shape}")
    if bounds is not None:
        bounds.check(arr[0], arr[1], where)
    return arr[0], arr[1]


def split_ends(n: int, split: str) -> range:
    """The `end` positions of a user's samples in `split` (see the module docstring)."""
    if n < 3:
        return range(0)
    if split == "train":
        return range(1, n - 2)
    if split == "valid":
        return range(n - 2, n - 1)
    if split == "test":
        return range(n - 1, n)
    raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")


def split_count(n: int, split: str) -> int:
    return len(split_ends(n, split))


def user_samples(items: np.ndarray, times: np.ndarray, split: str) -> Iterator[Sample]:
    """One user's samples of `split` as (items, times, end), oldest prefix first: the only sample
    expansion (the shard reader and the synthetic test data both use it)."""
    return ((items, times, end) for end in split_ends(len(items), split))


def _shard(path) -> tuple["DataLocation", Path | None]:
    """(location, local path or None) of a shard given as a path, a URI or a `DataLocation`."""
    from hm4sr_dist.data.manifest import DataLocation

    where = DataLocation(path)
    return where, where.local_path()


class _HashingReader:
    """A file whose bytes are hashed (sha256) in file order as they are read: each byte once,
    also when the reader seeks back to read some again. `finish()` reads the rest and gives the
    hex digest (None if a forward seek skipped bytes)."""

    def __init__(self, raw):
        self.raw, self.pos, self.hashed, self.digest = raw, 0, 0, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        if self.pos + len(data) > self.hashed and self.pos <= self.hashed:
            self.digest.update(data[self.hashed - self.pos:])
            self.hashed = self.pos + len(data)
        self.pos += len(data)
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = self.raw.seek(pos, whence)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def finish(self) -> str | None:
        if self.pos > self.hashed:
            return None
        self.seek(self.hashed)
        while self.read(1 << 20):
            pass
        return self.digest.hexdigest()


def iter_shard_tarfile(path, sha256: str | None = None,
                       bounds: Bounds | None = None) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Yield (key, items, times) from one shard with the tarfile module, in file order.

    `path`: a local path, a URI (`file://`, `s3://`, ...) or a `manifest.DataLocation` of the
    file; messages name it as given. `sha256`: the manifest's digest, checked against the bytes
    read once the shard has been read to its end (a flipped byte names the shard instead of
    feeding training). `bounds`: item IDs and timestamps range-checked as each sample is decoded."""
    where, local = _shard(path)
    path = where.name()
    try:
        # local disk: the builtin file (the measured path); elsewhere a pyarrow random-access file
        with (open(local, "rb") if local is not None else where.open_file()) as file:
            raw = _HashingReader(file) if sha256 else file
            with tarfile.open(fileobj=raw, mode="r|") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, _, ext = member.name.partition(".")
                    if ext != MEMBER:
                        raise ShardError(f"shard {path}: unexpected member {member.name!r}")
                    fh = tar.extractfile(member)
                    payload = fh.read() if fh is not None else b""
                    if len(payload) != member.size:
                        raise ShardError(f"shard {path}: member {member.name} is truncated")
                    items, times = decode_user(payload, f"shard {path}, sample {key}", bounds)
                    yield key, items, times
                end = tar.offset
            # tarfile stops quietly when a file ends at a member boundary: a complete archive ends
            # with two zero blocks, so their absence means the shard was cut short.
            raw.seek(end)
            if raw.read(1024) != bytes(1024):
                raise ShardError(f"shard {path}: truncated (no end-of-archive marker after "
                                 f"byte {end})")
            if sha256 and raw.finish() != sha256:
                raise ShardError(f"shard {path}: its bytes do not match the manifest's sha256 "
                                 "(corrupt or replaced; re-prepare, or check with "
                                 "`hm4sr-prepare --verify`)")
    except ShardError:
        raise
    except (tarfile.TarError, OSError, EOFError) as exc:
        from hm4sr_dist.data.manifest import transient_io

        error = ShardError(f"shard {path}: unreadable or truncated tar ({exc})")
        error.transient = transient_io(exc)
        raise error from None


def iter_shard_webdataset(path, sha256: str | None = None,
                          bounds: Bounds | None = None) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """The same as `iter_shard_tarfile` through the webdataset library (measured in the benchmark).

    Shards are assigned to ranks by `ShardReader` itself, so webdataset's node/worker splitters are
    the identity here (its default `single_node_only` refuses multi-rank runs, webdataset#440).
    A shard off the local disk is opened through pyarrow and handed to webdataset as a stream.
    `sha256` is not checked here (webdataset reads the file itself; the reader's default backend,
    tarfile, checks it); `bounds` is.
    """
    import webdataset as wds

    where, local = _shard(path)
    path, stream = where.name(), None
    try:
        if local is not None:
            ds = wds.WebDataset([str(local)], shardshuffle=False, nodesplitter=lambda s: s,
                                workersplitter=lambda s: s, empty_check=False)
        else:
            stream = where.open_stream()
            ds = wds.tariterators.group_by_keys(
                wds.tariterators.tar_file_expander([{"stream": stream, "url": path}]))
        for sample in ds:
            key = sample["__key__"]
            if MEMBER not in sample:
                raise ShardError(f"shard {path}: sample {key} has no {MEMBER}")
            items, times = decode_user(sample[MEMBER], f"shard {path}, sample {key}", bounds)
            yield key, items, times
    except ShardError:
        raise
    except Exception as exc:  # noqa: BLE001 - webdataset re-raises tar errors with varied types
        raise ShardError(f"shard {path}: unreadable or truncated tar ({exc})") from None
    finally:
        if stream is not None:
            stream.close()


BACKENDS = {"tarfile": iter_shard_tarfile, "webdataset": iter_shard_webdataset}
