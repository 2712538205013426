"""Writing per-user samples to WebDataset tar shards through Ray Data (`write_webdataset`), then
naming, counting and checksumming them for the manifest.

Each row becomes one sample `u<uid>.seq.npy` (see `hm4sr_dist.data.records`). Rows are encoded in
Ray tasks (`map_batches`), split into `n_shards` blocks in user order and written one tar per
block by `DeterministicTarDatasink`; the driver then re-reads every shard (the same code the
trainer uses), so the manifest counts are measured, not assumed.

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

import io
import math
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
from ray.data.block import BlockAccessor
from ray.data.datasource import FilenameProvider
from ray.data.datasource.file_datasink import BlockBasedFileDatasink
from tqdm import tqdm

from data_pipelines.preprocess import Prepared
from hm4sr_dist.data.manifest import (MANIFEST_NAME, SHARD_DIR, DataLocation, ManifestError,
                                      read_manifest, sha256_file, verify_shards)
from hm4sr_dist.data.records import encode_user, iter_shard_tarfile, split_count, user_key

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


def encode_batch(batch: dict[str, np.ndarray], items: np.ndarray, times: np.ndarray) -> dict:
    """Ray Data UDF: (uid, lo, hi) rows -> WebDataset rows (__key__, seq.npy bytes)."""
    keys, payloads = [], []
    for uid, lo, hi in zip(batch["uid"], batch["lo"], batch["hi"]):
        keys.append(user_key(int(uid)))
        payloads.append(encode_user(items[lo:hi], times[lo:hi]))
    return {"__key__": np.array(keys, dtype=object), "seq.npy": np.array(payloads, dtype=object)}


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
    """Ray Data datasink: one WebDataset tar per block; members `<__key__>.<column>`, in row order."""

    def __init__(self, path: str, **kwargs):
        super().__init__(path, file_format="tar", **kwargs)

    def write_block_to_file(self, block: BlockAccessor, file) -> None:
        with open_tar_stream(file) as tar:
            for row in block.iter_rows(public_row_format=False):
                row = row if isinstance(row, dict) else row.as_pydict()
                key = row["__key__"]
                for column, value in row.items():
                    if column.startswith("__") or value is None:
                        continue
                    add_member(tar, key, column, value if isinstance(value, bytes) else str(value).encode())


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


def write_shards(prep: Prepared, shard_dir: str | Path, target_bytes: int, min_shards: int,
                 progress: bool = True, *, filesystem=None) -> list[dict]:
    """Write `prep`'s users to `shard_dir/shard-NNNNN.tar` (a local path, a URI, or a path in
    `filesystem`) and return the manifest's shard entries (measured by reading the shards back)."""
    import ray

    n_shards = shard_count(prep.lengths(), target_bytes, min_shards)
    rows = pd.DataFrame({"uid": np.arange(prep.n_users), "lo": prep.offsets[:-1], "hi": prep.offsets[1:]})
    samples = ray.data.from_pandas(rows).map_batches(
        encode_batch, fn_kwargs={"items": prep.items, "times": prep.times}, batch_size=4096,
        batch_format="numpy")
    return write_samples(samples, shard_dir, n_shards, progress, filesystem=filesystem)


def write_samples(samples, shard_dir: str | Path, n_shards: int, progress: bool = True, *,
                  filesystem=None) -> list[dict]:
    """Write a Ray Dataset of WebDataset rows (`__key__`, `seq.npy`), in user order, as `n_shards`
    tars of contiguous users (`repartition` without shuffle: equal user counts) and return the
    manifest's shard entries (measured by reading the shards back)."""
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
    scanned = []
    for part in tqdm(parts, desc="checking shards", unit=" shard", disable=not progress):
        scanned.append((scan_shard(staging.child(part)), part))
    scanned.sort(key=lambda s: s[0]["first_key"])  # user order, whatever order tasks finished in
    entries = []
    for index, (info, part) in enumerate(scanned):
        name = f"shard-{index:05d}.tar"
        out.fs.move(staging.path(part), out.path(name))
        entries.append({"file": name, "sha256": sha256_file(out.child(name)), "bytes": out.size(name),
                        **{k: v for k, v in info.items() if k != "first_key"}})
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
