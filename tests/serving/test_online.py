"""Online top-K on Ray Serve (hm4sr_dist.serving.online, issue 23).

The request checks, the batch scoring and the application's arguments are tested without Serve;
the served application (marked slow) runs once per module on the session's embedded Ray
(`local_ray`), on 127.0.0.1 and a free port, and is shut down after the module. Every HTTP call
has a timeout. The export is the tiny one of tests/serving/test_export_scorer.py (its `run`
fixture: imported from there, or found in tests/serving/conftest.py once it moves there).
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from hm4sr_dist.serving.online import (DEPLOYMENT_NAME, Query, RequestError, ServeOptions, main,
                                       parse_request, score_queries, start)
from hm4sr_dist.serving.scorer import Scorer

try:                                    # the export fixture (module scope): (run dir, model, export dir)
    from test_export_scorer import run  # noqa: F401
except ImportError:                     # moved to tests/serving/conftest.py
    pass

REPO = Path(__file__).resolve().parents[2]
HTTP_TIMEOUT = 60                       # seconds, every HTTP call (the machine may be busy)
BATCH_WAIT_S = 0.25                     # long enough for 8 concurrent requests to meet in a batch


@pytest.fixture(scope="module")
def scorer(run):
    """A scorer as a replica builds it (default chunking and batch size)."""
    return Scorer.from_export(run[2])


def make_histories(scorer: Scorer, n: int, seed: int) -> list[list[list]]:
    """JSON-shaped histories ([raw item, unix seconds] lists) of 1..12 items, oldest first; some
    items as ints when their raw ID is numeric (none in the tiny export), some repeated."""
    rng = np.random.default_rng(seed)
    t0 = scorer.time_range[0] if scorer.time_range else 1_700_000_000
    out = []
    for _ in range(n):
        length = int(rng.integers(1, 13))
        times = t0 + 86400 * 5 + np.cumsum(rng.choice([0, 60, 3600, 86400, 40 * 86400], size=length))
        items = rng.integers(1, scorer.n_items + 1, size=length)
        out.append([[scorer.id_map.raw(int(i)), int(t)] for i, t in zip(items, times)])
    return out


def expected(scorer: Scorer, history, k: int, exclude: bool = False) -> tuple[list[str], list[float]]:
    return scorer.recommend([[tuple(p) for p in history]], k, exclude_history=exclude)[0]


def assert_same_answer(got_items, got_scores, want_items, want_scores):
    assert got_items == want_items
    torch.testing.assert_close(torch.tensor(got_scores, dtype=torch.float64),
                               torch.tensor(want_scores, dtype=torch.float64), rtol=0, atol=1e-5)


def bad_bodies(scorer: Scorer) -> list[tuple[str, bytes | str, str]]:
    """(what, body, the start of the error) for each kind of bad request."""
    a, b = scorer.id_map.raw(1), scorer.id_map.raw(2)
    t0 = 1_700_000_000
    ok = [[a, t0], [b, t0 + 60]]
    n = scorer.n_items

    def body(**fields) -> str:
        return json.dumps(fields)

    return [
        ("malformed JSON", b'{"history": [["x", 1]', "body = "),
        ("not UTF-8", b"\xff\xfe\x00{", "body = "),
        ("NaN", '{"history": [["a", NaN]], "k": 3}', "body = "),
        ("not an object", "[1, 2]", "body = [1, 2]: expected a JSON object"),
        ("missing history", body(k=3), "history = (missing): missing field"),
        ("missing k", body(history=ok), "k = (missing): missing field"),
        ("unknown field", body(history=ok, k=3, exclude_histroy=True), "exclude_histroy = true: unknown field"),
        ("k a string", body(history=ok, k="3"), 'k = "3": expected an int >= 1'),
        ("k a float", body(history=ok, k=3.0), "k = 3.0: expected an int >= 1"),
        ("k a bool", body(history=ok, k=True), "k = true: expected an int >= 1"),
        ("k = 0", body(history=ok, k=0), "k = 0: expected an int >= 1"),
        ("k < 0", body(history=ok, k=-2), "k = -2: expected an int >= 1"),
        ("k > n_items", body(history=ok, k=n + 1), f"k = {n + 1}: more than the {n} items"),
        ("k > candidates", body(history=ok, k=n - 1, exclude_history=True),
         f"k = {n - 1}: more than the {n - 2} candidate items with exclude_history"),
        ("exclude_history not a bool", body(history=ok, k=3, exclude_history="yes"),
         'exclude_history = "yes": expected true or false'),
        ("history not a list", body(history="abc", k=3), 'history = "abc": expected a list'),
        ("empty history", body(history=[], k=3), "history = []: empty history"),
        ("a pair of three", body(history=[[a, t0, 1]], k=3), f'history[0] = ["{a}", {t0}, 1]: expected a'),
        ("unknown item", body(history=[ok[0], ["nope", t0 + 5]], k=3),
         'history[1].item = "nope": unknown raw item ID'),
        ("time not an int", body(history=[[a, 1.7e9]], k=3),
         "history[0].time = 1700000000.0: expected whole unix seconds"),
        ("time negative", body(history=[[a, -5]], k=3), "history[0].time = -5: outside"),
        ("times out of order", body(history=[[a, t0 + 10], [b, t0]], k=3),
         f"history[1].time = {t0}: earlier than the item before it"),
    ]


# -- without Serve --------------------------------------------------------------------------------

def test_a_good_request_parses(scorer):
    history = make_histories(scorer, 1, seed=0)[0]
    q = parse_request(json.dumps({"history": history, "k": 4}).encode(), scorer)
    assert q == Query(history, 4, False)
    q = parse_request(json.dumps({"history": history, "k": 2, "exclude_history": True}), scorer)
    assert (q.k, q.exclude_history) == (2, True)


def test_bad_requests_name_the_field_and_value(scorer):
    for what, body, message in bad_bodies(scorer):
        with pytest.raises(RequestError) as caught:
            parse_request(body, scorer)
        assert str(caught.value).startswith(message), (what, str(caught.value))
        assert caught.value.status == 400 and caught.value.body()["error"] == str(caught.value)
    with pytest.raises(RequestError, match=r"history = \"<12 pairs>\": longer than the 10 pairs"):
        parse_request(json.dumps({"history": make_histories(scorer, 40, 3)[0][:1] * 12, "k": 1}), scorer,
                      max_history=10)
    with pytest.raises(RequestError) as caught:          # a long value is cut in the message
        parse_request(json.dumps({"history": [["x" * 500, 1]], "k": 1}), scorer)
    assert len(str(caught.value)) < 250 and "..." in str(caught.value)


def test_a_batch_gives_each_request_the_scorers_answer(scorer):
    """Mixed k and exclude_history in one batch: each answer is the scorer's for that request alone."""
    hists = make_histories(scorer, 9, seed=1)
    ks = [1, 5, 3, scorer.n_items, 2, 5, 4, 1, 7]
    excl = [False, False, True, False, True, True, False, False, True]
    queries = [Query(h, k, e) for h, k, e in zip(hists, ks, excl)]
    answers = score_queries(scorer, queries)
    for q, (items, scores) in zip(queries, answers):
        assert len(items) == q.k
        assert_same_answer(items, scores, *expected(scorer, q.history, q.k, q.exclude_history))
        if q.exclude_history:
            assert not {raw for raw, _ in q.history} & set(items)


