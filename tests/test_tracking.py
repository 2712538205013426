"""hm4sr_dist.tracking against a real MLflow (SQLite in tmp_path): what a run records is what
`mlflow.search_runs` finds; a resumed identity continues its run; studies nest; bad URIs fail fast."""

import math
import pickle
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import mlflow  # a runtime dependency: missing, the file must fail, not skip
import pytest

from hm4sr_dist.tracking import (
    CHANGED_PREFIX,
    IDENTITY_TAG,
    PARENT_TAG,
    STUDY_TAG,
    NullTracker,
    Tracker,
    TrackingError,
    default_artifact_location,
    find_run,
    sanitize_key,
    tracking_uri_for,
)


@pytest.fixture(scope="module")
def blank_db(tmp_path_factory):
    """One migrated MLflow database (creating the tables takes seconds), copied into each test."""
    from mlflow import MlflowClient
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(tmp_path, blank_db, monkeypatch):
    """(tracking URI from the default rule, storage folder); the working directory is tmp_path, so an
    artifact MLflow put in ./mlruns would show."""
    monkeypatch.chdir(tmp_path)
    storage = tmp_path / "storage"
    storage.mkdir()
    shutil.copy(blank_db, storage / "mlflow.db")
    uri = tracking_uri_for("", str(storage))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)         # for mlflow.search_runs (fluent API)
    return uri, storage


def runs(experiment):
    return mlflow.search_runs(experiment_names=[experiment], output_format="list")


def only_run(experiment):
    found = runs(experiment)
    assert len(found) == 1, [r.info.run_id for r in found]
    return found[0]


# --- the URI --------------------------------------------------------------------------------------

