"""The Ray Data preparation (the default engine, data_pipelines/ray_prep.py) against the streaming
engine on the inputs that exercise its own parts: Parquet row groups read as separate tasks, CSV
IDs equal as integers, the folder sources read by their adapters inside a task, errors raised in
tasks, users.parquet streamed in row groups. Counts, drops and their examples, ID maps, interval
statistics and byte-identical shards (test_streaming_prep.py holds the shared Parquet log).
"""

from __future__ import annotations

import pandas as pd
import pytest

from data_pipelines.config import PrepConfig
from data_pipelines.prepare import prepare
from data_pipelines.report import DataError
from tests.data.fixtures import make_log as tiny_log, write_amazon, write_ml100k, write_sequences
from tests.data.test_streaming_prep import assert_same, budget, make_log, prepared


def both(tmp_path, **kw):
    """(streaming, Ray Data) preparations of the same tabular input."""
    return prepared(tmp_path, "streaming", budget(), **kw), prepared(tmp_path, "ray", 0, **kw)


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
    streamed, on_ray = both(tmp_path, interactions=str(tmp_path / "log.parquet"))
    assert on_ray[0]["counts"]["drop_examples"]["negative_timestamp"][0].endswith("field 'ts' = -1 < 0")
    assert_same(streamed, on_ray)


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
    streamed, on_ray = both(tmp_path, interactions=str(path), k_core=3)
    counts = on_ray[0]["counts"]["dropped"]
    assert counts["bad_timestamp"] == 1 and counts["malformed_line"] == 1
    users = pd.read_parquet(on_ray[1] / "users.parquet")["raw_id"].tolist()
    assert "7" in users and "007" in users
    assert_same(streamed, on_ray)
    with pytest.raises(DataError, match=rf"{path}:11: expected 3 fields, saw 4"):
        prepared(tmp_path, "strict", 0, interactions=str(path), strict=True)


@pytest.mark.parametrize("source", ["sequence", "movielens", "amazon2014"])
def test_folder_sources(tmp_path, local_ray, source):
    log = tiny_log(seed=3, n_users=60, n_items=8)
    write = {"sequence": write_sequences, "movielens": write_ml100k, "amazon2014": write_amazon}[source]
    write(tmp_path / "raw", log)
    cfg = dict(input_dir=str(tmp_path / "raw"), k_core=3, min_shards=3, progress=False, text=False,
               images=False)
    streamed = prepare(PrepConfig(source, str(tmp_path / "m"), memory_budget_mb=budget(), **cfg))
    on_ray = prepare(PrepConfig(source, str(tmp_path / "r"), **cfg))
    assert on_ray["counts"]["dropped"]["duplicate_row"] >= 1
    assert_same((streamed, tmp_path / "m"), (on_ray, tmp_path / "r"))
    # the engine is not part of the fingerprint: switching engines on an up-to-date folder is a no-op
    assert prepare(PrepConfig(source, str(tmp_path / "m"), engine="ray-data", **cfg))["status"] == "up_to_date"


def test_errors_inside_tasks_come_back_as_data_errors(tmp_path, local_ray):
    raw = tmp_path / "raw"
    write_sequences(raw, tiny_log(seed=1))
    with open(raw / "Toy_item.txt", "a") as fh:
        fh.write("U500 I1 I2\n")                        # a user the time file does not list
    with pytest.raises(DataError, match=r"Toy_item.txt:\d+: user 'U500' has no line in"):
        prepare(PrepConfig("sequence", str(tmp_path / "o"), input_dir=str(raw), progress=False))
    with pytest.raises(DataError, match="engine: expected one of"):
        prepare(PrepConfig("sequence", str(tmp_path / "o"), input_dir=str(raw), engine="spark"))
    with pytest.raises(DataError, match="memory_budget_mb: the streaming engine sizes its passes to a budget"):
        prepare(PrepConfig("sequence", str(tmp_path / "o"), input_dir=str(raw), engine="streaming"))


def test_users_table_streams_in_row_groups_as_write_table_cuts_them(tmp_path, local_ray, monkeypatch):
    """users.parquet is written from the sorted users one row group at a time: with 16-row groups
    its bytes are those of `pq.write_table(..., row_group_size=16)` of the whole table (the
    default, 1 Mi rows, is `write_table`'s, as the streaming engine writes it: byte-identical above)."""
    import pyarrow.parquet as pq

    from data_pipelines import ray_prep

    monkeypatch.setattr(ray_prep, "USERS_ROW_GROUP", 16)
    write_sequences(tmp_path / "raw", tiny_log(seed=4, n_users=60, n_items=8))
    cfg = dict(input_dir=str(tmp_path / "raw"), k_core=3, min_shards=3, progress=False)
    streamed = prepare(PrepConfig("sequence", str(tmp_path / "m"), memory_budget_mb=budget(), **cfg))
    prepare(PrepConfig("sequence", str(tmp_path / "r"), **cfg))
    assert streamed["counts"]["users"] > 32                       # precondition: several row groups
    pq.write_table(pq.read_table(tmp_path / "m" / "users.parquet"), tmp_path / "expected.parquet",
                   row_group_size=16)
    assert pq.ParquetFile(tmp_path / "r" / "users.parquet").metadata.num_row_groups > 2
    assert (tmp_path / "r" / "users.parquet").read_bytes() == (tmp_path / "expected.parquet").read_bytes()