def test_a_failing_request_fails_alone(scorer):
    """An error while scoring a batch (here: a history the scorer chokes on) is retried request by
    request: the others are answered, the culprit gets its own exception."""
    hists = make_histories(scorer, 4, seed=2)
    poison = hists[2]

    class Flaky:
        n_items = scorer.n_items

        def recommend(self, histories, k, exclude_history=False):
            if any(h is poison for h in histories):
                raise RuntimeError("device fell over")
            return scorer.recommend(histories, k, exclude_history)

    answers = score_queries(Flaky(), [Query(h, 3, False) for h in hists])
    assert isinstance(answers[2], RuntimeError)
    for i in (0, 1, 3):
        assert_same_answer(*answers[i], *expected(scorer, hists[i], 3))


def test_health_check_fails_after_repeated_scoring_failures():
    """Serve replaces a replica whose check_health raises: after 3 batches in a row failed for the
    server's sake, not after refused requests (those never reach a batch)."""
    from types import SimpleNamespace

    from hm4sr_dist.serving.online import FAILURES_BEFORE_UNHEALTHY, OnlineRecommender

    check_health = OnlineRecommender.func_or_class.check_health
    check_health(SimpleNamespace(failing_batches=FAILURES_BEFORE_UNHEALTHY - 1))
    with pytest.raises(RuntimeError, match="batches failed while scoring"):
        check_health(SimpleNamespace(failing_batches=FAILURES_BEFORE_UNHEALTHY))


