"""Source adapters: every raw format parses to the same canonical rows; bad input is reported."""

from __future__ import annotations

import gzip
import time

import pandas as pd
import pytest

from data_pipelines.config import PrepConfig
from data_pipelines.report import DataError
from data_pipelines.sources import load_source
from tests.data.fixtures import (make_log, write_amazon, write_ml1m, write_ml100k, write_sequences)


def rows_of(data) -> list[tuple[str, str, int]]:
    df = data.interactions
    return list(zip(df["user"], df["item"], df["timestamp"].astype(int)))


def test_amazon_literal_lines_text_and_categories(tmp_path):
    log = make_log()
    write_amazon(tmp_path / "raw", log)
    data = load_source(PrepConfig("amazon2014", str(tmp_path / "out"), input_dir=str(tmp_path / "raw")))
    assert rows_of(data) == log and data.rows_read == len(log)
    row = data.items.set_index("item").loc["I1"]
    assert row["text"] == "Title I1. Toys, Cat1, Extra. Brand1"          # title + categories + brand
    assert row["categories"] == ["Toys", "Cat1", "Extra"]
    assert "I8" not in set(data.items["item"])                          # no metadata for the last item


def test_amazon_bad_lines_are_counted_with_file_and_line(tmp_path):
    raw = tmp_path / "raw"
    write_amazon(raw, make_log())
    future = int(time.time()) + 10 * 86400
    bad = ["{'reviewerID': 'A', 'asin': 'I1'}",                                 # 2: missing ts
           "{'reviewerID': 'A', 'asin': 'I1', 'unixReviewTime': 'soon'}",       # 3: non-numeric
           "{'reviewerID': 'A', 'asin': 'I1', 'unixReviewTime': -5}",           # 4: negative
           f"{{'reviewerID': 'A', 'asin': 'I1', 'unixReviewTime': {future}}}",  # 5: far future
           "__import__('os').system('touch " + str(tmp_path / "pwned") + "')",  # 6: never eval'd
           "{'reviewerID': 'A', 'asin': 'I1', 'unixReviewTime': 12"]            # 7: truncated
    good = "{'reviewerID': 'A', 'asin': 'I1', 'unixReviewTime': 1300000000}"
    path = raw / "reviews_Toy_5.json.gz"
    with gzip.open(path, "wt") as fh:
        fh.write("\n".join([good, *bad]) + "\n")
    data = load_source(PrepConfig("amazon2014", str(tmp_path / "o"), input_dir=str(raw)))
    assert data.drops.counts == {"missing_timestamp": 1, "bad_timestamp": 1, "negative_timestamp": 1,
                                 "future_timestamp": 1, "malformed_line": 2}
    assert data.drops.examples["malformed_line"][0].startswith(f"{path}:6:")
    assert data.drops.examples["negative_timestamp"][0].startswith(f"{path}:4:")
    assert not (tmp_path / "pwned").exists()
    assert rows_of(data) == [("A", "I1", 1300000000)]
    with pytest.raises(DataError, match=rf"{path}:2: field 'unixReviewTime' is missing"):
        load_source(PrepConfig("amazon2014", str(tmp_path / "o"), input_dir=str(raw), strict=True))


def test_movielens_100k_and_1m(tmp_path):
    log = [r for r in make_log() if r[0] != "U99"]
    write_ml100k(tmp_path / "a", log)
    write_ml1m(tmp_path / "b", log)
    a = load_source(PrepConfig("movielens", "", input_dir=str(tmp_path / "a")))
    b = load_source(PrepConfig("movielens", "", input_dir=str(tmp_path / "b")))
    expected = [(u[1:], i[1:], t) for u, i, t in log]
    assert rows_of(a) == expected and rows_of(b) == expected
    assert a.name == "ml-100k" and a.category_names == ["unknown", "Action", "Comedy"]
    one = a.items.set_index("item").loc["1"]
    assert one["text"] == "Café 1 (1995) Action, Comedy" and one["categories"] == ["Action", "Comedy"]
    assert b.items.set_index("item").loc["2"]["categories"] == ["Drama", "War"]


def test_movielens_malformed_line(tmp_path):
    write_ml100k(tmp_path, make_log())
    with open(tmp_path / "u.data", "a") as fh:
        fh.write("7\t3\t4\n7\t3\t4\tnoon\n")
    data = load_source(PrepConfig("movielens", "", input_dir=str(tmp_path)))
    n = len(make_log())
    assert data.drops.counts == {"malformed_line": 1, "bad_timestamp": 1}
    assert data.drops.examples["malformed_line"][0].startswith(f"{tmp_path / 'u.data'}:{n + 1}:")
    with pytest.raises(DataError, match=rf"u.data:{n + 1}:"):
        load_source(PrepConfig("movielens", "", input_dir=str(tmp_path), strict=True))


def test_sequence_files(tmp_path):
    log = make_log()
    write_sequences(tmp_path, log)
    data = load_source(PrepConfig("sequence", "", input_dir=str(tmp_path)))
    by_user = sorted(log, key=lambda r: int(r[0][1:]))  # the files group rows by user
    grouped = [r for u in dict.fromkeys(u for u, _, _ in log) for r in log if r[0] == u]
    assert rows_of(data) == grouped and len(by_user) == len(grouped) and data.items is None
    with open(tmp_path / "Toy_time.txt", "a") as fh:  # a user line with one timestamp too few
        fh.write("U50 1300000000\n")
    with open(tmp_path / "Toy_item.txt", "a") as fh:
        fh.write("U50 I1 I2\n")
    data = load_source(PrepConfig("sequence", "", input_dir=str(tmp_path)))
    assert data.drops.counts == {"malformed_line": 2}


