"""The Ray Data preparation on a two-"node" `ray.cluster_utils.Cluster` (benchmarks/ray_prep_cluster.py,
in a subprocess: the session's embedded Ray stays as it is): tasks of the read, dedupe and encode
steps run on both nodes (each task reports its node), and the output equals the one-process
(streaming engine) output byte for byte (shards, users.parquet, counts, interval statistics)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.multinode      # `pytest -m multinode` (pyproject.toml): two more raylets, ~40 s
def test_two_nodes_share_the_work_and_write_the_one_node_output():
    done = subprocess.run([sys.executable, "benchmarks/ray_prep_cluster.py", "--actions", "30000"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
    assert lines, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert len(result["nodes"]) == 2 and sorted(result["nodes_used"]) == sorted(result["nodes"])
    assert len(result["placement"]["read"]) == 2 or len(result["placement"]["dedupe"]) == 2
    assert result["same_shards"] and result["same_users_table"] and result["same_counts"]
    assert result["shards"] == 4 and result["users"] > 0
    assert done.returncode == 0, done.stderr[-3000:]
