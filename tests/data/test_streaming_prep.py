"""The two engines give one output: the streaming preparation (`memory_budget_mb > 0`) gives exactly
the Ray Data pipeline's (the default engine):
counts, drops and their examples, ID maps, interval statistics and byte-identical shards, on a
generated log with duplicates, time ties, bad rows and a k-core that takes several rounds.
The sizing floors are lowered so the small log is cut into many chunks, buckets and user ranges.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data_pipelines import streaming_prep
from data_pipelines.config import PrepConfig
from data_pipelines.prepare import main, prepare
from data_pipelines.report import DataError
from hm4sr_dist.data import ShardReader
from hm4sr_dist.memory import resident_bytes

BASE = 1_400_000_000


def make_log(seed: int, n_users: int = 700, n_items: int = 220) -> pd.DataFrame:
    """Power-law users and items, time ties, duplicates spread through a shuffled input order."""
    rng = np.random.default_rng(seed)
    p_item = 1.0 / np.arange(1, n_items + 1) ** 1.1
    p_item /= p_item.sum()
    rows = []
    for u in range(n_users):
        n = int(min(40, rng.zipf(1.8)) + 1)
        t = BASE + int(rng.integers(0, 10**7))
        for i in rng.choice(n_items, size=n, p=p_item):
            t += int(rng.choice([0, 0, 60, 3600, 86400]))   # zeros: ties in time
            rows.append((f"{u * 7919 % 100003}", f"it{i}", t))
    rows = [rows[j] for j in rng.permutation(len(rows))]
    for j in rng.choice(len(rows), size=len(rows) // 20, replace=False):  # exact duplicates
        rows.insert(int(rng.integers(0, len(rows))), rows[j])
    return pd.DataFrame(rows, columns=["uid", "iid", "ts"])


def budget() -> int:
    """MB: what this test process already holds (torch, Ray's driver) + 300 MB of working room."""
    return (resident_bytes() >> 20) + 300


def prepared(tmp: Path, name: str, budget: int, **kw) -> tuple[dict, Path]:
    out = tmp / name
    settings = dict(name="toy", k_core=5, min_shards=7, progress=False, text=False, images=False,
                    user_col="uid", item_col="iid", time_col="ts", memory_budget_mb=budget)
    return prepare(PrepConfig("tabular", str(out), **{**settings, **kw})), out


def assert_same(a: tuple[dict, Path], b: tuple[dict, Path]) -> None:
    (ma, da), (mb, db) = a, b
    ca, cb = (json.loads(json.dumps(m["counts"])) for m in (ma, mb))
    assert ca == cb                                   # drop counts and their examples included
    for key in ("interval", "time", "shards", "tables", "dataset", "fingerprint",
                "n_categories", "categories"):
        assert ma.get(key) == mb.get(key), key
    for table in ("users.parquet", "items.parquet", "categories.npy"):
        if (da / table).exists() or (db / table).exists():
            assert (da / table).read_bytes() == (db / table).read_bytes(), table
    for shard in ma["shards"]:  # byte-identical tars, hence the same users, sequences and splits
        assert (da / "shards" / shard["file"]).read_bytes() == (db / "shards" / shard["file"]).read_bytes()


@pytest.fixture
def small_sizes(monkeypatch):
    """Many chunks, buckets and ranges for a few thousand rows."""
    monkeypatch.setattr(streaming_prep, "MIN_CHUNK_ROWS", 700)
    monkeypatch.setattr(streaming_prep, "MIN_BUCKET_ROWS", 400)
    monkeypatch.setattr(streaming_prep, "MIN_RANGE_ROWS", 300)
    for name in ("CHUNK_BYTES_PER_ROW", "BUCKET_BYTES_PER_ROW", "RANGE_BYTES_PER_ROW"):
        monkeypatch.setattr(streaming_prep, name, 1 << 40)


def parquet_log_with_items(tmp_path: Path) -> tuple[pd.DataFrame, dict]:
    """`make_log(5)` + a missing user, a negative and a far-future timestamp, as Parquet, and an
    item table (CSV) with one repeated row and categories; (the log, the PrepConfig fields)."""
    df = make_log(seed=5)
    df.loc[len(df)] = ["", "it1", BASE]             # missing user
    df.loc[len(df)] = ["42", "it2", -5]              # negative timestamp
    df.loc[len(df)] = ["43", "it3", 1 << 40]         # far future
    df.to_parquet(tmp_path / "log.parquet", index=False)
    items = pd.DataFrame({"iid": [f"it{i}" for i in range(0, 220, 2)] + ["it0"],
                          "title": [f"T{i}" for i in range(111)],
                          "genres": ["a|b" if i % 3 else "c" for i in range(111)]})
    items.to_csv(tmp_path / "items.csv", index=False)
    return df, dict(interactions=str(tmp_path / "log.parquet"), items=str(tmp_path / "items.csv"),
                    item_id_col="iid", category_col="genres")


def test_parquet_log_streamed_equals_ray_data(tmp_path, local_ray, small_sizes, caplog):
    df, kw = parquet_log_with_items(tmp_path)
    with caplog.at_level("INFO", logger="data_pipelines.ray_prep"):
        on_ray = prepared(tmp_path, "ray", 0, **kw)
    c = on_ray[0]["counts"]
    ray_log = caplog.text  # progress: rows read, each k-core round with survivors, shards written
    assert f"read {c['rows_read']:,} rows (3 dropped)" in ray_log
    assert f"k-core round {c['kcore_rounds']}: {c['actions']:,} rows kept; 0 users and 0 items" in ray_log
    assert "wrote 7 shards" in ray_log
    caplog.clear()
    with caplog.at_level("INFO", logger="data_pipelines.streaming"):
        streamed = prepared(tmp_path, "streamed", budget(), progress=True, **kw)
    # preconditions: the log exercises every rule
    assert c["kcore_rounds"] >= 3 and c["dropped"]["duplicate_row"] > 0
    assert c["dropped"]["kcore_5"] > 0 and c["items_stats"]["duplicate_item_metadata"] == 1
    assert {"missing_field", "negative_timestamp", "future_timestamp"} <= set(c["dropped"])
    assert_same(on_ray, streamed)
    assert list(streamed[0]["counts"]["dropped"]) == list(c["dropped"])   # reasons in the same order
    valid = df.iloc[:-3]
    first = valid[valid.duplicated(keep="first")].iloc[0]  # the earliest repeated row, in full
    assert streamed[0]["counts"]["drop_examples"]["duplicate_row"] == \
        [f"e.g. user {first['uid']!r}, item {first['iid']!r}, t={first['ts']}"]
    assert len(streamed[0]["shards"]) == 7
    log = caplog.text  # progress on the work: rows read, buckets i/N, k-core passes, ranges
    n_buckets = int(log.split(" buckets (estimated")[0].rsplit(" ", 1)[1])
    assert n_buckets > 3 and f"bucket {n_buckets}/{n_buckets}" in log
    assert "k-core pass 3" in log and re.search(r"range (\d+)/\1: users", log)
    assert f"read {c['rows_read'] - 3:,} valid rows" in log
    assert not list(tmp_path.glob(".*spill*"))         # scratch files removed
    # the reader sees the same test samples from both folders
    def test_rows(d):
        return sorted((int(b.batch.seq_len[r]), int(b.batch.target[r]))
                      for b in ShardReader(d, "test", batch_size=64)
                      for r in np.flatnonzero(b.mask.numpy()))
    assert test_rows(on_ray[1]) == test_rows(streamed[1])


def test_csv_log_with_numeric_ids_and_equal_ints(tmp_path, local_ray, small_sizes):
    """CSV strings: '7' and '007' are two users with the same integer (first appearance orders
    them), a non-numeric timestamp is a counted drop with its row in the example."""
    df = make_log(seed=9, n_users=500)
    seven = df[df.uid == df.uid.value_counts().index[0]].copy()
    seven["uid"] = "007"
    df = pd.concat([df.assign(uid=df.uid.replace({df.uid.value_counts().index[0]: "7"})), seven])
    df = df.astype({"ts": object})
    df.loc[len(df)] = ["5", "it1", "soon"]
    df.to_csv(tmp_path / "log.csv", index=False)
    kw = dict(interactions=str(tmp_path / "log.csv"), k_core=3)
    on_ray = prepared(tmp_path, "ray", 0, **kw)
    streamed = prepared(tmp_path, "streamed", budget(), **kw)
    assert on_ray[0]["counts"]["dropped"]["bad_timestamp"] == 1
    users = pd.read_parquet(on_ray[1] / "users.parquet")["raw_id"].tolist()
    assert "7" in users and "007" in users
    assert_same(on_ray, streamed)


def test_other_sources_and_rerun_noop(tmp_path, local_ray, small_sizes):
    """A source without a streaming reader (sequence files) still gives the same output; neither the
    budget nor the engine is part of the fingerprint, so switching engines on an up-to-date folder
    is a no-op."""
    from tests.data.fixtures import make_log as tiny_log, write_sequences

    write_sequences(tmp_path / "raw", tiny_log(seed=3, n_users=60, n_items=8))
    cfg = dict(input_dir=str(tmp_path / "raw"), k_core=3, min_shards=3, progress=False)
    on_ray = prepare(PrepConfig("sequence", str(tmp_path / "m"), **cfg))
    streamed = prepare(PrepConfig("sequence", str(tmp_path / "s"), memory_budget_mb=budget(), **cfg))
    assert_same((on_ray, tmp_path / "m"), (streamed, tmp_path / "s"))
    again = prepare(PrepConfig("sequence", str(tmp_path / "m"), memory_budget_mb=400, **cfg))
    assert again["status"] == "up_to_date"


def test_budget_errors_name_the_key(tmp_path, capsys):
    with pytest.raises(DataError, match="memory_budget_mb: expected 0 .* or >= 384"):
        prepare(PrepConfig("tabular", str(tmp_path / "o"), interactions="x.parquet",
                           memory_budget_mb=100))
    rc = main(["--source", "tabular", "--interactions", "x.parquet", "--out-dir",
               str(tmp_path / "o"), "--memory-budget-mb", "-3", "--no-progress"])
    assert rc == 2 and "memory_budget_mb: expected 0" in capsys.readouterr().err
    tight = (resident_bytes() >> 20) + 10  # MB: less than this process + 64 MB
    with pytest.raises(DataError, match="memory_budget_mb: .* leaves"):
        streaming_prep.plan(PrepConfig("tabular", "o", memory_budget_mb=tight), 10)


def test_job_flag_is_checked_before_work():
    from jobs.common import prep_settings
    from hm4sr_dist.config import ConfigError
    from jobs.train import BEAUTY_SEQUENCES as JOB

    assert prep_settings(JOB, ["memory_budget_mb=2048"])["memory_budget_mb"] == 2048
    with pytest.raises(ConfigError, match="memory_budget_mb"):
        prep_settings(JOB, ["memory_budget_mb=12"])
    with pytest.raises(ConfigError, match="memory_budget_mb"):
        prep_settings(JOB, ["memory_budget_mb=lots"])


def test_ranges_are_sized_from_what_the_budget_leaves():
    """Passes 5-6 size their user ranges from the memory left when they start, not from the plan's
    start: what passes 1-4 leave resident shrinks the ranges, down to the floor."""
    mb = 1 << 20
    roomy = streaming_prep.range_rows(768 * mb, 200 * mb, 64 * mb)
    tight = streaming_prep.range_rows(768 * mb, 565 * mb, 64 * mb)
    assert roomy == (504 * mb) // 2 // streaming_prep.RANGE_BYTES_PER_ROW
    assert streaming_prep.MIN_RANGE_ROWS < tight < roomy
    assert streaming_prep.range_rows(768 * mb, 800 * mb, 64 * mb) == streaming_prep.MIN_RANGE_ROWS


def test_peak_memory_is_this_process_own():
    """VmHWM, not ru_maxrss: a child of a large process reports its own peak, not the parent's."""
    import subprocess
    import sys
    ballast = bytearray(300 << 20)  # noqa: F841 - the parent's peak is now >= 300 MB
    out = subprocess.run([sys.executable, "-c", "from hm4sr_dist.memory import peak_resident_bytes;"
                          "print(peak_resident_bytes() >> 20)"], capture_output=True, text=True,
                         check=True)
    assert int(out.stdout) < 200, out.stdout   # the child's peak: an interpreter, well under 300 MB


def test_peak_memory_of_an_exited_process_is_not_ours():
    """A child that has exited (a zombie until reaped: no memory map) reads as 0, not as the
    caller's own peak: the benchmark once reported its own 2.5 GB as the preparation's."""
    import subprocess
    import sys
    from hm4sr_dist.memory import peak_resident_bytes
    import time
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.time() + 30
    while open(f"/proc/{child.pid}/stat").read().split(")")[-1].split()[0] != "Z":
        assert time.time() < deadline, "the child did not exit"
        time.sleep(0.01)                           # until exited, not reaped yet
    assert peak_resident_bytes(child.pid) == 0
    child.wait()
    assert peak_resident_bytes(child.pid) == 0     # reaped: no /proc entry


def test_a_csv_line_with_an_extra_field_is_the_same_counted_drop_on_both_paths(tmp_path):
    """Issue 25, finding 5: a whole-file reader (since removed) refused the whole file, the budgeted
    one kept the line and counted nothing; now both engines drop it as `malformed_line` naming
    file:line."""
    log = make_log(seed=4, n_users=200)
    path = tmp_path / "log.csv"
    log.to_csv(path, index=False)
    lines = path.read_text().splitlines()
    lines[10] += ",EXTRA"                                   # file line 11: one field too many
    path.write_text("\n".join(lines) + "\n")
    on_ray = prepared(tmp_path, "m", 0, interactions=str(path))
    streamed = prepared(tmp_path, "s", budget(), interactions=str(path))
    assert_same(on_ray, streamed)
    counts = on_ray[0]["counts"]
    assert counts["dropped"]["malformed_line"] == 1
    assert counts["drop_examples"]["malformed_line"] == [f"{path}:11: expected 3 fields, saw 4; the line is dropped"]
    assert counts["rows_read"] == len(log)                  # the dropped line was read and counted
    with pytest.raises(DataError, match=rf"{path}:11: expected 3 fields, saw 4"):
        prepared(tmp_path, "strict", 0, interactions=str(path), strict=True)