def test_default_uri_rules(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert tracking_uri_for("", "outputs/ray_results") == f"sqlite:///{tmp_path}/outputs/ray_results/mlflow.db"
    assert tracking_uri_for("", str(tmp_path / "s")) == f"sqlite:///{tmp_path}/s/mlflow.db"
    assert tracking_uri_for("", f"file://{tmp_path}/s") == f"sqlite:///{tmp_path}/s/mlflow.db"
    for off in ("off", "none", " OFF ", "None", "false", "no"):      # `off` reads as YAML false
        assert tracking_uri_for(off, str(tmp_path)) is None
        assert tracking_uri_for(off, "s3://bucket/results") is None
    for given in ("http://mlflow.internal:5000", "sqlite:////shared/mlflow.db", "file:///shared/mlruns"):
        assert tracking_uri_for(given, "s3://bucket/results") == given
        assert tracking_uri_for(given, str(tmp_path)) == given
    assert capsys.readouterr().err == ""

    # A URI storage path and no tracking URI: off, with one note per storage path and process.
    assert tracking_uri_for("", "s3://bucket/tracking-note-test") is None
    assert tracking_uri_for("", "s3://bucket/tracking-note-test") is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tracking off: train.storage_path=s3://bucket/tracking-note-test")
    assert "train.tracking_uri" in err

    assert default_artifact_location(f"sqlite:///{tmp_path}/s/mlflow.db") == f"{tmp_path}/s/mlartifacts"
    assert default_artifact_location("sqlite:///rel/mlflow.db") == f"{tmp_path}/rel/mlartifacts"
    assert default_artifact_location("http://mlflow.internal:5000") is None


def test_a_relative_local_store_is_made_absolute_for_every_process(tmp_path, monkeypatch):
    from hm4sr_dist.job_config import resolve_job_config
    from hm4sr_dist.tracking import absolute_tracking_uri

    monkeypatch.chdir(tmp_path)
    assert absolute_tracking_uri("sqlite:///runs/mlflow.db") == f"sqlite:///{tmp_path}/runs/mlflow.db"
    assert absolute_tracking_uri("mlruns") == str(tmp_path / "mlruns")
    for given in ("sqlite:////shared/mlflow.db", "http://host:5000", "off", "", "sqlite:///:memory:",
                  "postgresql://u@h/db", "file:///abs/mlruns"):
        assert absolute_tracking_uri(given) == given
    cfg = resolve_job_config(None, ["train.tracking_uri=sqlite:///mlflow.db"]).config
    assert cfg.train.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"


def test_metric_key_sanitising():
    from mlflow.utils.validation import _validate_metric_name, _validate_param_name, _validate_tag_name

    expected = {
        "test/ndcg@5": "test/ndcg_at_5",
        "valid/hit@10": "valid/hit_at_10",
        "optim.lr": "optim.lr",
        "train/loss-cp_x.y": "train/loss-cp_x.y",
        "a b:c(d)é": "a_b_c_d__",
        "a//b/": "a/b",
        "/lead": "lead",
        "a/./b": "a/_/b",
        "..": "__",
        "": "_",
        "param_changed.optim.epochs": "param_changed.optim.epochs",
    }
    for raw, key in expected.items():
        assert sanitize_key(raw) == key, raw
        assert sanitize_key(key) == key                      # stable: sanitising twice changes nothing
        for validate in (_validate_metric_name, _validate_param_name, _validate_tag_name):
            validate(key)                                    # MLflow accepts it
    long_a, long_b = "x" * 300 + "a", "x" * 300 + "b"
    assert len(sanitize_key(long_a)) == 250 and sanitize_key(long_a) != sanitize_key(long_b)
    assert sanitize_key(long_a) == sanitize_key(long_a)


# --- one run --------------------------------------------------------------------------------------

def test_params_metrics_artifacts_are_found_by_search(store, tmp_path):
    uri, storage = store
    config = {"name": "demo", "optim": {"lr": 0.001, "epochs": 3}, "data": {"modalities": ["id", "text"]},
              "train": {"use_gpu": "auto", "compile": False, "empty": {}},
              "notes": "y" * 7000, "wide": {f"k{i:03d}": i for i in range(150)}}   # > 100: two batches
    (tmp_path / "results.json").write_text('{"test/ndcg@10": 0.5}')
    (tmp_path / "figs").mkdir()
    (tmp_path / "figs" / "curve.txt").write_text("1 2 3")

    with Tracker.open(uri, experiment="exp", identity="run-a#1234", run_name="run-a",
                      tags={"hm4sr.code": "abc123"}) as tracker:
        assert tracker.enabled and not tracker.resumed
        assert tracker.log_params(config) == []
        skipped = tracker.log_metrics({"test/ndcg@5": 0.25, "train/loss": 1, "valid": {"hit@10": 0.75},
                                       "bad_nan": math.nan, "bad_inf": -math.inf, "flag": True,
                                       "text": "0.3", "missing": None}, step=7)
        assert skipped == 5 and tracker.skipped_metrics == 5
        tracker.log_artifact(tmp_path / "results.json")
        tracker.log_artifacts(tmp_path / "figs", artifact_path="figures")

    run = only_run("exp")
    assert run.info.run_id == tracker.run_id and run.info.status == "FINISHED"
    assert run.info.run_name == "run-a"
    params = run.data.params
    assert params["optim.lr"] == "0.001" and params["optim.epochs"] == "3" and params["name"] == "demo"
    assert params["data.modalities"] == '["id", "text"]' and params["train.compile"] == "False"
    assert params["train.empty"] == "{}"
    assert len(params["notes"]) == 6000 and params["notes"].endswith("...[7000 chars]")
    assert params["wide.k000"] == "0" and params["wide.k149"] == "149" and len(params) == 158
    assert run.data.metrics == {"test/ndcg_at_5": 0.25, "train/loss": 1.0, "valid/hit_at_10": 0.75}
    assert run.data.tags[IDENTITY_TAG] == "run-a#1234" and run.data.tags["hm4sr.code"] == "abc123"
    assert PARENT_TAG not in run.data.tags

    client = mlflow.MlflowClient(uri)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test/ndcg_at_5")] == [7]
    # Artifacts under the storage path, nothing in the working directory's ./mlruns.
    artifact_dir = storage / "mlartifacts" / run.info.run_id / "artifacts"
    assert run.info.artifact_uri.endswith(f"mlartifacts/{run.info.run_id}/artifacts")
    assert (artifact_dir / "results.json").read_text() == '{"test/ndcg@10": 0.5}'
    assert (artifact_dir / "figures" / "curve.txt").read_text() == "1 2 3"
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == ["figures", "results.json"]
    assert not (tmp_path / "mlruns").exists()


def test_reopening_an_identity_continues_its_run(store):
    uri, _ = store
    first = Tracker.open(uri, "exp", identity="run-b#99", run_name="run-b")
    first.log_params({"optim": {"lr": 0.1}})
    first.log_metrics({"train/loss": 2.0}, step=10)
    first.finish("KILLED")                                   # the job was stopped
    assert find_run(uri, "exp", "run-b#99") == first.run_id

    again = Tracker.open(uri, "exp", identity="run-b#99", run_name="ignored-on-resume")
    assert again.run_id == first.run_id and again.resumed
    client = mlflow.MlflowClient(uri)
    assert client.get_run(again.run_id).info.status == "RUNNING"
    assert again.log_params({"optim": {"lr": 0.1}}) == []    # same config: nothing to change
    again.log_metrics({"train/loss": 1.5}, step=20)
    again.log_metrics({"train/loss": 1.25}, step=30)
    again.finish()

    other = Tracker.open(uri, "exp", identity="run-c#77", run_name="run-c")
    other.finish()
    assert other.run_id != first.run_id

    run = mlflow.search_runs(experiment_names=["exp"], output_format="list",
                             filter_string=f"tags.`{IDENTITY_TAG}` = 'run-b#99'")
    assert [r.info.run_id for r in run] == [first.run_id]
    assert run[0].info.status == "FINISHED" and run[0].info.run_name == "run-b"
    assert run[0].data.metrics["train/loss"] == 1.25
    history = client.get_metric_history(first.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(10, 2.0), (20, 1.5), (30, 1.25)]
    assert len(runs("exp")) == 2


def test_a_changed_param_on_resume_is_a_tag(store):
    uri, _ = store
    with Tracker.open(uri, "exp", identity="run-d", run_name="run-d") as tracker:
        tracker.log_params({"optim": {"epochs": 3, "lr": 0.01}})
    with Tracker.open(uri, "exp", identity="run-d", run_name="run-d") as resumed:
        changed = resumed.log_params({"optim": {"epochs": 5, "lr": 0.01}, "eval": {"batch_size": 64}})
        assert changed == ["optim.epochs"]
        assert resumed.log_params({"optim": {"epochs": 8, "lr": 0.01}}) == ["optim.epochs"]
    run = only_run("exp")
    assert run.info.run_id == tracker.run_id
    assert run.data.params == {"optim.epochs": "3", "optim.lr": "0.01", "eval.batch_size": "64"}
    assert run.data.tags[CHANGED_PREFIX + "optim.epochs"] == "8"      # the latest value
    assert CHANGED_PREFIX + "optim.lr" not in run.data.tags


def test_context_manager_marks_a_failed_run(store):
    uri, _ = store
    with pytest.raises(RuntimeError, match="boom"), \
            Tracker.open(uri, "exp", identity="run-e", run_name="run-e") as tracker:
        tracker.log_metrics({"train/loss": 3.0}, step=1)
        raise RuntimeError("boom")
    run = only_run("exp")
    assert run.info.status == "FAILED" and run.data.metrics == {"train/loss": 3.0}
    with pytest.raises(ValueError, match="FINISHED, FAILED, KILLED"):
        tracker.finish("DONE")


# --- a study --------------------------------------------------------------------------------------

def test_study_parent_with_two_children(store):
    uri, _ = store
    parent = Tracker.open(uri, "study-exp", identity="study:s1", run_name="s1", tags={STUDY_TAG: "s1"})

    def child(name):                # the study driver opens trials from its threads
        tracker = Tracker.open(uri, "study-exp", identity=f"trial:{name}", run_name=name,
                               parent_run_id=parent.run_id, tags={STUDY_TAG: "s1"})
        tracker.log_metrics({"valid/ndcg@10": 0.1 if name == "t1" else 0.2}, step=1)
        tracker.finish()
        return tracker.run_id

    with ThreadPoolExecutor(2) as pool:
        ids = dict(zip(("t1", "t2"), pool.map(child, ("t1", "t2"))))
    parent.finish()

    found = {r.info.run_id: r for r in runs("study-exp")}
    assert set(found) == {parent.run_id, *ids.values()}
    assert PARENT_TAG not in found[parent.run_id].data.tags
    assert found[parent.run_id].data.tags[STUDY_TAG] == "s1"
    for name, run_id in ids.items():
        assert found[run_id].data.tags[PARENT_TAG] == parent.run_id
        assert found[run_id].data.tags[IDENTITY_TAG] == f"trial:{name}" and found[run_id].info.run_name == name
    assert found[ids["t2"]].data.metrics == {"valid/ndcg_at_10": 0.2}
    nested = mlflow.search_runs(experiment_names=["study-exp"], output_format="list",
                                filter_string=f"tags.`{PARENT_TAG}` = '{parent.run_id}'")
    assert sorted(r.info.run_id for r in nested) == sorted(ids.values())

    # The resumed study continues its parent and its children; another parent gets its own child.
    assert Tracker.open(uri, "study-exp", identity="study:s1", run_name="s1").run_id == parent.run_id
    again = Tracker.open(uri, "study-exp", identity="trial:t1", run_name="t1", parent_run_id=parent.run_id)
    assert again.run_id == ids["t1"]
    assert find_run(uri, "study-exp", "trial:t2", parent_run_id=parent.run_id) == ids["t2"]
    assert find_run(uri, "study-exp", "trial:t2", parent_run_id="0" * 32) is None
    elsewhere = Tracker.open(uri, "study-exp", identity="trial:t1", run_name="t1", parent_run_id="f" * 32)
    assert elsewhere.run_id not in ids.values()


# --- tracking off, lookups that create nothing ----------------------------------------------------

def test_tracking_off_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage = tmp_path / "storage"
    uri = tracking_uri_for("off", str(storage))
    assert uri is None
    with Tracker.open(uri, "exp", identity="x", run_name="x", tags={"a": 1}) as tracker:
        assert isinstance(tracker, NullTracker) and not tracker.enabled and tracker.run_id is None
        assert tracker.log_params({"optim": {"lr": 1}}) == []
        assert tracker.log_metrics({"train/loss": 1.0}, step=1) == 0
        tracker.set_tags({"b": 2})
        tracker.log_artifact(tmp_path / "missing.json")
        tracker.log_artifacts(tmp_path / "missing")
    assert find_run(uri, "exp", "x") is None
    assert list(tmp_path.iterdir()) == []


def test_find_run_does_not_create_a_database(tmp_path, store):
    uri, _ = store
    assert find_run(uri, "no-such-experiment", "x") is None
    missing = f"sqlite:///{tmp_path}/elsewhere/mlflow.db"
    assert find_run(missing, "exp", "x") is None
    assert not (tmp_path / "elsewhere").exists()


# --- errors ---------------------------------------------------------------------------------------

def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_bad_uri_is_one_quick_error_naming_it(tmp_path):
    port = _closed_port()
    (tmp_path / "garbage.db").write_text("not a database " * 100)
    (tmp_path / "folder.db").mkdir()
    cases = {
        f"http://127.0.0.1:{port}": "server not reachable (Connection refused)",
        "http://no-such-host.invalid:5000": "server not reachable",
        f"sqlite:///{tmp_path}/garbage.db": "cannot be opened (DatabaseError: file is not a database)",
        f"sqlite:///{tmp_path}/folder.db": "is not a file",
        "foo://bar": "cannot open the tracking store",
    }
    for uri, reason in cases.items():
        start = time.monotonic()
        with pytest.raises(TrackingError) as caught:
            Tracker.open(uri, "exp", identity="x", run_name="x")
        assert time.monotonic() - start < 3, uri
        assert str(caught.value).startswith(f"MLflow tracking at {uri}: "), str(caught.value)
        assert reason in str(caught.value) and "\n" not in str(caught.value)
        assert isinstance(caught.value, ValueError) and caught.value.uri == uri
    assert (tmp_path / "garbage.db").read_text().startswith("not a database")

    with pytest.raises(TrackingError) as caught:                   # the password is not printed
        find_run(f"http://me:s3cret@127.0.0.1:{port}", "exp", "x")
    assert f"http://me:***@127.0.0.1:{port}" in str(caught.value) and "s3cret" not in str(caught.value)
    copy = pickle.loads(pickle.dumps(caught.value))                # Ray ships a worker's error pickled
    assert str(copy) == str(caught.value) and copy.uri == caught.value.uri


def test_a_store_gone_when_a_worker_opens_it_stops_tracking_not_training(capsys):
    """The driver reached the store before Ray started; when rank 0 (or a restarted worker group)
    cannot, training goes on without tracking (docs/tracking.md), with one line saying so."""
    from hm4sr_dist.train.tracking_run import TrackingPlan, as_loop_config, open_for_worker

    plan = as_loop_config(TrackingPlan(f"http://127.0.0.1:{_closed_port()}", "exp", "x" * 16, "run"))
    tracker = open_for_worker(plan, rank=0)
    assert isinstance(tracker, NullTracker)
    assert "warning: experiment tracking stopped: MLflow tracking at http://127.0.0.1:" in capsys.readouterr().out
    assert isinstance(open_for_worker(plan, rank=1), NullTracker)


@pytest.fixture
def http_server():
    """A local HTTP server that is not MLflow: /health answers `state["health"]`, all else 404."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    state = {"health": 200, "requests": []}

    class Handler(BaseHTTPRequestHandler):
        def _answer(self):
            state["requests"].append(self.path)
            code = state["health"] if self.path == "/health" else 404
            self.send_response(code)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"no")

        do_GET = do_POST = _answer

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", state
    server.shutdown()
    server.server_close()
    thread.join(10)


def test_a_server_that_fails_is_one_quick_error(http_server):
    uri, state = http_server
    state["health"] = 503                           # MLflow would retry a 503 for minutes
    start = time.monotonic()
    with pytest.raises(TrackingError, match=r"answered HTTP 503 on /health"):
        Tracker.open(uri, "exp", identity="x", run_name="x")
    assert time.monotonic() - start < 3 and state["requests"] == ["/health"]

    state["health"] = 200                           # reachable, but no MLflow API behind it (404)
    start = time.monotonic()
    with pytest.raises(TrackingError) as caught:
        Tracker.open(uri, "exp", identity="x", run_name="x")
    assert time.monotonic() - start < 3
    assert str(caught.value).startswith(f"MLflow tracking at {uri}: experiment 'exp': ")
    assert state["requests"][1] == "/health" and "/api/2.0/mlflow/experiments/get-by-name" in state["requests"][2]


def test_import_does_not_load_mlflow_torch_or_ray():
    code = ("import sys, hm4sr_dist.tracking; "
            "print(sorted(m for m in ('mlflow', 'torch', 'ray', 'sqlalchemy', 'requests') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_trackers_in_threads_share_one_store(store):
    """Two threads logging to their own runs at once (the study driver's trials)."""
    uri, _ = store
    trackers = [Tracker.open(uri, "exp", identity=f"run-{i}", run_name=f"run-{i}") for i in range(2)]
    barrier = threading.Barrier(2)

    def work(tracker):
        barrier.wait()
        for step in range(5):
            tracker.log_metrics({"train/loss": float(step)}, step=step)
        tracker.finish()

    threads = [threading.Thread(target=work, args=(t,)) for t in trackers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    client = mlflow.MlflowClient(uri)
    for tracker in trackers:
        assert [m.step for m in client.get_metric_history(tracker.run_id, "train/loss")] == [0, 1, 2, 3, 4]
    assert {r.info.status for r in runs("exp")} == {"FINISHED"}
