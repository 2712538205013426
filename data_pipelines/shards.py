"""Writing per-user samples to WebDataset tar shards through Ray Data (`write_webdataset`), then
naming, counting and checksumming them for the manifest.

Each row becomes one sample `u<uid>.seq.npy` (see `hm4sr_dist.data.records`). Rows are encoded in
Ray tasks (`map_batches`), split into `n_shards` blocks in user order and written one tar per
block by `DeterministicTarDatasink`. The manifest's entries are measured as the bytes go out: the
write task hashes every byte it writes and counts each sample's actions from its npy header, and
leaves them in a small `<tar>.json` beside the tar for the driver (reading every shard back cost
half of the Ray Data preparation's shard time at 20M actions). `hm4sr-prepare --verify` reads
the shards back against the manifest.

Why our own datasink rather than `Dataset.write_webdataset`: Ray's writer stamps every member with
a float mtime, which makes tarfile add a PAX header per member (1 KiB more per user: Beauty's
shards were 46.5 MB instead of ~23 MB) and makes the bytes, hence the sha256, differ between
identical runs. Ours writes plain USTAR members with mtime 0: same rows, same bytes.

`shard_dir` may be a local path, a `file://` URI or any `pyarrow.fs.FileSystem.from_uri` URI
(`s3://`, `gs://`; or a path inside an explicit `filesystem=`): Ray Data's tasks write the tars
there directly, and the driver lists, re-reads, renames and checksums them through the same
pyarrow filesystem. `publish_prepared` copies a finished local folder (tables, shards, manifest
last) to such a URI, so a cluster trains from object storage.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import posixpath
import tarfile
from pathlib import Path

import numpy as np
from ray.data.block import BlockAccessor
from ray.data.datasource import FilenameProvider
from ray._common.retry import call_with_retry  # the retry BlockBasedFileDatasink.write_block uses
from ray.data.datasource.file_datasink import BlockBasedFileDatasink

from hm4sr_dist.data.manifest import (MANIFEST_NAME, SHARD_DIR, DataLocation, ManifestError,
                                      read_manifest, verify_shards)
from hm4sr_dist.data.records import SPLITS, iter_shard_tarfile, split_count

TAR_BLOCK = 512


def estimated_bytes(lengths: np.ndarray) -> int:
    """Tar size: a 512-byte header per member + the npy payload (128-byte header + 16 n) rounded up."""
    payload = 128 + 16 * lengths.astype(np.int64)
    return int((TAR_BLOCK + -(-payload // TAR_BLOCK) * TAR_BLOCK).sum()) + 2 * TAR_BLOCK


def shard_count(lengths: np.ndarray, target_bytes: int, min_shards: int) -> int:
    return shard_count_for(estimated_bytes(lengths), len(lengths), target_bytes, min_shards)


def shard_count_for(total_bytes: int, n_users: int, target_bytes: int, min_shards: int) -> int:
    """`shard_count` from the summed `estimated_bytes` (a sum over users: it adds up over pieces)."""
    wanted = max(min_shards, math.ceil(total_bytes / max(target_bytes, 1)))
    return max(1, min(wanted, n_users))


class ShardNames(FilenameProvider):
    """Ray FilenameProvider: one `part-<task>.tar` per write task (renamed in user order after)."""

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"part-{task_index:06d}.tar"

    def get_filename_for_block(self, block, write_uuid: str, task_index: int, block_index: int) -> str:
        return f"part-{task_index:06d}-{block_index:06d}.tar"

    def get_filename_for_row(self, row, write_uuid: str, task_index: int, block_index: int,
                             row_index: int) -> str:  # not used for tar output
        return f"part-{task_index:06d}-{block_index:06d}-{row_index:06d}.tar"


class DeterministicTarDatasink(BlockBasedFileDatasink):
    """Ray Data datasink: one WebDataset tar per block; members `<__key__>.<column>`, in row order.
    Beside each tar, `<tar>.json` holds its manifest entry as written (`ShardTally`)."""

    def __init__(self, path: str, **kwargs):
        super().__init__(path, file_format="tar", **kwargs)

    def write_block(self, block: BlockAccessor, block_index: int, ctx) -> None:
        path = posixpath.join(self.path, self.filename_provider.get_filename_for_task("", ctx.task_idx))

        def write() -> None:
            with self.open_output_stream(path) as file:
                tally = ShardTally(file)
                self.write_block_to_file(block, tally)
            with self.open_output_stream(path + TALLY_SUFFIX) as file:
                file.write(json.dumps(tally.entry()).encode())

        call_with_retry(write, description=f"write '{path}'", match=self._data_context.retried_io_errors)

    def write_block_to_file(self, block: BlockAccessor, file) -> None:
        with open_tar_stream(file) as tar:
            for row in block.iter_rows(public_row_format=False):
                row = row if isinstance(row, dict) else row.as_pydict()
                key = row["__key__"]
                for column, value in row.items():
                    if column.startswith("__") or value is None:
                        continue
                    data = value if isinstance(value, bytes) else str(value).encode()
                    add_member(tar, key, column, data)
                    if isinstance(file, ShardTally) and column == "seq.npy":
                        file.count(key, data)


TALLY_SUFFIX = ".json"


class ShardTally:
    """A write-through file wrapper: the sha256 and size of what goes out, and the shard's
    users, actions and split samples (each sample's length read from its npy header: the
    shape `records.decode_user` checks, without building the arrays)."""

    def __init__(self, file):
        self.file, self.hash, self.bytes = file, hashlib.sha256(), 0
        self.counts = {"users": 0, "actions": 0, **{s: 0 for s in SPLITS}}
        self.first_key = None

    def write(self, data) -> int:
        self.hash.update(data)
        self.bytes += len(data)
        return self.file.write(data)

    def count(self, key: str, payload: bytes) -> None:
        stream = io.BytesIO(payload)
        version = np.lib.format.read_magic(stream)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read_header(stream)
        if dtype != np.int64 or len(shape) != 2 or shape[0] != 2 or shape[1] < 1:
            raise ManifestError(f"sample {key}: seq.npy must be int64 of shape (2, n>=1), got {dtype} {shape}")
        n = int(shape[1])
        self.first_key = self.first_key or key
        self.counts["users"] += 1
        self.counts["actions"] += n
        for split in SPLITS:
            self.counts[split] += split_count(n, split)

    def entry(self) -> dict:
        return {"first_key": self.first_key, "sha256": self.hash.hexdigest(), "bytes": self.bytes, **self.counts}


def open_tar_stream(file) -> tarfile.TarFile:
    """A tar written front to back into `file` (members go out as they are added)."""
    return tarfile.open(fileobj=file, mode="w|", format=tarfile.USTAR_FORMAT)


def add_member(tar: tarfile.TarFile, key: str, column: str, data: bytes) -> None:
    """The WebDataset member `<key>.<column>`, with the fixed metadata that makes shards
    byte-identical however they are written (Ray Data here, the streaming preparation's writer)."""
    info = tarfile.TarInfo(f"{key}.{column}")
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def _delete_dir(where: DataLocation) -> None:
    try:
        where.fs.delete_dir(where.path())
    except (FileNotFoundError, OSError):
        pass                                   # absent (or already gone): nothing to clean


def write_samples(samples, shard_dir: str | Path, n_shards: int, *, filesystem=None) -> list[dict]:
    """Write a Ray Dataset of WebDataset rows (`__key__`, `seq.npy`), in user order, as `n_shards`
    tars of contiguous users (`repartition` without shuffle: equal user counts) and return the
    manifest's shard entries (as the write tasks measured the bytes they wrote)."""
    import pyarrow.fs as pafs
    import ray

    out = DataLocation(shard_dir, filesystem)
    names = ShardNames()
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # shards hold contiguous, ordered user ranges
    staging = DataLocation(out.path().rstrip("/") + ".staging", out.fs)
    staging.uri = out.name().rstrip("/") + ".staging"
    _delete_dir(staging)
    local = staging.local_path()
    # a local folder goes to Ray as a plain path (as before); anything else with its filesystem
    sink = (DeterministicTarDatasink(str(local), filename_provider=names) if local is not None else
            DeterministicTarDatasink(staging.path(), filesystem=staging.fs, filename_provider=names))
    samples.repartition(n_shards).write_datasink(sink)
    try:
        listing = staging.fs.get_file_info(pafs.FileSelector(staging.path(), recursive=False))
    except OSError as exc:
        raise ManifestError(f"{staging.name()}: cannot list the written shards ({exc})") from exc
    parts = sorted(i.base_name for i in listing
                   if i.type == pafs.FileType.File and i.base_name.endswith(".tar"))
    out.fs.create_dir(out.path(), recursive=True)
    written = []
    for part in parts:
        try:
            written.append((json.loads(staging.read_bytes(part + TALLY_SUFFIX)), part))
        except (OSError, ValueError) as exc:
            raise ManifestError(f"{staging.name()}/{part}: no readable tally of the written shard ({exc})") from exc
    written.sort(key=lambda w: w[0]["first_key"])  # user order, whatever order tasks finished in
    entries = []
    for index, (info, part) in enumerate(written):
        name = f"shard-{index:05d}.tar"
        out.fs.move(staging.path(part), out.path(name))
        entries.append({"file": name, **{k: v for k, v in info.items() if k != "first_key"}})
    _delete_dir(staging)
    return entries


def publish_prepared(prepared_dir: str | Path, dest: str, *, filesystem=None,
                     verify: str = "size") -> dict:
    """Copy a finished prepared folder (local or any URI) to `dest` (a path or a URI, or a path
    in `filesystem`): item tables and shards first, `manifest.json` last, so a manifest at `dest`
    means a complete copy (as `prepare` guarantees locally). The copy is then checked against the
    manifest (`verify`: "size" or "sha256"). Returns the manifest."""
    import pyarrow.fs as pafs

    src = DataLocation(prepared_dir)
    manifest = read_manifest(src)
    verify_shards(src, manifest, check=verify)          # never publish a broken folder
    dst = DataLocation(dest, filesystem)
    dst.fs.create_dir(dst.path(SHARD_DIR), recursive=True)
    if dst.exists(MANIFEST_NAME):
        dst.fs.delete_file(dst.path(MANIFEST_NAME))     # incomplete until the new one lands
    files = [(SHARD_DIR, e["file"]) for e in manifest["shards"]]
    for info in src.fs.get_file_info(pafs.FileSelector(src.path(), recursive=False)):
        if info.type == pafs.FileType.File and info.base_name != MANIFEST_NAME:
            files.append((info.base_name,))
    for parts in files:
        with src.open_stream(*parts) as fin, dst.fs.open_output_stream(dst.path(*parts)) as fout:
            while block := fin.read(1 << 22):
                fout.write(block)
    verify_shards(dst, manifest, check=verify)
    dst.write_bytes(src.read_bytes(MANIFEST_NAME), MANIFEST_NAME)
    return manifest


def scan_shard(path: str | Path | DataLocation) -> dict:
    """Counts of one shard, read back with the training reader's own code."""
    info = {"users": 0, "actions": 0, "train": 0, "valid": 0, "test": 0, "first_key": None}
    for key, items, _times in iter_shard_tarfile(path):
        info["first_key"] = info["first_key"] or key
        n = len(items)
        info["users"] += 1
        info["actions"] += n
        for split in ("train", "valid", "test"):
            info[split] += split_count(n, split)
    return info
