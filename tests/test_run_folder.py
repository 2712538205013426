"""The run folder writer replaces only the files it owns, each whole: the folder may be shared
(the quickstart writes its results beside its raw data, shards and Train runs)."""

from __future__ import annotations

import json

import numpy as np

from hm4sr_dist.run_folder import (PER_USER_FILE, RESULTS_FILE, STOPPED_FILE, read_results,
                                   write_run_folder)


def _checkpoint(folder, *, stopped: bool, ndcg: float):
    folder.mkdir(parents=True, exist_ok=True)
    final = {"test/ndcg@10": ndcg, "test/count": 3, "best_valid": 0.5, "best_epoch": 1, "epochs_run": 2,
             **({"stopped_early": True, "stopped_by": "user"} if stopped else {})}
    (folder / "final_metrics.json").write_text(json.dumps(final))
    np.savez(folder / PER_USER_FILE, user=np.arange(3), rank=np.array([1, 4, 2]))
    return folder


def _write(run_dir, ckpt):
    config = {"data": {"prepared_dir": "p"}, "train": {"run_name": "toy-0123"}, "optim": {"epochs": 9}}
    return write_run_folder(run_dir, ckpt, config=config, dataset="toy", identity="0123",
                            fingerprint=None, wall_seconds=1.0)


def test_writer_leaves_other_files_and_replaces_its_own(tmp_path):
    run_dir = tmp_path / "work"
    (run_dir / "prepared").mkdir(parents=True)
    (run_dir / "prepared" / "manifest.json").write_text("{}")
    (run_dir / "raw.json.gz").write_bytes(b"raw")

    _write(run_dir, _checkpoint(tmp_path / "c1", stopped=False, ndcg=0.25))
    assert read_results(run_dir)["test"]["ndcg@10"] == 0.25
    assert np.load(run_dir / PER_USER_FILE)["rank"].tolist() == [1, 4, 2]
    assert (run_dir / "prepared" / "manifest.json").read_text() == "{}"
    assert (run_dir / "raw.json.gz").read_bytes() == b"raw"

    _write(run_dir, _checkpoint(tmp_path / "c2", stopped=True, ndcg=0.1))    # stopped: no result
    assert not (run_dir / RESULTS_FILE).exists() and not (run_dir / PER_USER_FILE).exists()
    assert read_results(run_dir, STOPPED_FILE)["status"] == "stopped"

    _write(run_dir, _checkpoint(tmp_path / "c3", stopped=False, ndcg=0.3))    # finished again
    assert read_results(run_dir)["test"]["ndcg@10"] == 0.3 and not (run_dir / STOPPED_FILE).exists()
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(
        [RESULTS_FILE, PER_USER_FILE, "prepared", "raw.json.gz"])           # no temporary left
