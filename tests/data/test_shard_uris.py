"""Prepared folders on any pyarrow filesystem: a local path, a `file://` URI, or a path inside an
explicit pyarrow filesystem. No network here, so the non-local code path (pyarrow streams instead
of the builtin `open`, staging of the tables) runs on pyarrow filesystems that are not
`LocalFileSystem`: a `PyFileSystem` over fsspec's local and in-memory filesystems, which reach
the reader exactly as an `S3FileSystem` would."""

from __future__ import annotations

import json
import shutil
from dataclasses import fields

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch

from data_pipelines.shards import publish_prepared, scan_shard, write_samples
from hm4sr_dist.batch import Batch
from hm4sr_dist.data import ManifestError, ShardError, ShardReader, load_catalog, read_manifest
from hm4sr_dist.data.manifest import DataLocation, local_folder, sha256_file, verify_shards
from hm4sr_dist.data.records import encode_user, user_key

B = 7


def batches(reader) -> list:
    out = []
    for x in reader:
        batch = x if isinstance(x, Batch) else x.batch
        out.append([getattr(batch, f.name).tolist() for f in fields(Batch)])
    return out


def fsspec_fs(kind: str) -> pafs.FileSystem:
    import fsspec
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(fsspec.filesystem(kind)))


@pytest.fixture
def memory_fs():
    fs = fsspec_fs("memory")
    yield fs
    fs.delete_dir_contents("/", accept_root_dir=True)


@pytest.mark.parametrize("backend", ["tarfile", "webdataset"])
def test_a_file_uri_reads_the_same_batches_as_the_path(prepared_sequences, backend):
    uri = prepared_sequences.as_uri()
    assert uri.startswith("file://")
    assert read_manifest(uri) == read_manifest(prepared_sequences)
    verify_shards(uri, check="sha256")
    for split in ("train", "valid"):
        kw = {"split": split, "batch_size": B, "seed": 2, "epoch": 1, "backend": backend}
        assert batches(ShardReader(uri, **kw)) == batches(ShardReader(prepared_sequences, **kw))
    assert load_catalog(uri).n_items == load_catalog(prepared_sequences).n_items


def test_a_subtree_filesystem_and_a_non_local_filesystem_read_the_same(prepared_sequences):
    want = batches(ShardReader(prepared_sequences, "train", B, seed=2))
    subtree = pafs.SubTreeFileSystem(str(prepared_sequences), pafs.LocalFileSystem())
    assert batches(ShardReader("/", "train", B, seed=2, filesystem=subtree)) == want
    assert DataLocation("/", subtree).local_path("x") == prepared_sequences / "x"
    # the same disk behind a filesystem the reader cannot treat as local: pyarrow streams
    remote_like = fsspec_fs("file")
    where = DataLocation(str(prepared_sequences), remote_like)
    assert where.local_path() is None
    for backend in ("tarfile", "webdataset"):
        reader = ShardReader(str(prepared_sequences), "train", B, seed=2, filesystem=remote_like,
                             backend=backend, verify="sha256")
        assert batches(reader) == want


def test_published_to_another_filesystem_then_trained_from_there(prepared_sequences, memory_fs, tmp_path):
    manifest = publish_prepared(prepared_sequences, "/bucket/prepared", filesystem=memory_fs,
                                verify="sha256")
    where = DataLocation("/bucket/prepared", memory_fs)
    assert where.exists("manifest.json") and where.local_path() is None
    for entry in manifest["shards"]:
        assert sha256_file(where.child("shards", entry["file"])) == entry["sha256"]
    for split in ("train", "test"):
        kw = {"split": split, "batch_size": B, "seed": 5, "rank": 1, "world_size": 2}
        got = batches(ShardReader("/bucket/prepared", filesystem=memory_fs, verify="sha256", **kw))
        assert got == batches(ShardReader(prepared_sequences, **kw))
    # the tables are staged on this node (memory-mappable), once
    staged = local_folder("/bucket/prepared", memory_fs, cache_dir=tmp_path / "stage")
    assert json.loads((staged / "manifest.json").read_text()) == manifest
    assert not (staged / "shards").exists()
    assert {p.name for p in staged.iterdir()} == {p.name for p in prepared_sequences.iterdir()
                                                  if p.is_file()}
    stamp = (staged / "manifest.json").stat().st_mtime_ns
    assert local_folder("/bucket/prepared", memory_fs, cache_dir=tmp_path / "stage") == staged
    assert (staged / "manifest.json").stat().st_mtime_ns == stamp


