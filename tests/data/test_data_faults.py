"""Fault injection on a prepared folder (issue 25): each broken input ends the training job with one
`error: ...` line and exit code 2, and none is retried.

- Found by the driver's pre-flight, before Ray starts (a subprocess whose RAY_TMPDIR stays empty):
  a truncated shard, a missing shard, too few shards for the workers, a missing manifest, a folder
  of an older manifest schema.
- Found by a worker as it reads (the bytes keep their size, so only reading finds them): a byte
  flipped inside the catalogue (the shard's sha256, at the shard's end) and a broken npy header
  (at decode). Ray Train would retry these `train.max_failures` times; the run stops on the first
  attempt instead (`train/data_errors.py`): one TensorBoard event file, one worker start.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest

from hm4sr_dist.data.manifest import MANIFEST_NAME, SHARD_DIR, ManifestError
from hm4sr_test_utils import assert_user_error, run

TINY = ["model.hidden_size=8", "model.inner_size=16", "model.max_seq_len=12", "model.n_layers=1",
        "optim.epochs=1", "eval.batch_size=256"]


def copy_of(prepared: Path, dest: Path) -> Path:
    shutil.copytree(prepared, dest)
    return dest


def shards(folder: Path) -> list[Path]:
    return sorted((folder / SHARD_DIR).glob("*.tar"))


def train(work: Path, prepared: Path, *args: str):
    return run(work, "jobs/train.py", "--dataset", "beauty", "--prepared-dir", str(prepared),
               "--output", str(work / "out"), f"train.storage_path={work / 'runs'}", *TINY, *args)


def truncate(folder: Path) -> str:
    shard = shards(folder)[0]
    shard.write_bytes(shard.read_bytes()[:-2048])
    return f"shard {shard}: "


def remove_shard(folder: Path) -> str:
    shard = shards(folder)[-1]
    shard.unlink()
    return f"shard {shard}: listed in the manifest but missing"


def remove_manifest(folder: Path) -> str:
    (folder / MANIFEST_NAME).unlink()
    return str(folder)


def older_schema(folder: Path) -> str:
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["schema_version"] = manifest["schema_version"] - 1
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    return "schema_version"


@pytest.mark.parametrize("fault", [truncate, remove_shard, remove_manifest, older_schema])
def test_a_broken_folder_stops_the_job_before_ray_starts(work, prepared_sequences, fault):
    folder = copy_of(prepared_sequences, work / "prepared")
    expected = fault(folder)
    result = train(work, folder, "train.num_workers=1", "optim.batch_size=64")
    assert_user_error(work, result, notes_allowed=True)
    assert expected in result.stderr, result.stderr
    assert not (work / "runs").exists() and not (work / "out").exists()


def test_too_few_shards_for_the_workers_stops_the_job_before_ray_starts(work, prepared_sequences):
    n = len(shards(prepared_sequences))
    result = train(work, prepared_sequences, f"train.num_workers={n + 1}", f"optim.batch_size={64 * (n + 1)}")
    assert_user_error(work, result, start=f"error: {prepared_sequences}: {n} shards for train.num_workers={n + 1}",
                      notes_allowed=True)


def flip_item_byte(folder: Path) -> str:
    """One byte of the first sample's first item ID changed to another valid ID: size kept."""
    from test_shard_integrity import first_item_offset

    shard = shards(folder)[0]
    data = bytearray(shard.read_bytes())
    offset = first_item_offset(shard)
    data[offset] = 1 if data[offset] != 1 else 2
    shard.write_bytes(bytes(data))
    return f"shard {shard}: its bytes do not match the manifest's sha256"


def break_npy_header(folder: Path) -> str:
    """The first sample's npy magic overwritten: the tar is intact, its size kept."""
    shard = shards(folder)[0]
    with tarfile.open(shard) as tar:
        member = next(m for m in tar if m.isfile())
    data = bytearray(shard.read_bytes())
    data[member.offset_data:member.offset_data + 6] = b"NOTNPY"
    shard.write_bytes(bytes(data))
    return f"shard {shard}"


