"""`--asha` really stops a trial: a tiny custom study of two settings (a learning one first, then a
frozen one, lr 1e-7) under ASHA (grace 1 epoch, reduction factor 4). The frozen trial falls below
the first one's epoch-1 score, ASHA's STOP becomes a stop request, and its Ray Train run leaves
the epoch loop between epochs and ends with its final checkpoint: fewer epochs than the cap, a
`stopped` row (not failed) listed as stopped by ASHA, and no placement group or Train actor left."""

import json
import time

import pytest

pytestmark = pytest.mark.slow

CAP = 5
TINY = ["model.hidden_size=8", "model.inner_size=16", "model.max_seq_len=12", "model.n_layers=1",
        "model.modalities=[id]", "loss.cp_weight=0", "loss.pcl_weight=0", "optim.batch_size=16",
        f"optim.epochs={CAP}", "train.num_workers=1", "eval.batch_size=256"]


def _live_pgs() -> set[str]:
    import ray
    return {pg for pg, info in ray.util.placement_group_table().items() if info["state"] != "REMOVED"}


def _live_train_actors() -> set[str]:
    # Read from the GCS: the state API (ray.util.state) needs the dashboard, which this session's
    # Ray runs without, and on a shared machine it can find another Ray instance instead.
    from ray._private.state import actors
    return {a for a, info in actors().items() if info["State"] != "DEAD" and info["ActorClassName"] in
            ("TrainController", "RayTrainWorker", "ImplicitFunc", "PlacementGroupCleaner")}


def test_asha_stops_a_weak_trial_between_epochs_and_cleans_up(prepared_sequences, local_ray, tmp_path):
    from hm4sr_dist.train.stop import STOP_FILE
    from jobs.study import main

    pgs_before, actors_before = _live_pgs(), _live_train_actors()
    out, storage = tmp_path / "study", tmp_path / "ray"
    started = time.time()
    result = main(["--prepared-dir", str(prepared_sequences), "--study", "custom",
                   "--setting", "learns:optim.lr=0.01", "--setting", "frozen:optim.lr=0.0000001",
                   "--seeds", "1", "--asha", "--asha-grace", "1", "--asha-reduction", "4",
                   "--output", str(out), "--trial-cpus", "0.5", "--bootstrap", "100", *TINY,
                   f"train.storage_path={storage}"])
    print(f"asha study: {time.time() - started:.0f} s")

    status = {r["setting"]: r for r in json.loads((out / "trials.json").read_text())}
    assert status["learns"]["status"] == "finished" and status["learns"]["epochs_run"] == CAP
    frozen = status["frozen"]
    assert frozen["status"] == "stopped" and frozen["error"] is None and frozen["stopped_by"] == "asha"
    assert 1 <= frozen["epochs_run"] < CAP

    # its folder says stopped, and is no result: no results.json / per-user ranks for the tables
    folder = out / "runs" / frozen["run"]
    stopped = json.loads((folder / "stopped.json").read_text())
    assert stopped["status"] == "stopped" and stopped["epochs_run"] == frozen["epochs_run"]
    assert len(stopped["history"]) == frozen["epochs_run"]
    assert not (folder / "results.json").exists() and not (folder / "per_user_test.npz").exists()
    # the Train run ended on its own: final checkpoint marked stopped, after the request ASHA wrote
    plan = json.loads((out / "study_plan.json").read_text())
    train_run = next(t["train_run"] for t in plan["trials"] if t["setting"] == "frozen")
    request = json.loads((storage / train_run / STOP_FILE).read_text())
    assert request["by"] == "asha" and request["iteration"] == 1
    final = json.loads(open(stopped["checkpoint"].rstrip("/") + "/final_metrics.json").read())
    assert final["stopped_early"] and final["finished"] and final["epochs_run"] == frozen["epochs_run"]

    # the report lists it as stopped by ASHA, outside the means
    md = (out / "study.md").read_text()
    assert f"- frozen: seed 1: stopped by ASHA after {frozen['epochs_run']}/{CAP} epochs" in md
    assert [r["runs"] for r in result["rows"]] == ["1/1", "0/1"]

    # nothing of the two Train runs is left on the cluster (allow Ray a moment to reap)
    deadline = time.time() + 30
    while time.time() < deadline and (_live_pgs() - pgs_before or _live_train_actors() - actors_before):
        time.sleep(1)
    assert not _live_pgs() - pgs_before
    assert not _live_train_actors() - actors_before
