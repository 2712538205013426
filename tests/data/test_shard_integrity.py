"""Shards are checked as they are read (issue 25, finding 2): a byte changed inside a shard, size
unchanged, is an error naming the shard instead of a silent or late failure in training.
- out of range (an item ID past the catalogue, a timestamp outside the data): named with the
  sample as it is decoded;
- in range (another valid item ID): the shard's bytes no longer match the manifest's sha256,
  named when the shard has been read to its end.
`verify="none"` turns both off (the reader of old)."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest

from hm4sr_dist.data import ShardError, ShardReader
from hm4sr_dist.data.manifest import MANIFEST_NAME, SHARD_DIR
from test_bucketing import write_prepared

LENGTHS = [5, 8, 6, 9, 7, 5, 6, 8]


@pytest.fixture
def prepared(tmp_path):
    root = write_prepared(tmp_path / "prepared", LENGTHS, n_shards=2, max_len=10)
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    manifest["counts"]["items"] = 1000 * len(LENGTHS) + max(LENGTHS)      # user u holds u*1000+1..
    (root / MANIFEST_NAME).write_text(json.dumps(manifest))
    return root


def first_item_offset(shard) -> int:
    """Byte offset in the shard file of the first sample's first item ID (int64, little-endian)."""
    with tarfile.open(shard) as tar:
        member = next(m for m in tar if m.isfile())
        payload = tar.extractfile(member).read()
    items_and_times = np.load(io.BytesIO(payload))                # (2, n) int64, C order, at the end
    return member.offset_data + len(payload) - items_and_times.nbytes


def rewrite_first_item(shard, value: int) -> None:
    data = bytearray(shard.read_bytes())
    at = first_item_offset(shard)
    data[at:at + 8] = np.int64(value).tobytes()
    shard.write_bytes(bytes(data))


def read_all(root, **kw) -> list:
    return list(ShardReader(root, "train", 4, seed=1, prefetch_batches=0, **kw))


def test_an_item_id_outside_the_catalogue_is_named_with_its_sample(prepared):
    shard = sorted((prepared / SHARD_DIR).glob("*.tar"))[0]
    rewrite_first_item(shard, 1_048_809)
    with pytest.raises(ShardError, match=rf"shard .*{shard.name}, sample u0+: item ID 1048809 at "
                                         r"position 0 is outside 1\.\.8009"):
        read_all(prepared)


def test_a_changed_byte_inside_the_catalogue_fails_the_shards_checksum(prepared):
    shard = sorted((prepared / SHARD_DIR).glob("*.tar"))[0]
    size = shard.stat().st_size
    rewrite_first_item(shard, 2)                       # user 0's item 1 -> item 2: a valid ID
    assert shard.stat().st_size == size                # the size check at construction passes
    with pytest.raises(ShardError, match=rf"shard .*{shard.name}: its bytes do not match the "
                                         r"manifest's sha256"):
        read_all(prepared)
    assert len(read_all(prepared, verify="none")) > 0  # unchecked, as before: trained on silently


def test_intact_shards_read_unchanged_with_the_checks(prepared):
    checked, unchecked = read_all(prepared), read_all(prepared, verify="none")
    assert len(checked) == len(unchecked) > 0
    for a, b in zip(checked, unchecked):
        assert all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("item_seq", "time_seq", "target"))


def test_prepare_verify_names_a_corrupt_shard_and_passes_an_intact_folder(prepared, capsys):
    """`hm4sr-prepare --verify DIR`: exit 0 with a summary, or exit 2 naming the shard."""
    from data_pipelines.prepare import main
    assert main(["--verify", str(prepared)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok: ") and f"{len(LENGTHS)} users" in out and "sha256 match" in out
    shard = sorted((prepared / SHARD_DIR).glob("*.tar"))[1]
    rewrite_first_item(shard, 3)                       # user 1's item 1001 -> item 3: a valid ID
    assert main(["--verify", str(prepared)]) == 2
    assert f"{shard.name}: its bytes do not match the manifest's sha256" in capsys.readouterr().err


def test_the_driver_checks_the_shards_before_ray_starts(prepared):
    """Issue 25, finding 3 (in part): a truncated shard and too few shards for the workers stop in
    the driver with one line (a ManifestError: exit 2 in the jobs), not in retried workers."""
    from hm4sr_dist.config import ExperimentConfig
    from hm4sr_dist.data import ManifestError
    from hm4sr_dist.train.launcher import check_prepared
    cfg = ExperimentConfig()
    cfg.data.prepared_dir, cfg.train.num_workers = str(prepared), 2
    assert len(check_prepared(cfg)["shards"]) == 2
    cfg.train.num_workers = 3
    with pytest.raises(ManifestError, match=r"2 shards for train.num_workers=3 .* --min-shards >= 3"):
        check_prepared(cfg)
    cfg.train.num_workers = 2
    shard = sorted((prepared / SHARD_DIR).glob("*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[:-2000])
    with pytest.raises(ManifestError, match=rf"shard .*{shard.name}: \d+ bytes, the manifest says"):
        check_prepared(cfg)