@pytest.mark.parametrize("longer", ["item", "time"])
def test_sequence_files_with_one_user_more_in_one_file_stop_naming_the_line(tmp_path, longer):
    """One line more in either file is an error naming that file and line (a plain zip once took
    the extra item line and the user vanished without a count)."""
    write_sequences(tmp_path, make_log())
    path = tmp_path / f"Toy_{longer}.txt"
    n_lines = len(path.read_text().splitlines())
    with open(path, "a") as fh:
        fh.write("U99 I1 I2\n" if longer == "item" else "U99 1300000000 1300000001\n")
    with pytest.raises(DataError, match=rf"Toy_{longer}.txt:{n_lines + 1}: user 'U99' has no line in "):
        load_source(PrepConfig("sequence", "", input_dir=str(tmp_path)))


def test_tabular_csv_and_parquet(tmp_path, local_ray):
    """A tabular log has no whole-file adapter: the engine reads it in pieces. Parquet seconds and
    CSV milliseconds give the same prepared folder; the item table's categories and images land."""
    from data_pipelines.prepare import prepare

    log = make_log()
    df = pd.DataFrame(log, columns=["uid", "iid", "ts"])
    df.to_parquet(tmp_path / "x.parquet")
    df.assign(ts=df["ts"] * 1000).to_csv(tmp_path / "x.csv", index=False)
    pd.DataFrame({"iid": ["I1", "I2"], "title": ["One", "Two"], "genre": ["a|b", "c"],
                  "img": ["/x/1.png", ""]}).to_csv(tmp_path / "items.csv", index=False)
    common = dict(user_col="uid", item_col="iid", time_col="ts", k_core=1, min_shards=2, progress=False,
                  text=False, images=False, name="x")
    a = prepare(PrepConfig("tabular", str(tmp_path / "a"), interactions=str(tmp_path / "x.parquet"), **common))
    b = prepare(PrepConfig("tabular", str(tmp_path / "b"), interactions=str(tmp_path / "x.csv"), time_unit="ms",
                           items=str(tmp_path / "items.csv"), item_id_col="iid", category_col="genre",
                           image_col="img", **common))
    assert a["counts"]["rows_read"] == b["counts"]["rows_read"] == len(log)
    assert a["counts"]["actions"] == b["counts"]["actions"] and a["shards"] == b["shards"]   # same bytes
    items = pd.read_parquet(tmp_path / "b" / "items.parquet").set_index("raw_id")
    assert list(items.loc["I1", "categories"]) == ["a", "b"] and pd.isna(items.loc["I2", "image"])
    with pytest.raises(DataError, match="missing column"):
        prepare(PrepConfig("tabular", str(tmp_path / "c"), interactions=str(tmp_path / "x.parquet")))


@pytest.mark.parametrize("flags,message", [
    (["--source", "sequence", "--input-dir", "RAW", "--min-shards", "0"], "min_shards: expected a whole number >= 1, got 0"),
    (["--source", "sequence", "--input-dir", "RAW", "--max-len", "0"], "max_len: expected a whole number >= 1, got 0"),
    (["--source", "amazon2014", "--category", "Beauty"], "input_dir: source amazon2014 reads a folder"),
    (["--source", "movielens", "--input-dir", "RAW/missing"], "input_dir: RAW/missing is not a folder"),
    (["--source", "tabular"], "interactions: source tabular reads a .parquet or .csv file"),
])
def test_prepare_refuses_settings_it_cannot_work_with_before_reading(tmp_path, capsys, flags, message):
    """Exit 2 with one line naming the key, before any file is read or Ray starts (issue 25, 4)."""
    from data_pipelines.prepare import main
    raw = tmp_path / "raw"
    write_sequences(raw, make_log())
    flags = [f.replace("RAW", str(raw)) for f in flags]
    assert main(flags + ["--out-dir", str(tmp_path / "out"), "--no-progress"]) == 2
    assert message.replace("RAW", str(raw)) in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("source,write", [("amazon2014", write_amazon), ("movielens", write_ml100k),
                                          ("sequence", write_sequences)])
def test_folder_sources_read_in_frames_give_the_whole_log(tmp_path, monkeypatch, source, write):
    """The Ray Data read task takes a folder source's log frame by frame (`read_source`): small
    frames hold every row of the whole read, in order, with the same drops, lines and items."""
    from data_pipelines import canonical
    from data_pipelines.sources import read_source

    log = make_log(seed=5, n_users=40)
    write(tmp_path / "raw", log)
    noise = {"sequence": {"Toy_item.txt": "U77 I1 I2\n", "Toy_time.txt": "U77 1300000000\n"},
             "movielens": {"u.data": "7\t1\t4\tsoon\n"}}.get(source, {})   # counted drops
    for name, line in noise.items():
        with open(tmp_path / "raw" / name, "a") as fh:
            fh.write(line)
    cfg = PrepConfig(source, "", input_dir=str(tmp_path / "raw"))
    whole = load_source(cfg)
    monkeypatch.setattr(canonical, "CHUNK_ROWS", 7)
    read = read_source(cfg)
    frames = list(read.frames)
    data = read.finish()
    longest = max(len(v) for v in pd.DataFrame(log).groupby(0)[1].apply(list))   # a sequence line stays whole
    assert len(frames) > 5 and all(len(f) <= 7 + (longest if source == "sequence" else 0) for f in frames)
    assert list(zip(*[pd.concat(frames)[c] for c in ("user", "item", "timestamp")])) == rows_of(whole)
    assert data.rows_read == whole.rows_read and data.drops.counts == whole.drops.counts
    assert source == "amazon2014" or sum(whole.drops.counts.values()) > 0
    assert data.interactions is None and data.name == whole.name
    if whole.items is not None:
        pd.testing.assert_frame_equal(data.items, whole.items)
