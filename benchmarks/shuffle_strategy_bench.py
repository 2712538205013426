"""The Ray Data preparation of ml-100k inside one warm local Ray, per Ray Data shuffle strategy:
why `ray_prep.SHUFFLE` is the pull-based sort shuffle (docs/data_pipeline_design.md).

    python benchmarks/shuffle_strategy_bench.py [--runs 2] [--num-cpus 2]

Each strategy prepares the same folder `--runs` times (the first run of the first strategy also
warms the worker processes); the table gives every run's seconds and whether the manifest's
counts and shard sha256 equal the first strategy's. Output: stdout and
outputs/bench/shuffle_strategy.json (or --json).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ("sort_shuffle_pull_based", "hash_shuffle", "shuffle_v2")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--input-dir", default=str(ROOT.parent / "shared" / "data" / "ml-100k"))
    ap.add_argument("--json", default="outputs/bench/shuffle_strategy.json")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import ray
    from ray.data.context import ShuffleStrategy

    from data_pipelines import ray_prep
    from data_pipelines.config import PrepConfig
    from data_pipelines.prepare import prepare

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    out = Path(tempfile.mkdtemp(prefix="shuffle"))
    results, reference = {}, None
    for strategy in STRATEGIES:
        ray_prep.SHUFFLE = ShuffleStrategy(strategy)     # what prepare_log sets for its shuffles
        seconds = []
        for _ in range(args.runs):
            cfg = PrepConfig("movielens", str(out / strategy), input_dir=args.input_dir, text=False,
                             images=False, force=True, progress=False)
            clock = time.time()
            manifest = prepare(cfg)
            seconds.append(round(time.time() - clock, 2))
        digest = json.dumps([manifest["counts"], [s["sha256"] for s in manifest["shards"]]], sort_keys=True)
        reference = reference or digest
        results[strategy] = {"seconds": seconds, "same_output": digest == reference}
        print(f"{strategy:<26} " + " ".join(f"{s:6.2f} s" for s in seconds)
              + f"   same output: {digest == reference}", flush=True)
    ray.shutdown()
    path = ROOT / args.json
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"input": args.input_dir, "num_cpus": args.num_cpus, "results": results}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
