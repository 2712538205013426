"""`ray job submit -- python jobs/train_home.py` against a local Ray head, on a tiny fixture in the
raw Amazon 2014 format (reviews/meta json.gz and drawn images): the job prepares the data, trains
on 2 workers and leaves results.json and TensorBoard event files."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from data_pipelines.demo import generate_demo
from hm4sr_dist.run_folder import read_results
from hm4sr_test_utils import mlflow_runs
from hm4sr_dist.train.code_version import fingerprint
from suite_guards import descendants, process_table, processes_with_env, terminate

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli(*args, env, timeout=600):
    return subprocess.run([sys.executable, "-m", "ray.scripts.scripts", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def submit_when_ready(env, *args, attempts: int = 15):
    """`ray job submit`, retried while the new head's job agent is still starting (bounded)."""
    for _ in range(attempts):
        result = ray_cli("job", "submit", *args, env=env, timeout=900)
        if "No available agent to submit job" not in result.stderr:
            return result
        time.sleep(2)
    return result


def head_processes(temp: str, session: int | None) -> set[int]:
    """The processes of the head started with RAY_TMPDIR=temp as leader of `session`: the members of
    that session, those whose environment names the temp folder (job drivers start sessions of their
    own), and everything below them (a long process title can overwrite a process's environment)."""
    table = process_table()
    head = {p.pid for p in table.values() if p.session == session}
    head |= processes_with_env("RAY_TMPDIR", temp, table)
    return head | descendants(head, table)


def start_head(temp: str, env: dict) -> tuple[subprocess.Popen, str, int]:
    """`ray start --head` on free ports with RAY_TMPDIR=temp: (process, its stderr, dashboard port)."""
    port, dashboard = free_port(), free_port()
    # Free ports for every agent service too: another Ray on this machine (a local ray.init)
    # may hold the fixed defaults, and then this head's job agent never comes up.
    agent_ports = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                   f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
                   f"--ray-client-server-port={free_port()}"]
    # `ray start` leads a new session: the daemons it leaves behind keep that session id, which
    # no other process can take while one of them lives.
    start = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--port={port}",
         f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1", "--num-cpus=2",
         "--include-dashboard=true", f"--temp-dir={temp}", *agent_ports],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        _, stderr = start.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        start.kill()
        start.communicate()
        raise
    return start, stderr, dashboard


@pytest.fixture
def ray_head():
    """A Ray head of our own, stopped without touching any other Ray on the machine (`ray stop`
    would kill every Ray process of the user, other runs included)."""
    started = []                               # (temp folder, session) of every attempt, for cleanup
    try:
        for attempt in range(2):
            temp = tempfile.mkdtemp(prefix="rj")   # short: Ray's socket paths must stay under 107 bytes
            # Ray 2.60 turns token auth on for a new head; the CLI must then send the token too.
            env = os.environ | {"RAY_TMPDIR": temp, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
            env.pop("RAY_ADDRESS", None)
            start, stderr, dashboard = start_head(temp, env)
            started.append((temp, start.pid))
            # On a loaded machine the raylet can miss Ray's fixed 30 s registration window ("The
            # current node timed out during startup"): one more try on new ports and a new folder.
            if start.returncode == 0 or "timed out during startup" not in stderr or attempt == 1:
                break
            terminate(head_processes(temp, start.pid), process_table(), grace=5)
        assert start.returncode == 0, stderr[-3000:]
        yield env, f"http://127.0.0.1:{dashboard}"
    finally:
        # SIGTERM, then SIGKILL after a grace period, as `ray stop` does but for this head only:
        # on SIGTERM gcs_server hangs for good flushing events to its metrics agent, which has
        # just been stopped too; SIGTERM alone left it running.
        for temp, session in started:
            terminate(head_processes(temp, session), process_table(), grace=5)
            shutil.rmtree(temp, ignore_errors=True)


def test_submitted_home_job_writes_results_and_events(ray_head, tmp_path):
    env, address = ray_head
    raw = generate_demo(tmp_path / "raw", n_users=60, n_lines=4, items_per_line=8, category="Home_and_Kitchen")
    out, storage = tmp_path / "out", tmp_path / "storage"
    runtime_env = {"excludes": [".git", "outputs", "**/__pycache__", "*.egg-info"],
                   "env_vars": {"HF_HUB_OFFLINE": "1"}}
    submitted = submit_when_ready(
        env, "--address", address, "--working-dir", ".", "--runtime-env-json", json.dumps(runtime_env),
        "--", "python", "jobs/train_home.py", "--raw-dir", str(raw), "--prepared-dir", str(tmp_path / "prepared"),
        "--output", str(out), "--prep", "text_model=minilm-offline", "--prep", f"image_dir={raw / 'images'}",
        "--prep", "image_model=vit_tiny_patch16_224", "--prep", "image_pretrained=false", "--prep", "min_shards=4",
        "model.hidden_size=16", "model.inner_size=32", "optim.batch_size=64", "optim.epochs=2",
        f"train.storage_path={storage}", "train.run_name=home-job")
    assert submitted.returncode == 0, submitted.stdout[-3000:] + "\n---\n" + submitted.stderr[-3000:]
    assert "succeeded" in submitted.stdout.lower()
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"] == "home" and results["epochs_run"] == 2
    assert results["test"]["count"] == 60 and 0 < results["test"]["ndcg@10"] <= 1
    assert results["config"]["model"]["modalities"] == ["id", "text", "image"]
    assert results["data_manifest"]["fingerprint"]
    assert results["code"]["fingerprint"] == fingerprint()       # the uploaded copy of this code
    assert list((storage / "home-job" / "tensorboard").glob("events.out.tfevents.*"))
    logs = submitted.stdout + submitted.stderr
    assert "epoch 1 done" in logs, logs[-3000:]                  # progress reaches the job's log
    assert read_results(out)["train_run"] == "home-job"            # the one schema, strictly read
    # MLflow, the default tracker (SQLite under the storage path): params, metrics, artifacts
    client, [run] = mlflow_runs(storage / "mlflow.db", "hm4sr-home")
    assert run.data.params["model.hidden_size"] == "16" and run.data.params["train.run_name"] == "home-job"
    assert run.data.tags["hm4sr.identity"] == results["identity"] and run.info.status == "FINISHED"
    assert run.data.metrics["test/ndcg_at_10"] == pytest.approx(results["test"]["ndcg@10"])
    assert "valid/ndcg_at_5" in run.data.metrics and "loss/total" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "run_folder")}
    assert artifacts == {"run_folder/results.json", "run_folder/per_user_test.npz"}