def test_shards_are_written_to_a_uri_with_the_same_bytes(local_ray, tmp_path):
    import ray

    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 12, size=40)
    rows = [{"__key__": user_key(u), "seq.npy": encode_user(rng.integers(1, 31, size=n),
                                                             1_300_000_000 + np.arange(n) * 60)}
            for u, n in enumerate(lengths)]

    def write(where, **kw):
        return write_samples(ray.data.from_items(rows), where, 3, **kw)

    local = write(tmp_path / "a" / "shards")
    via_uri = write((tmp_path / "b" / "shards").as_uri())
    subtree = pafs.SubTreeFileSystem(str(tmp_path / "c"), pafs.LocalFileSystem())
    in_fs = write("shards", filesystem=subtree)
    assert local == via_uri == in_fs and len(local) == 3
    assert sum(e["users"] for e in local) == 40 and sum(e["actions"] for e in local) == lengths.sum()
    for folder in ("a", "b", "c"):
        names = sorted(p.name for p in (tmp_path / folder).iterdir())
        assert names == ["shards"]                                  # no staging folder left
        assert sorted(p.name for p in (tmp_path / folder / "shards").iterdir()) == [e["file"] for e in local]
        for entry in local:  # what the write tasks measured is what a reader finds
            path = tmp_path / folder / "shards" / entry["file"]
            assert sha256_file(path) == entry["sha256"] and path.stat().st_size == entry["bytes"]
            scanned = scan_shard(path)
            assert scanned.pop("first_key") is not None
            assert scanned == {k: entry[k] for k in scanned}


def test_bad_uris_and_missing_files_name_the_uri(prepared_sequences, tmp_path):
    with pytest.raises(ManifestError, match="nosuch://bucket/x: cannot open this URI's filesystem"):
        ShardReader("nosuch://bucket/x")
    missing = (tmp_path / "nothing").as_uri()
    with pytest.raises(ManifestError, match=f"{missing}/manifest.json: no manifest"):
        read_manifest(missing)
    with pytest.raises(ManifestError, match=f"{missing}/manifest.json: no manifest"):
        load_catalog(missing)
    copy = tmp_path / "copy"
    shutil.copytree(prepared_sequences, copy)
    gone = sorted((copy / "shards").iterdir())[0]
    gone.unlink()
    with pytest.raises(ManifestError, match=f"shard {copy.as_uri()}/shards/{gone.name}: listed in "
                                            "the manifest but missing"):
        ShardReader(copy.as_uri(), "valid", B)
    with pytest.raises(ShardError, match=f"shard {copy.as_uri()}/shards/{gone.name}"):
        list(ShardReader(copy.as_uri(), "valid", B, verify="none"))


def test_a_truncated_shard_is_caught_on_a_non_local_filesystem(prepared_sequences, memory_fs):
    publish_prepared(prepared_sequences, "/p", filesystem=memory_fs)
    manifest = read_manifest("/p", filesystem=memory_fs)
    name = manifest["shards"][0]["file"]
    where = DataLocation("/p", memory_fs)
    data = where.read_bytes("shards", name)
    end = -(-len(data.rstrip(b"\0")) // 512) * 512             # end of the last member's data
    where.write_bytes(data[:end], "shards", name)            # end-of-archive marker gone
    with pytest.raises(ShardError, match=rf"shard /p/shards/{name}: truncated \(no end-of-archive"):
        list(ShardReader("/p", "valid", B, filesystem=memory_fs, verify="none"))


def test_tensors_are_equal_not_just_lists(prepared_sequences):
    """(guards the helpers above: they compare tensors through .tolist())"""
    a = next(iter(ShardReader(prepared_sequences.as_uri(), "valid", B))).batch
    b = next(iter(ShardReader(prepared_sequences, "valid", B))).batch
    assert all(torch.equal(getattr(a, f.name), getattr(b, f.name)) for f in fields(Batch))
