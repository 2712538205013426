"""Small shared test helpers (a uniquely named module: several conftest.py files exist)."""

import os
import subprocess
import sys
from pathlib import Path

from hm4sr_dist.config import ExperimentConfig
from hm4sr_dist.synthetic import generate_log


def tiny_config(**model_overrides) -> ExperimentConfig:
    cfg = ExperimentConfig()
    cfg.model.hidden_size = 8
    cfg.model.inner_size = 16
    cfg.model.max_seq_len = 12
    for key, value in model_overrides.items():
        setattr(cfg.model, key, value)
    return cfg.validate()


def prepare_sequence_log(raw: Path, out: Path) -> Path:
    """The tests' generated log (60 users) as sequence files in `raw`, prepared into `out` (4 shards)
    by the real pipeline, on whatever Ray is initialised."""
    from data_pipelines.prepare import main as prepare

    raw.mkdir(parents=True, exist_ok=True)
    log = generate_log(n_users=60, n_clusters=4, items_per_cluster=8, min_len=7, max_len=16, seed=21)
    with open(raw / "Toy_item.txt", "w") as items, open(raw / "Toy_time.txt", "w") as times:
        for user, (seq, ts) in enumerate(zip(log.sequences, log.timestamps)):
            items.write(f"u{user} " + " ".join(map(str, seq)) + "\n")
            times.write(f"u{user} " + " ".join(map(str, ts)) + "\n")
    assert prepare(["--source", "sequence", "--input-dir", str(raw), "--name", "Toy",
                    "--out-dir", str(out), "--min-shards", "4", "--no-progress"]) == 0
    return out


# -- job command lines run as a user would: a subprocess with its own (empty) Ray temp folder --------

REPO = Path(__file__).resolve().parents[1]


def run(work: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"RAY_TMPDIR": str(work / "tmp"), "TMPDIR": str(work / "tmp"), "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def assert_user_error(work: Path, result: subprocess.CompletedProcess, line: str = "",
                      start: str = "", notes_allowed: bool = False) -> None:
    """One `error: ...` line on stderr, exit code 2, no traceback, Ray never started; nothing on
    stdout unless `notes_allowed` (a job fitting its config to the data prints its notes first)."""
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    assert notes_allowed or result.stdout == "", result.stdout
    if line:
        assert lines[0] == line
    if start:
        assert lines[0].startswith(start), lines[0]
    tmp = work / "tmp"
    assert not (tmp / "ray").exists() and not list(tmp.rglob("session_*")), "Ray was started"


def mlflow_runs(db: Path, experiment: str):
    """(client, runs of `experiment`) in the SQLite tracking store `db`, through an explicit client:
    `mlflow.set_tracking_uri` would set a process-wide URI that other tests' searches then use."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    found = client.get_experiment_by_name(experiment)
    return client, (client.search_runs([found.experiment_id]) if found else [])