def test_application_arguments():
    opts = ServeOptions.from_args({"export_dir": "/x", "num_replicas": "2", "num_gpus": "0.5",
                                   "max_batch_size": "16", "batch_wait_timeout_s": "0.01", "verify": "false"})
    assert (opts.num_replicas, opts.num_gpus, opts.max_batch_size, opts.batch_wait_timeout_s, opts.verify) == \
        (2, 0.5, 16, 0.01, False)
    assert opts.resolved_device == "cuda" and ServeOptions("/x").resolved_device == "cpu"
    assert ServeOptions.from_args({"export_dir": "/x", "num_replicas": 3}).num_replicas == 3   # YAML ints
    for args, message in [({}, "export_dir is required"), ({"export_dir": "/x", "replicas": 2}, "unknown argument"),
                          ({"export_dir": "/x", "num_replicas": "two"}, "num_replicas = 'two' is not a int"),
                          ({"export_dir": "/x", "num_replicas": 0}, "num_replicas = 0 is out of range"),
                          ({"export_dir": "/x", "verify": "maybe"}, "verify = 'maybe' is not a bool")]:
        with pytest.raises(ValueError, match=message):
            ServeOptions.from_args(args)


def test_serve_run_builds_the_application_from_its_import_path():
    """What `serve run hm4sr_dist.serving.online:app export_dir=/x num_replicas=2 ...` does with the
    import path and its key=value strings (Serve's own helpers), down to the deployment's options."""
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    application = call_user_app_builder_with_args_if_necessary(
        import_attr("hm4sr_dist.serving.online:app"),
        {"export_dir": "/x", "num_replicas": "2", "num_gpus": "1", "max_batch_size": "16"})
    deployment = application._bound_deployment
    assert (deployment.name, deployment.num_replicas, deployment.max_ongoing_requests) == (DEPLOYMENT_NAME, 2, 32)
    assert deployment.ray_actor_options == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert deployment.init_args == ("/x",)
    assert deployment.init_kwargs["device"] == "cuda" and deployment.init_kwargs["max_batch_size"] == 16


def test_cli_refuses_a_folder_that_is_no_export(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2                   # before Ray or Serve start
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "manifest.json: missing" in err


def test_the_rayservice_serves_this_application():
    """cluster/kuberay-rayservice.yaml (its CRD fields: tests/cluster): serveConfigV2 is a valid Serve
    config whose application is this module's builder with arguments it accepts."""
    from ray.serve.schema import ServeDeploySchema

    (doc,) = [d for d in yaml.safe_load_all((REPO / "cluster" / "kuberay-rayservice.yaml").read_text()) if d]
    config = ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    (application,) = config.applications
    assert application.import_path == "hm4sr_dist.serving.online:app"
    opts = ServeOptions.from_args(application.args)
    assert opts.export_dir.startswith("/mnt/shared/") and opts.resolved_device == "cuda"
    assert all(d.name == DEPLOYMENT_NAME for d in application.deployments)
    workers = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    gpus = sum(int(g["replicas"]) * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]
                                        .get("nvidia.com/gpu", 0)) for g in workers)
    assert gpus >= opts.num_replicas * opts.num_gpus, "not enough GPUs for the replicas"


