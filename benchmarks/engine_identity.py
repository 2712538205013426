"""Both preparation engines on real inputs: byte identity of their folders and wall time of each
`python -m data_pipelines.prepare` process (cold: each starts its own Ray where it needs one).

    python benchmarks/engine_identity.py                          # ml-100k, Beauty, the demo set, 2M generated
    python benchmarks/engine_identity.py --reference-code /tmp/old  # + another checkout's default
                                                                    # (git worktree add /tmp/old 3e17111:
                                                                    # the deleted in-memory path)

Compared: every shard's bytes, users.parquet, items.parquet, categories.npy, and the manifest's
counts (drops and their examples included), interval statistics, time range and shard entries.
Features are off (`--no-text --no-images`): they are the same code after the log is prepared.
Output: a table on stdout and outputs/bench/engine_identity.json (or --json).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
COMPARED_FILES = ("users.parquet", "items.parquet", "categories.npy")
COMPARED_KEYS = ("counts", "interval", "time", "shards", "fingerprint")


def inputs(work: Path, actions: int) -> dict[str, list[str]]:
    """name -> the prepare flags that read it (the demo and the generated log are written here)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from streaming_prep_bench import write_log

    from data_pipelines.demo import generate_demo

    generate_demo(work / "demo")              # the quickstart's data set
    write_log(work / "log.parquet", actions, seed=0)
    return {
        "ml-100k": ["--source", "movielens", "--input-dir", str(SHARED / "ml-100k")],
        "beauty": ["--source", "sequence", "--input-dir", str(SHARED / "amazon-beauty"), "--name", "beauty"],
        "demo": ["--source", "amazon2014", "--input-dir", str(work / "demo")],
        f"generated-{actions // 10**6}M": ["--source", "tabular", "--interactions", str(work / "log.parquet"),
                                          "--user-col", "user", "--item-col", "item", "--time-col", "timestamp"],
    }


def run(cwd: Path, flags: list[str], out: Path) -> float:
    cmd = [sys.executable, "-m", "data_pipelines.prepare", *flags, "--out-dir", str(out), "--no-text",
           "--no-images", "--no-progress", "--force", "--log-level", "WARNING"]
    clock = time.time()
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} (in {cwd}) failed:\n{done.stderr[-3000:]}")
    return time.time() - clock


def digest(folder: Path) -> dict:
    m = json.loads((folder / "manifest.json").read_text())
    files = {name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
             for name in COMPARED_FILES if (folder / name).exists()}
    shards = {s["file"]: hashlib.sha256((folder / "shards" / s["file"]).read_bytes()).hexdigest()
              for s in m["shards"]}
    return {"manifest": {k: m.get(k) for k in COMPARED_KEYS}, "files": files, "shards": shards,
            "actions": m["counts"]["actions"]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--actions", type=float, default=2e6, help="size of the generated log")
    ap.add_argument("--reference-code", default="", help="another checkout whose default engine is compared too")
    ap.add_argument("--budget-mb", type=int, default=768, help="--memory-budget-mb of the streaming engine")
    ap.add_argument("--json", default="outputs/bench/engine_identity.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="engines"))
    engines = {"ray-data": (ROOT, ["--engine", "ray-data"]),
               "streaming": (ROOT, ["--engine", "streaming", "--memory-budget-mb", str(args.budget_mb)])}
    if args.reference_code:
        engines["reference"] = (Path(args.reference_code).resolve(), [])
    results = {}
    try:
        for name, flags in inputs(work, int(args.actions)).items():
            row = {}
            for engine, (cwd, extra) in engines.items():
                out = work / f"{name}-{engine}"
                row[engine] = {"wall_s": round(run(cwd, flags + extra, out), 1), **digest(out)}
                shutil.rmtree(out)
            first = row["ray-data"]
            row["identical"] = {e: row[e]["manifest"] == first["manifest"] and row[e]["files"] == first["files"]
                                and row[e]["shards"] == first["shards"] for e in engines if e != "ray-data"}
            results[name] = row
            print(f"{name:<16} actions {first['actions']:>10,}  " + "  ".join(
                f"{e} {row[e]['wall_s']:>6.1f} s" for e in engines) + "  identical to ray-data: "
                + ", ".join(f"{e} {ok}" for e, ok in row["identical"].items()), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = ROOT / args.json
    out.parent.mkdir(parents=True, exist_ok=True)
    slim = {name: {"identical": row["identical"], "actions": row["ray-data"]["actions"],
                   "wall_s": {e: row[e]["wall_s"] for e in engines},
                   "shard_sha256": row["ray-data"]["shards"]} for name, row in results.items()}
    out.write_text(json.dumps({"engines": {e: str(c) + " " + " ".join(f) for e, (c, f) in engines.items()},
                               "results": slim}, indent=1))
    print(f"wrote {out}")
    return 0 if all(all(r["identical"].values()) for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
