"""A training run across two Ray nodes survives losing one of them (issue "Large scale for real").

`ray.cluster_utils.Cluster` starts a head and a second raylet on this machine, 1 CPU each, so the two
Train workers (1 CPU each) can only run on different nodes. The real pipeline prepares a generated
log into a folder every node sees (what an NFS/EFS mount is on a real cluster); the production
trainer (`build_trainer`, as the jobs use it) trains there with its checkpoints in that folder. Once
Ray Train has registered a checkpoint, the second node is removed, its scratch folder deleted with
it, and a fresh node added: the worker group restarts (`train.max_failures`) on the head and the new
node from that checkpoint and trains to the end.
"""

import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from hm4sr_dist.config import load_config
from hm4sr_dist.train.launcher import build_trainer
from hm4sr_test_utils import prepare_sequence_log

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SMALL = ["model.hidden_size=16", "model.inner_size=32", "model.modalities=[id]", "loss.cp_weight=0",
         "loss.pcl_weight=0", "optim.batch_size=64", "train.num_workers=2", "train.cpus_per_worker=1",
         "train.log_every_steps=3"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def two_nodes():
    """A head and one more node, 1 CPU each, with the driver connected; stops exactly these.

    Ray writes a started cluster's address to `<RAY_TMPDIR or /tmp>/ray/ray_current_cluster`, where any
    other `ray.init()` on the machine would find it: a temp folder of our own keeps it (and this
    cluster's sessions and sockets) away from every other Ray here. The session's embedded Ray (the
    `local_ray` fixture), if running, gives way and is started again afterwards."""
    had_local_ray = ray.is_initialized()
    if had_local_ray:
        ray.shutdown()
    temp = tempfile.mkdtemp(prefix="rm")          # short: Ray's socket paths must stay under 107 bytes
    saved = {key: os.environ.get(key) for key in ("RAY_TMPDIR", "RAY_ADDRESS")}
    os.environ["RAY_TMPDIR"] = temp
    os.environ.pop("RAY_ADDRESS", None)
    cluster = Cluster()
    try:
        # Free ports: another Ray on this machine may hold the defaults (8265, 52365).
        cluster.add_node(num_cpus=1, include_dashboard=False, dashboard_port=free_port(),
                         dashboard_agent_listen_port=free_port())
        add_worker_node(cluster, "node-1")
        ray.init(address=cluster.address, configure_logging=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()                        # kills every process of every node still in it
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(temp, ignore_errors=True)
        if had_local_ray:                         # as tests/conftest.py's local_ray started it
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)


def add_worker_node(cluster: Cluster, name: str):
    """A 1-CPU node whose processes have a temp folder (TMPDIR) of their own, as a machine's own disk:
    checkpoints are staged there before Ray Train copies them to storage. It lives in the fixture's
    short Ray temp folder (multiprocessing puts Unix sockets in TMPDIR: 107 bytes at most)."""
    scratch = Path(os.environ["RAY_TMPDIR"]) / name
    scratch.mkdir()
    node = cluster.add_node(num_cpus=1, env_vars={"TMPDIR": str(scratch)})
    node.scratch = scratch
    return node


def prepare_shared(root: Path) -> Path:
    """The generated log prepared by the real pipeline (Ray Data on the cluster) into shared storage."""
    return prepare_sequence_log(root / "raw", root / "prepared")


def checkpoint_log(path: Path):
    """A Train callback appending `<global step> <storage path>` of every checkpoint Ray Train has
    registered to `path`. It runs in the Train controller, which Ray keeps on the driver's node (the
    head). Defined in a function so that Ray pickles the class by value (the controller cannot
    import this test module)."""
    class CheckpointLog(ray.train.UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if checkpoint is not None:
                with open(path, "a") as f:
                    f.write(f"{metrics[0]['global_step']} {checkpoint.path}\n")

    return CheckpointLog()


def registered(path: Path) -> list[tuple[int, str]]:
    lines = path.read_text().splitlines() if path.exists() else []
    return [(int(step), where) for step, where in (line.split(" ", 1) for line in lines)]


def train_workers(cluster: Cluster) -> dict[str, dict]:
    """Every Ray Train worker actor of this cluster, alive or dead, by actor ID (from the GCS)."""
    return {actor_id: info for actor_id, info in cluster.global_state.actor_table(None).items()
            if info["ActorClassName"] == "RayTrainWorker"}


def node_ids(workers: dict[str, dict]) -> list[str]:
    return sorted(w["Address"]["NodeID"] for w in workers.values())


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.1)
    return value


def test_run_across_two_nodes_resumes_after_losing_one(two_nodes, tmp_path):
    cluster = two_nodes
    head, [lost] = cluster.head_node, list(cluster.worker_nodes)
    shared = tmp_path / "shared"
    prepared = prepare_shared(shared)
    storage, name = shared / "ray_results", "two-nodes"
    epochs, every = 2, 3
    cfg = load_config(str(REPO / "configs/hm4sr_paper.yaml"), SMALL + [
        f"data.prepared_dir={prepared}", f"train.storage_path={storage}", f"train.run_name={name}",
        f"optim.epochs={epochs}", f"train.checkpoint_every_steps={every}", "train.max_failures=1"])
    checkpoints = tmp_path / "registered.txt"
    trainer = build_trainer(cfg, callbacks=[checkpoint_log(checkpoints)])

    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:              # re-raised below, in the test's thread
            outcome["error"] = exc

    runner = threading.Thread(target=fit, daemon=True)
    runner.start()
    wait_for(lambda: registered(checkpoints) or "error" in outcome, 600, "a registered checkpoint")
    assert "error" not in outcome, outcome["error"]
    first = {a: w for a, w in train_workers(cluster).items() if w["State"] == "ALIVE"}
    before_loss = registered(checkpoints)
    cluster.remove_node(lost)                     # its raylet and Train worker are killed
    shutil.rmtree(lost.scratch)                   # ... and its disk is gone with it
    replacement = add_worker_node(cluster, "node-2")
    runner.join(timeout=900)
    assert not runner.is_alive(), "training did not finish within 15 minutes of the node loss"
    assert "error" not in outcome, outcome["error"]
    result = outcome["result"]

    # The first worker group ran on both nodes; the restarted one on the head and the new node.
    assert node_ids(first) == sorted([head.node_id, lost.node_id])
    restarted = {a: w for a, w in train_workers(cluster).items() if a not in first}
    assert node_ids(restarted) == sorted([head.node_id, replacement.node_id])

    # It resumed from a checkpoint in the shared storage that was registered before the loss.
    [resumed_at] = result.metrics["resumed_at_steps"]
    assert 0 < resumed_at < result.metrics["global_step"]
    assert resumed_at >= before_loss[-1][0] and resumed_at in [step for step, _ in registered(checkpoints)]
    for _, where in registered(checkpoints):
        assert Path(where).is_relative_to(storage / name), where
    assert list((storage / name).glob("checkpoint_*"))

    # ... and trained to the end: every step of both epochs, the test metrics of all 60 users.
    steps_per_epoch = result.metrics["global_step"] // epochs
    assert result.metrics["finished"] and result.metrics["epochs_run"] == epochs
    assert result.metrics["global_step"] == steps_per_epoch * epochs and steps_per_epoch > every
    assert result.metrics["test/count"] == 60 and 0 < result.metrics["test/ndcg@10"] <= 1
    assert Path(result.checkpoint.path).is_relative_to(storage / name)
    with result.checkpoint.as_directory() as folder:
        assert (Path(folder) / "model.pt").exists() and (Path(folder) / "final_metrics.json").exists()
    assert list((storage / name / "tensorboard").glob("events.out.tfevents.*"))
