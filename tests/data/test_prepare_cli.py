"""The CLI, idempotent re-runs, change detection, and image downloads."""

from __future__ import annotations

import logging

import pytest

from data_pipelines.config import PrepConfig
from data_pipelines.features.download import fetch_images
from data_pipelines.prepare import main, prepare
from hm4sr_dist.data import read_manifest
from tests.data.fixtures import draw_images, make_log, write_ml100k, write_sequences


def test_rerun_is_a_noop_and_changes_are_detected(tmp_path, local_ray, caplog):
    raw = tmp_path / "raw"
    write_sequences(raw, make_log(seed=2, n_users=30, n_items=6))
    cfg = PrepConfig("sequence", str(tmp_path / "out"), input_dir=str(raw), k_core=3, min_shards=3,
                     progress=False)
    first = prepare(cfg)
    assert first["status"] == "written" and len(first["shards"]) == 3
    assert "text" not in first["features"] and "categories" not in first  # sequence files: IDs only
    stamp = (tmp_path / "out" / "manifest.json").stat().st_mtime_ns
    assert prepare(cfg)["status"] == "up_to_date"
    assert (tmp_path / "out" / "manifest.json").stat().st_mtime_ns == stamp
    with caplog.at_level(logging.WARNING, logger="data_pipelines.prepare"):
        cfg.k_core = 2
        assert prepare(cfg)["status"] == "written"
        assert "config k_core: 3 -> 2" in caplog.text
        with open(raw / "Toy_item.txt", "a") as fi, open(raw / "Toy_time.txt", "a") as ft:
            fi.write("U77 I1 I2 I3\n")
            ft.write("U77 1300000000 1300000001 1300000002\n")
        assert prepare(cfg)["status"] == "written"
        assert f"input {raw / 'Toy_item.txt'}" in caplog.text
    assert read_manifest(tmp_path / "out")["counts"]["users"] == first["counts"]["users"] + 1
    cfg.force = True
    assert prepare(cfg)["status"] == "written"


def test_cli_summary_and_clear_errors(tmp_path, local_ray, capsys):
    write_ml100k(tmp_path / "ml", make_log(seed=4, n_users=30, n_items=6))
    rc = main(["--source", "movielens", "--input-dir", str(tmp_path / "ml"), "--out-dir",
               str(tmp_path / "out"), "--k-core", "3", "--no-text", "--no-progress", "--min-shards", "2"])
    out = capsys.readouterr().out
    assert rc == 0
    manifest = read_manifest(tmp_path / "out")
    assert f"kept users {manifest['counts']['users']:>16,}".split() == \
        [w for w in out.splitlines() if "kept users" in w][0].split()
    assert "dropped: duplicate_row" in out and "shards written" in out
    assert manifest["n_categories"] == 3                      # genres from u.genre, fixed order
    rc = main(["--source", "movielens", "--input-dir", str(tmp_path / "nothing"), "--out-dir",
               str(tmp_path / "o2"), "--no-progress"])
    assert rc == 2 and "input_dir: " + str(tmp_path / "nothing") + " is not a folder" in capsys.readouterr().err
    rc = main(["--source", "movielens", "--input-dir", str(tmp_path / "ml"), "--out-dir",
               str(tmp_path / "o3"), "--k-core", "50", "--no-text", "--no-progress"])
    assert rc == 2 and "nothing left after the 50-core" in capsys.readouterr().err
    busy = tmp_path / "busy"               # a folder with other things in it is never replaced
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    rc = main(["--source", "movielens", "--input-dir", str(tmp_path / "ml"), "--out-dir", str(busy),
               "--k-core", "3", "--no-text", "--no-progress"])
    assert rc == 2 and f"{busy}: --prepared-dir exists, is not empty" in capsys.readouterr().err
    assert (busy / "notes.txt").read_text() == "mine"
    export_like = tmp_path / "export"          # a manifest.json of another kind (an hm4sr-export's)
    export_like.mkdir()
    (export_like / "manifest.json").write_text('{"format": "hm4sr-export"}')
    rc = main(["--source", "movielens", "--input-dir", str(tmp_path / "ml"), "--out-dir", str(export_like),
               "--k-core", "3", "--no-text", "--no-progress"])
    assert rc == 2 and "holds no prepared data set" in capsys.readouterr().err
    (tmp_path / "out" / "my_notes.md").write_text("mine")   # a user's file beside a prepared set
    rc = main(["--source", "movielens", "--input-dir", str(tmp_path / "ml"), "--out-dir",
               str(tmp_path / "out"), "--k-core", "2", "--no-text", "--no-progress"])
    assert rc == 2 and "holds my_notes.md beside the prepared data set" in capsys.readouterr().err
    assert (tmp_path / "out" / "my_notes.md").read_text() == "mine"


def test_image_download_retries_and_caches(tmp_path):
    draw_images(tmp_path / "src", ["a", "b"])
    urls = {"a": f"file://{tmp_path}/src/a.png", "b": f"file://{tmp_path}/src/b.png",
            "c": f"file://{tmp_path}/src/missing.png"}
    paths, stats = fetch_images(urls, tmp_path / "cache", workers=3, retries=2, progress=False,
                                backoff=0.0)
    assert stats["downloaded"] == 2 and stats["failed"] == 1 and paths["c"] is None
    assert open(paths["a"], "rb").read() == (tmp_path / "src" / "a.png").read_bytes()
    (tmp_path / "src" / "a.png").unlink()                     # cached: never fetched again
    paths, stats = fetch_images(urls, tmp_path / "cache", workers=3, retries=0, progress=False)
    assert stats["cached"] == 2 and paths["a"] is not None


def test_bad_source_name_is_an_error(tmp_path):
    from data_pipelines.report import DataError

    with pytest.raises(DataError, match="source: expected one of"):
        prepare(PrepConfig("csvv", str(tmp_path / "o")))


def test_under_a_cluster_address_the_budget_does_not_stop_prepare(tmp_path, local_ray):
    """Under `ray job submit` (RAY_ADDRESS set) prepare joins the cluster as it is: Ray refuses an
    object store size or a CPU count from a process that connects, so `--memory-budget-mb` (which
    sizes a Ray that prepare starts) is logged and left out instead of failing the job."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    raw = tmp_path / "raw"
    write_sequences(raw, make_log(seed=2, n_users=30, n_items=6))
    env = {**os.environ, "RAY_ADDRESS": local_ray.get_runtime_context().gcs_address}
    done = subprocess.run([sys.executable, "-m", "data_pipelines.prepare", "--source", "sequence",
                           "--input-dir", str(raw), "--out-dir", str(tmp_path / "out"), "--k-core", "3",
                           "--min-shards", "2", "--engine", "ray-data", "--memory-budget-mb", "512",
                           "--num-cpus", "1", "--no-progress"],
                          cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "joining" in done.stderr and read_manifest(tmp_path / "out")["counts"]["users"] > 0