@pytest.mark.slow
@pytest.mark.parametrize("fault", [flip_item_byte, break_npy_header])
def test_a_corrupt_shard_stops_the_run_on_its_first_pass_without_retries(prepared_sequences, local_ray,
                                                                         tmp_path, fault):
    from jobs.train import DatasetJob
    from jobs.common import run_job

    folder = copy_of(prepared_sequences, tmp_path / "prepared")
    expected = fault(folder)
    argv = ["--prepared-dir", str(folder), "--output", str(tmp_path / "out"), *TINY,
            "optim.batch_size=64", "train.num_workers=1", "train.max_failures=2", "train.run_name=faulty",
            f"train.storage_path={tmp_path / 'runs'}", "train.tracking_uri=off"]
    with pytest.raises(ManifestError) as err:
        run_job(DatasetJob("seq", "sequence"), argv)
    message = str(err.value)
    assert expected in message and "\n" not in message and "without retrying" in message
    events = list((tmp_path / "runs" / "faulty" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1, events                     # one worker start: the error was not retried
    assert not (tmp_path / "out").exists()


def test_a_run_name_clash_and_a_short_epoch_cap_stop_the_job_before_ray_starts(work, prepared_sequences):
    """Issue 25, finding 7: both were reported only after Ray had started."""
    from hm4sr_dist.config import load_config
    from hm4sr_dist.data.manifest import read_manifest
    from hm4sr_dist.train.identity import check_or_record, run_identity
    from hm4sr_dist.train.state import TrainState, save_worker_files

    fingerprint = read_manifest(prepared_sequences).get("fingerprint")
    other = load_config("configs/hm4sr_paper.yaml", ["loss.idcl_weight=0.5"])
    check_or_record(str(work / "runs" / "clash"), run_identity(other, fingerprint))
    result = train(work, prepared_sequences, "train.run_name=clash", "train.num_workers=1", "optim.batch_size=64")
    assert_user_error(work, result, start="error: train.run_name", notes_allowed=True)
    assert "loss.idcl_weight" in result.stderr

    mine = load_config("configs/hm4sr_paper.yaml", [*TINY, "train.num_workers=1", "optim.batch_size=64",
                                                     f"data.prepared_dir={prepared_sequences}"])
    from hm4sr_dist.feasibility import DataOffer, resolve
    mine = resolve(mine, DataOffer.from_manifest(read_manifest(prepared_sequences))).config
    run_dir = work / "runs" / "long"
    check_or_record(str(run_dir), run_identity(mine, fingerprint))
    checkpoint = run_dir / "checkpoint_2026-01-01_00-00-00.000000"
    checkpoint.mkdir()
    save_worker_files(checkpoint, 0, TrainState(epoch=3, best_epoch=2), None)
    result = train(work, prepared_sequences, "train.run_name=long", "train.num_workers=1", "optim.batch_size=64")
    assert_user_error(work, result, start="error: optim.epochs=1: run long has already trained 3 epochs",
                      notes_allowed=True)


def test_a_storage_hiccup_is_retried_and_a_bad_byte_is_not(tmp_path, monkeypatch):
    """Only errors of the bytes are final (`data_errors.data_error_of` finds them); an I/O failure
    that may pass (a network reset while a shard streams, a storage timeout) is retried as any
    worker failure, so a flaky bucket does not end a long run."""
    import builtins

    from hm4sr_dist.data.manifest import DataLocation
    from hm4sr_dist.data.records import ShardError, iter_shard_tarfile
    from hm4sr_dist.train.data_errors import data_error_of

    shard = tmp_path / "shard-00000.tar"
    with tarfile.open(shard, "w") as tar:
        (tmp_path / "u000000000.seq.npy").write_bytes(b"x")
        tar.add(tmp_path / "u000000000.seq.npy", arcname="u000000000.seq.npy")
    real_open = builtins.open

    def flaky_open(file, *args, **kwargs):
        if str(file) == str(shard):
            raise ConnectionResetError(104, "Connection reset by peer")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", flaky_open)
    with pytest.raises(ShardError) as reset:
        list(iter_shard_tarfile(shard))
    monkeypatch.setattr(builtins, "open", real_open)
    assert reset.value.transient and data_error_of(reset.value) is None

    shard.write_bytes(shard.read_bytes()[:700])                         # cut short: the same every time
    with pytest.raises(ShardError, match="truncated") as cut:
        list(iter_shard_tarfile(shard))
    assert not cut.value.transient and data_error_of(cut.value) is cut.value

    where = DataLocation(str(tmp_path))
    with pytest.raises(ManifestError) as timeout:
        where._call("read", ("x",), lambda _: (_ for _ in ()).throw(TimeoutError("storage timed out")))
    assert timeout.value.transient and data_error_of(timeout.value) is None
    with pytest.raises(ManifestError, match="missing") as missing:
        where.read_bytes("no-such-file")
    assert not missing.value.transient and data_error_of(missing.value) is missing.value