# -- served ------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, body: bytes | str | dict | None = None) -> tuple[int, dict]:
    """(status, JSON body) of a GET (body None) or POST, with a timeout."""
    data = None if body is None else (json.dumps(body) if isinstance(body, dict) else body)
    data = data.encode() if isinstance(data, str) else data
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                 method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


@pytest.fixture(scope="module")
def served(run, local_ray):
    """The application on 127.0.0.1:<free port>, one CPU replica; the base URL."""
    from ray import serve

    url = None
    try:
        url = start(run[2], port=free_port(), host="127.0.0.1", name="hm4sr-test", num_cpus=1,
                    max_batch_size=8, batch_wait_timeout_s=BATCH_WAIT_S)
        deadline = time.monotonic() + 120
        while True:                              # serve.run returns once RUNNING; the proxy may lag
            try:
                if call(url + "/healthz")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{url}/healthz did not answer 200 within 120 s")
            time.sleep(0.5)
        yield url
    finally:
        serve.shutdown()


@pytest.mark.slow
def test_served_top_k_is_the_scorers(served, scorer, run):
    status, health = call(served + "/healthz")
    manifest = json.loads((run[2] / "manifest.json").read_text())
    assert status == 200 and health["status"] == "ok"
    assert (health["items"], health["identity"]) == (scorer.n_items, manifest["identity"])
    for i, history in enumerate(make_histories(scorer, 5, seed=5)):
        k, exclude = [1, 5, scorer.n_items, 3, 10][i], i == 3
        status, answer = call(served + "/recommend", {"history": history, "k": k, "exclude_history": exclude})
        assert status == 200, answer
        assert_same_answer(answer["items"], answer["scores"], *expected(scorer, history, k, exclude))


@pytest.mark.slow
def test_bad_requests_get_400_and_the_replica_keeps_serving(served, scorer):
    good = make_histories(scorer, 1, seed=6)[0]
    want = expected(scorer, good, 4)
    for what, body, message in bad_bodies(scorer):
        status, answer = call(served + "/recommend", body)
        assert status == 400 and answer["error"].startswith(message), (what, status, answer)
        status, answer = call(served + "/recommend", {"history": good, "k": 4})
        assert status == 200, (what, answer)
        assert_same_answer(answer["items"], answer["scores"], *want)
    assert call(served + "/nowhere")[0] == 404
    assert call(served + "/healthz")[1]["status"] == "ok"


@pytest.mark.slow
def test_concurrent_requests_are_answered_and_batched(served, scorer):
    before = call(served + "/stats")[1]
    hists = make_histories(scorer, 8, seed=7)
    ks = [1, 2, 3, 4, 5, 6, 7, 8]
    results: list = [None] * 8
    barrier = threading.Barrier(8)

    def client(i: int) -> None:
        barrier.wait(timeout=HTTP_TIMEOUT)
        try:
            results[i] = call(served + "/recommend", {"history": hists[i], "k": ks[i], "exclude_history": i % 2 == 1})
        except Exception as exc:             # noqa: BLE001 - reported below
            results[i] = exc

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=2 * HTTP_TIMEOUT)
    assert not any(t.is_alive() for t in threads)
    for i, result in enumerate(results):
        assert not isinstance(result, Exception) and result[0] == 200, result
        assert_same_answer(result[1]["items"], result[1]["scores"], *expected(scorer, hists[i], ks[i], i % 2 == 1))
    after = call(served + "/stats")[1]
    assert after["batches"] - before["batches"] < 8, after       # some requests shared a batch
    assert after["largest_batch"] >= 2, after
