"""The Ray Data preparation on a two-"node" test cluster (`ray.cluster_utils.Cluster`: two raylets
on this machine, 1 CPU each): its tasks run on both nodes, shown by the node ID each task reports
(read parts, dedupe shuffle reducers, encode tasks), and its output equals the one-process output
(the streaming engine's preparation of the same log, byte for byte: shards, users.parquet, counts).

    python benchmarks/ray_prep_cluster.py                   # 60k actions, prints a table + JSON
    python benchmarks/ray_prep_cluster.py --actions 2e5 --json outputs/bench/ray_prep_cluster.json

Inputs and outputs sit on this machine's disk, which both "nodes" see (on a real cluster: shared
storage). Exit code 0 when both conditions hold, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def write_log(path: Path, actions: int, row_group: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from streaming_prep_bench import write_log as bench_log

    bench_log(path, actions, seed=0)   # the benchmark's power-law log (one row group per 1M rows)
    pq.write_table(pq.read_table(path), path, row_group_size=row_group)  # several read parts
    assert pq.ParquetFile(path).metadata.num_row_groups > 1
    del pa


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--actions", type=float, default=6e4)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    import ray
    from ray.cluster_utils import Cluster

    from data_pipelines import ray_read
    from data_pipelines.config import PrepConfig
    from data_pipelines.prepare import prepare

    actions = int(args.actions)
    work = Path(tempfile.mkdtemp(prefix="raycl"))
    lines = _Lines()
    logging.getLogger("data_pipelines.ray_prep").addHandler(lines)
    logging.getLogger("data_pipelines.ray_prep").setLevel(logging.INFO)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        cluster.wait_for_nodes()
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        row_group = max(1000, actions // 6)
        ray_read.PART_ROWS = row_group          # one read task per row group: parts for both nodes
        write_log(work / "log.parquet", actions, row_group)
        common = dict(interactions=str(work / "log.parquet"), user_col="user", item_col="item",
                      time_col="timestamp", text=False, images=False, progress=False, min_shards=4)
        clock = time.time()
        on_ray = prepare(PrepConfig("tabular", str(work / "ray"), engine="ray-data", **common))
        ray_s = time.time() - clock
        single = prepare(PrepConfig("tabular", str(work / "single"), engine="streaming",
                                    memory_budget_mb=1024, **common))
        placement = json.loads(next(l for l in lines.lines if l.startswith("placement"))
                               .split(": ", 1)[1])
        same_shards = all((work / "ray/shards" / s["file"]).read_bytes() == (work / "single/shards" / s["file"]).read_bytes()
                          for s in single["shards"]) and on_ray["shards"] == single["shards"]
        same_tables = (work / "ray/users.parquet").read_bytes() == (work / "single/users.parquet").read_bytes()
        same_counts = on_ray["counts"] == single["counts"] and on_ray["interval"] == single["interval"]
        used = sorted({n for step in placement.values() for n in step})
        result = {"actions": actions, "nodes": nodes, "nodes_used": used,
                  "placement": placement, "ray_data_s": round(ray_s, 1),
                  "same_shards": same_shards, "same_users_table": same_tables, "same_counts": same_counts,
                  "users": single["counts"]["users"], "shards": len(single["shards"]),
                  "progress": [l for l in lines.lines if re.match(r"(read|k-core|kept|wrote)", l)]}
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    short = {n: f"node{j}" for j, n in enumerate(result["nodes"])}
    rows = [("actions", f"{actions:,}"), ("nodes in the cluster", str(len(nodes))),
            *[(f"tasks per node: {step}", ", ".join(f"{short.get(n, n[:8])} {c}" for n, c in sorted(p.items())))
              for step, p in placement.items()],
            ("Ray Data preparation (s)", f"{result['ray_data_s']}"),
            ("shards equal to the one-process output", str(same_shards)),
            ("users.parquet and counts equal", str(same_tables and same_counts))]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    if args.json:
        out = ROOT / args.json
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
    print("RESULT " + json.dumps(result))
    return 0 if len(used) == len(nodes) == 2 and same_shards and same_tables and same_counts else 1


if __name__ == "__main__":
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    sys.exit(main())
