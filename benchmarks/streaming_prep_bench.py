"""Streaming preparation benchmark: peak memory against the budget on a generated log larger than
the budget, and the size of the same log as one pandas frame (what the in-memory path holds).

    python benchmarks/streaming_prep_bench.py                       # 2M actions, quick check
    python benchmarks/streaming_prep_bench.py --actions 2e7 --budget-mb 1024

1. Writes an Amazon-like log (power-law users and items, unix-second times, ~1% exact duplicate
   rows) as Parquet in chunks of 1M rows: never held whole.
2. Runs `python -m data_pipelines.prepare --memory-budget-mb B` (IDs + times: no item table, so no
   Ray) in a subprocess. Peak memory of ALL its processes: the summed RSS of the process tree,
   sampled every 0.1 s with psutil; and the largest single process's own peak (its VmHWM, read
   with each sample: exact, and monotone, so at most the last 0.1 s before exit is unseen).
   Not getrusage's ru_maxrss: a child starts from this process's peak (the frame of step 3).
3. The frame: each chunk turned into the canonical frame (`canonical.interactions_frame`, what the
   source adapters return) and `memory_usage(deep=True)` summed: exact for the whole frame, as
   its columns are per-row. `--in-memory` also runs the in-memory path on the log and samples it
   the same way (it starts Ray to write shards: its processes count too).

Times are wall-clock on a shared 2-core machine (contended). Output: a table on stdout and
outputs/bench/streaming_prep.json (or --json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hm4sr_dist.memory import peak_resident_bytes

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 1_000_000


def ids(prefix: str, codes: np.ndarray) -> pa.Array:
    """Amazon-looking raw IDs ('A' + 12 hex digits for users, 'B' + 9 for items)."""
    width = 12 if prefix == "A" else 9
    text = pc.utf8_lpad(pc.cast(pa.array(codes), pa.string()), width, "0")
    return pc.binary_join_element_wise(prefix, text, "")


def write_log(path: Path, actions: int, seed: int) -> dict:
    """Users and items by inverse-CDF power laws (p(rank r) ~ r^-0.6 and r^-0.75), so the heads are
    heavy and long tails fall to the 5-core over several rounds; 1% of rows repeated exactly."""
    rng = np.random.default_rng(seed)
    n_users, n_items = max(10, actions // 6), max(10, actions // 25)
    schema = pa.schema([("user", pa.string()), ("item", pa.string()), ("timestamp", pa.int64())])
    t0, span = 1_262_304_000, 4 * 365 * 86400   # 2010-2014, as the Amazon 2014 dumps
    written = 0
    with pq.ParquetWriter(path, schema, compression="snappy") as writer:
        while written < actions:
            n = min(CHUNK, actions - written)
            base = n - n // 100
            u = (n_users * rng.random(base) ** 2.5).astype(np.int64)
            i = (n_items * rng.random(base) ** 4.0).astype(np.int64)
            t = t0 + (rng.random(base) * span).astype(np.int64) // 60 * 60  # minute grid: ties
            dup = rng.integers(0, base, n - base)
            u, i, t = np.concatenate([u, u[dup]]), np.concatenate([i, i[dup]]), np.concatenate([t, t[dup]])
            order = rng.permutation(n)
            writer.write_table(pa.table({"user": ids("A", u[order]), "item": ids("B", i[order]),
                                         "timestamp": t[order]}, schema=schema))
            written += n
    return {"actions": actions, "user_pool": n_users, "item_pool": n_items,
            "bytes_on_disk": path.stat().st_size}


def frame_bytes(path: Path) -> int:
    """Deep size of the log as the one canonical pandas frame of the in-memory path."""
    from data_pipelines.canonical import interactions_frame

    total = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=CHUNK):
        df = interactions_frame(batch.column("user").to_pylist(), batch.column("item").to_pylist(),
                                batch.column("timestamp").to_pylist())
        total += int(df.memory_usage(deep=True, index=False).sum())
    return total


def run_sampled(cmd: list[str], log_path: Path) -> dict:
    """Run `cmd`; peak summed RSS of its process tree (psutil samples) and its exit code."""
    import psutil

    peak, peak_n, own_peaks = 0, 0, {}
    started = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        top = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                tree = [top] + top.children(recursive=True)
                rss = 0
                for p in tree:
                    try:
                        rss += p.memory_info().rss
                        own_peaks[p.pid] = max(own_peaks.get(p.pid, 0), peak_resident_bytes(p.pid))
                    except psutil.Error:
                        pass
                if rss > peak:
                    peak, peak_n = rss, len(tree)
            except psutil.Error:
                pass
            time.sleep(0.1)
    return {"rc": proc.returncode, "wall_s": round(time.time() - started, 1),
            "peak_tree_rss_mb": round(peak / 2**20, 1), "processes_at_peak": peak_n,
            "max_single_process_peak_mb": round(max(own_peaks.values(), default=0) / 2**20, 1)}


def prepare_cmd(log: Path, out: Path, budget: int, spill: Path, engine: str = "") -> list[str]:
    cmd = [sys.executable, "-m", "data_pipelines.prepare", "--source", "tabular", "--interactions",
           str(log), "--user-col", "user", "--item-col", "item", "--time-col", "timestamp",
           "--out-dir", str(out), "--no-text", "--no-images", "--force",
           "--log-level", "INFO"]
    if engine:  # the Ray Data pipeline: the budget sizes the local Ray's object store
        return cmd + ["--engine", engine] + (["--memory-budget-mb", str(budget)] if budget else [])
    if budget:
        cmd += ["--memory-budget-mb", str(budget), "--spill-dir", str(spill)]
    return cmd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--actions", type=float, default=2e6)
    ap.add_argument("--budget-mb", type=int, default=1024)
    ap.add_argument("--work-dir", default="outputs/bench/streaming_prep_work")
    ap.add_argument("--json", default="outputs/bench/streaming_prep.json")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--in-memory", action="store_true", help="also run the in-memory path")
    ap.add_argument("--ray-data", action="store_true",
                    help="also run the Ray Data pipeline (--engine ray-data, object store = budget)")
    ap.add_argument("--skip-streaming", action="store_true", help="do not run the streaming path")
    ap.add_argument("--keep", action="store_true", help="keep the generated log and outputs")
    ap.add_argument("--reuse-log", action="store_true",
                    help="use <work-dir>/log.parquet when it holds --actions rows (same --seed)")
    args = ap.parse_args()
    actions = int(args.actions)
    work = (ROOT / args.work_dir).resolve()
    log = work / "log.parquet"
    reuse = args.reuse_log and log.is_file() and pq.ParquetFile(log).metadata.num_rows == actions
    if reuse:
        for old in work.iterdir():
            if old != log:
                shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    clock = time.time()
    result: dict = {"log": {"actions": actions, "bytes_on_disk": log.stat().st_size, "reused": True}
                    if reuse else write_log(log, actions, args.seed), "budget_mb": args.budget_mb}
    result["log"]["generate_s"] = round(time.time() - clock, 1)
    print(f"{'reused' if reuse else 'generated'} {actions:,} actions in {result['log']['generate_s']}s "
          f"({result['log']['bytes_on_disk'] / 2**20:.0f} MB Parquet)", flush=True)
    result["pandas_frame_mb"] = round(frame_bytes(log) / 2**20, 1)
    runs = (({} if args.skip_streaming else {"streaming": (args.budget_mb, "")})
            | ({"ray_data": (args.budget_mb, "ray-data")} if args.ray_data else {})
            | ({"in_memory": (0, "")} if args.in_memory else {}))
    for name, (budget, engine) in runs.items():
        print(f"running the {name} preparation ...", flush=True)
        run = run_sampled(prepare_cmd(log, work / f"prepared-{name}", budget, work, engine),
                          work / f"{name}.log")
        if run["rc"] != 0:
            sys.exit(f"{name} preparation failed (rc {run['rc']}): see {work / f'{name}.log'}")
        manifest = json.loads((work / f"prepared-{name}" / "manifest.json").read_text())
        c = manifest["counts"]
        run.update({k: c[k] for k in ("rows_read", "users", "items", "actions", "kcore_rounds")},
                   dropped=c["dropped"], shards=len(manifest["shards"]),
                   shard_bytes=sum(s["bytes"] for s in manifest["shards"]),
                   timings_s=manifest["timings_s"], fingerprint=manifest["fingerprint"])
        if engine:   # Ray's own count of what its object store spilled to disk
            spilled = [l for l in (work / f"{name}.log").read_text().splitlines() if "spilled" in l]
            run["spilled_mib"] = spilled[-1].rsplit("spilled ", 1)[1].split(" MiB")[0] if spilled else None
        result[name] = run
    first = next(iter(runs))              # the table's first block describes the first run
    s = result[first]
    rows = [("actions in the log", f"{actions:,}"),
            ("Parquet on disk", f"{result['log']['bytes_on_disk'] / 2**20:,.0f} MB"),
            ("the log as one pandas frame", f"{result['pandas_frame_mb']:,.0f} MB"),
            ("budget (memory_budget_mb)", f"{args.budget_mb:,} MB"),
            (f"{first}: peak RSS, process tree", f"{s['peak_tree_rss_mb']:,.0f} MB "
                                                  f"({s['processes_at_peak']} process(es))"),
            (f"{first}: largest single process", f"{s['max_single_process_peak_mb']:,.0f} MB (VmHWM)"),
            (f"{first}: wall time (2 shared cores)", f"{s['wall_s']:,.0f} s"),
            ("kept users / items / actions", f"{s['users']:,} / {s['items']:,} / {s['actions']:,}"),
            ("k-core rounds", f"{s['kcore_rounds']}"),
            ("dropped", ", ".join(f"{k} {v:,}" for k, v in s["dropped"].items())),
            ("shards", f"{s['shards']} ({s['shard_bytes'] / 2**20:,.0f} MB)")]
    if "spilled_mib" in s:
        rows.append((f"{first}: object store spilled", f"{s['spilled_mib']} MiB"))
    if "ray_data" in result and first != "ray_data":
        r = result["ray_data"]
        rows += [("ray-data: peak RSS, process tree", f"{r['peak_tree_rss_mb']:,.0f} MB "
                                                      f"({r['processes_at_peak']} processes, Ray)"),
                 ("ray-data: largest single process", f"{r['max_single_process_peak_mb']:,.0f} MB (VmHWM)"),
                 ("ray-data: wall time", f"{r['wall_s']:,.0f} s"),
                 ("ray-data: object store spilled", f"{r.get('spilled_mib')} MiB"),
                 ("ray-data: same counts as the first run", str(r["fingerprint"] == s["fingerprint"] and all(
                     r[k] == s[k] for k in ("users", "items", "actions", "kcore_rounds", "dropped"))))]
    if "in_memory" in result:
        m = result["in_memory"]
        rows += [("in-memory: peak RSS, process tree", f"{m['peak_tree_rss_mb']:,.0f} MB "
                                                       f"({m['processes_at_peak']} processes, Ray)"),
                 ("in-memory: wall time", f"{m['wall_s']:,.0f} s"),
                 ("same fingerprint and counts", str(m["fingerprint"] == s["fingerprint"] and all(
                     m[k] == s[k] for k in ("users", "items", "actions", "kcore_rounds", "dropped"))))]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    out = ROOT / args.json
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    main()
