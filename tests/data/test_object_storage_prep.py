"""The default engine reads a tabular log from object storage and writes the prepared folder
there: `s3://` URIs on an S3 server in this process (moto), read and written by Ray Data tasks
through pyarrow's S3 filesystem. The folder equals the one prepared from local files, training's
reader streams it from the URI, and a second run is a no-op."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_pipelines.config import PrepConfig
from data_pipelines.prepare import prepare
from data_pipelines.report import DataError
from hm4sr_dist.data import ShardReader, read_manifest
from hm4sr_dist.data.manifest import DataLocation
from tests.data.test_streaming_prep import parquet_log_with_items

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def s3(monkeypatch):
    """An S3 endpoint (moto's server) with bucket `bkt`; the environment every AWS client here and
    in a child process reads (credentials, region, endpoint)."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is in the dev extras")
    import boto3

    logging.getLogger("werkzeug").setLevel(logging.WARNING)   # a line per request otherwise
    server = moto_server.ThreadedMotoServer(port=0, verbose=False)
    server.start()
    host, port = server._server.server_address
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    boto3.client("s3").create_bucket(Bucket="bkt")
    yield env
    server.stop()


def upload(local: Path, uri: str) -> None:
    DataLocation(uri.rsplit("/", 1)[0]).write_bytes(local.read_bytes(), uri.rsplit("/", 1)[1])


def test_a_log_on_s3_is_prepared_to_s3_as_it_is_from_local_files(tmp_path, s3, local_ray):
    _, kw = parquet_log_with_items(tmp_path)
    upload(Path(kw["interactions"]), "s3://bkt/raw/log.parquet")
    upload(Path(kw["items"]), "s3://bkt/raw/items.csv")
    flags = ["--source", "tabular", "--name", "toy", "--user-col", "uid", "--item-col", "iid", "--time-col", "ts",
             "--item-id-col", "iid", "--category-col", "genres", "--min-shards", "4", "--no-text", "--no-images",
             "--no-progress"]
    # a fresh process: its own Ray, whose workers get this environment (the session's Ray predates it)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-m", "data_pipelines.prepare", *flags,
                           "--interactions", "s3://bkt/raw/log.parquet", "--items", "s3://bkt/raw/items.csv",
                           "--out-dir", "s3://bkt/prepared/toy"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    remote = read_manifest("s3://bkt/prepared/toy")
    settings = dict(name="toy", user_col="uid", item_col="iid", time_col="ts", min_shards=4, text=False,
                    images=False, progress=False)
    local = prepare(PrepConfig("tabular", str(tmp_path / "local"), **settings, **kw))
    # the same counts and drops; the examples name the file as given (the URI)
    as_local = json.loads(json.dumps(remote["counts"]).replace("s3://bkt/raw/log.parquet", kw["interactions"]))
    assert as_local == json.loads(json.dumps(local["counts"])) and remote["shards"] == local["shards"]
    assert "s3://bkt/raw/log.parquet:row" in json.dumps(remote["counts"]["drop_examples"])
    assert remote["interval"] == local["interval"] and len(remote["shards"]) == 4
    assert [d["path"] for d in remote["provenance"]["inputs"]] == ["s3://bkt/raw/log.parquet", "s3://bkt/raw/items.csv"]
    loc = DataLocation("s3://bkt/prepared/toy")
    for table in ("users.parquet", "items.parquet", "categories.npy"):
        assert loc.read_bytes(table) == (tmp_path / "local" / table).read_bytes(), table
    assert not loc.exists("shards.staging", local["shards"][0]["file"])       # no staging left
    # training's reader streams the folder from the URI, checking every shard's sha256
    remote_rows = sum(int(b.mask.sum()) for b in ShardReader("s3://bkt/prepared/toy", "test", batch_size=256))
    assert remote_rows == local["counts"]["users"]
    # the same inputs again: nothing to do (in this process: only the manifest and sizes are read)
    again = prepare(PrepConfig("tabular", "s3://bkt/prepared/toy", **settings,
                               **{**kw, "interactions": "s3://bkt/raw/log.parquet", "items": "s3://bkt/raw/items.csv"}))
    assert again["status"] == "up_to_date"


def test_object_storage_errors_name_the_uri(tmp_path, s3):
    with pytest.raises(DataError, match="s3://bkt/raw/none.parquet: table not found"):
        prepare(PrepConfig("tabular", str(tmp_path / "o"), interactions="s3://bkt/raw/none.parquet"))
    with pytest.raises(DataError, match="out_dir: s3://bkt/p is a URI; the streaming engine reads and writes local"):
        prepare(PrepConfig("tabular", "s3://bkt/p", interactions=str(tmp_path / "x.parquet"), memory_budget_mb=512))
    DataLocation("s3://bkt/export").write_bytes(b'{"format": "hm4sr-export"}', "manifest.json")
    with pytest.raises(DataError, match="s3://bkt/export: holds a manifest.json that is not a prepared data set's"):
        prepare(PrepConfig("tabular", "s3://bkt/export", interactions="s3://bkt/raw/none.parquet"))


def test_a_uri_with_its_endpoint_in_the_query_and_a_compressed_input(tmp_path, s3, local_ray):
    """The endpoint and keys in the URI itself (as for MinIO without environment): the shards go
    through the URI's filesystem, never a re-parsed `<uri>/shards` string (the query would swallow
    it). A gzip input on object storage is fingerprinted by its stored bytes, as a local file is."""
    import gzip
    import hashlib

    from data_pipelines.prepare import describe_inputs

    df, kw = parquet_log_with_items(tmp_path)
    endpoint = s3["AWS_ENDPOINT_URL"].split("://", 1)[1]
    query = f"?endpoint_override={endpoint}&scheme=http&region=us-east-1"
    out = f"s3://testing:testing@bkt/q/toy{query}"       # the session's Ray workers have no AWS variables
    settings = dict(name="toy", user_col="uid", item_col="iid", time_col="ts", min_shards=3, text=False,
                    images=False, progress=False, interactions=kw["interactions"])
    written = prepare(PrepConfig("tabular", out, **settings))
    local = prepare(PrepConfig("tabular", str(tmp_path / "local"), **settings))
    assert written["shards"] == local["shards"] and read_manifest(out)["shards"] == local["shards"]
    assert DataLocation(out).exists("shards", local["shards"][-1]["file"])
    gz = tmp_path / "log.csv.gz"
    with gzip.open(gz, "wt") as fh:
        df.to_csv(fh, index=False)
    upload(gz, "s3://bkt/raw/log.csv.gz")
    described = describe_inputs(PrepConfig("tabular", "o", interactions="s3://bkt/raw/log.csv.gz"))
    assert described[0]["sha256"] == hashlib.sha256(gz.read_bytes()).hexdigest()
    assert described[0]["bytes"] == gz.stat().st_size
