"""The experimental Ray Data preparation (`engine="ray-data"`, data_pipelines/ray_prep.py) gives the
in-memory path's output: counts, drops and their examples, ID maps (users.parquet, items.parquet),
interval statistics and byte-identical shards, on the real Ray Data of the embedded local Ray.
"""

from __future__ import annotations

import pandas as pd
import pytest

from data_pipelines.config import PrepConfig
from data_pipelines.prepare import prepare
from data_pipelines.report import DataError
from tests.data.fixtures import make_log as tiny_log, write_amazon, write_ml100k, write_sequences
from tests.data.test_streaming_prep import assert_same, make_log, parquet_log_with_items, prepared

# the engine is not the default: its tests run with `pytest -m experimental`, not in the
# default run (pyproject.toml), which they would lengthen by about 4 minutes
pytestmark = pytest.mark.experimental


def both(tmp_path, **kw):
    """(in-memory, Ray Data) preparations of the same tabular input."""
    return prepared(tmp_path, "memory", 0, **kw), prepared(tmp_path, "ray", 0, engine="ray-data", **kw)


def test_parquet_log_with_bad_rows_duplicates_and_items(tmp_path, local_ray, caplog):
    _, kw = parquet_log_with_items(tmp_path)
    with caplog.at_level("INFO", logger="data_pipelines.ray_prep"):
        memory, on_ray = both(tmp_path, **kw)
    c = memory[0]["counts"]
    # preconditions: the log exercises every rule
    assert c["kcore_rounds"] >= 3 and c["dropped"]["duplicate_row"] > 0 and c["dropped"]["kcore_5"] > 0
    assert {"missing_field", "negative_timestamp", "future_timestamp"} <= set(c["dropped"])
    assert_same(memory, on_ray)
    assert list(on_ray[0]["counts"]["dropped"]) == list(c["dropped"])   # reasons in the same order
    log = caplog.text  # progress: rows read, each k-core round with survivors, shards written
    assert f"read {c['rows_read']:,} rows (3 dropped)" in log
    assert f"k-core round {c['kcore_rounds']}: {c['actions']:,} rows kept; 0 users and 0 items" in log
    assert "wrote 7 shards" in log


def test_parquet_in_several_parts_numbers_rows_across_parts(tmp_path, local_ray, monkeypatch):
    """Row groups read as separate parts (tasks): seq, drop rows and duplicates span parts."""
    from data_pipelines import ray_read
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr(ray_read, "PART_ROWS", 900)
    df = make_log(seed=7, n_users=500)
    df.loc[1500] = ["77", "it1", -1]                  # a bad row in the second part
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp_path / "log.parquet",
                   row_group_size=500)
    memory, on_ray = both(tmp_path, interactions=str(tmp_path / "log.parquet"))
    assert memory[0]["counts"]["drop_examples"]["negative_timestamp"][0].endswith("field 'ts' = -1 < 0")
    assert_same(memory, on_ray)


def test_csv_with_numeric_ids_equal_ints_and_a_malformed_line(tmp_path, local_ray):
    """'7' and '007': two users with the same integer (first appearance orders them); a line with
    an extra field and a non-numeric timestamp are counted drops naming their line and row."""
    df = make_log(seed=9, n_users=500)
    top = df.uid.value_counts().index[0]
    seven = df[df.uid == top].copy()
    seven["uid"] = "007"
    df = pd.concat([df.assign(uid=df.uid.replace({top: "7"})), seven]).astype({"ts": object})
    df.loc[len(df)] = ["5", "it1", "soon"]
    path = tmp_path / "log.csv"
    df.to_csv(path, index=False)
    lines = path.read_text().splitlines()
    lines[10] += ",EXTRA"
    path.write_text("\n".join(lines) + "\n")
    memory, on_ray = both(tmp_path, interactions=str(path), k_core=3)
    counts = memory[0]["counts"]["dropped"]
    assert counts["bad_timestamp"] == 1 and counts["malformed_line"] == 1
    users = pd.read_parquet(memory[1] / "users.parquet")["raw_id"].tolist()
    assert "7" in users and "007" in users
    assert_same(memory, on_ray)
    with pytest.raises(DataError, match=rf"{path}:11: expected 3 fields, saw 4"):
        prepared(tmp_path, "strict", 0, engine="ray-data", interactions=str(path), strict=True)


@pytest.mark.parametrize("source", ["sequence", "movielens", "amazon2014"])
def test_folder_sources(tmp_path, local_ray, source):
    log = tiny_log(seed=3, n_users=60, n_items=8)
    write = {"sequence": write_sequences, "movielens": write_ml100k, "amazon2014": write_amazon}[source]
    write(tmp_path / "raw", log)
    cfg = dict(input_dir=str(tmp_path / "raw"), k_core=3, min_shards=3, progress=False, text=False,
               images=False)
    memory = prepare(PrepConfig(source, str(tmp_path / "m"), **cfg))
    on_ray = prepare(PrepConfig(source, str(tmp_path / "r"), engine="ray-data", **cfg))
    assert memory["counts"]["dropped"]["duplicate_row"] >= 1
    assert_same((memory, tmp_path / "m"), (on_ray, tmp_path / "r"))
    # the engine is not part of the fingerprint: switching paths on an up-to-date folder is a no-op
    assert prepare(PrepConfig(source, str(tmp_path / "m"), engine="ray-data", **cfg))["status"] == "up_to_date"


def test_errors_inside_tasks_come_back_as_data_errors(tmp_path, local_ray):
    raw = tmp_path / "raw"
    write_sequences(raw, tiny_log(seed=1))
    with open(raw / "Toy_item.txt", "a") as fh:
        fh.write("U500 I1 I2\n")                        # a user the time file does not list
    with pytest.raises(DataError, match=r"Toy_item.txt:\d+: user 'U500' has no line in"):
        prepare(PrepConfig("sequence", str(tmp_path / "o"), input_dir=str(raw), engine="ray-data",
                           progress=False))
    with pytest.raises(DataError, match="engine: expected one of"):
        prepare(PrepConfig("sequence", str(tmp_path / "o"), input_dir=str(raw), engine="spark"))


def test_users_table_streams_in_row_groups_as_write_table_cuts_them(tmp_path, local_ray, monkeypatch):
    """users.parquet is written from the sorted users one row group at a time: with 16-row groups
    its bytes are those of `pq.write_table(..., row_group_size=16)` of the in-memory table (the
    default, 1 Mi rows, is the in-memory path's: byte-identical above)."""
    import pyarrow.parquet as pq

    from data_pipelines import ray_prep

    monkeypatch.setattr(ray_prep, "USERS_ROW_GROUP", 16)
    write_sequences(tmp_path / "raw", tiny_log(seed=4, n_users=60, n_items=8))
    cfg = dict(input_dir=str(tmp_path / "raw"), k_core=3, min_shards=3, progress=False)
    memory = prepare(PrepConfig("sequence", str(tmp_path / "m"), **cfg))
    prepare(PrepConfig("sequence", str(tmp_path / "r"), engine="ray-data", **cfg))
    assert memory["counts"]["users"] > 32                       # precondition: several row groups
    pq.write_table(pq.read_table(tmp_path / "m" / "users.parquet"), tmp_path / "expected.parquet",
                   row_group_size=16)
    assert pq.ParquetFile(tmp_path / "r" / "users.parquet").metadata.num_row_groups > 2
    assert (tmp_path / "r" / "users.parquet").read_bytes() == (tmp_path / "expected.parquet").read_bytes()
