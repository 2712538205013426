"""Data pipeline benchmark on the real data sets: preparation throughput, 5-core counts against a
direct count, shard bytes per layout, and reader throughput per worker.

    python benchmarks/data_pipeline_bench.py --data-root ../shared/data --out outputs/bench

Layouts compared: "per-user" (what `prepare` writes: one sample per user, the reader expands
prefixes) and "per-prefix" (one ready-made sample per training prefix, written here only to
measure it). Results are printed and saved to <out>/data_bench.json.
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from data_pipelines.config import PrepConfig
from data_pipelines.prepare import ensure_ray, prepare
from hm4sr_dist.data import ShardReader, collate, read_manifest
from hm4sr_dist.data.records import iter_shard_tarfile, split_ends


def direct_kcore_counts(pairs: list[tuple[str, str, int]], k: int = 5) -> tuple[int, int, int]:
    """Plain-Python dedupe + iterative k-core: (users, items, actions)."""
    rows = list(dict.fromkeys(pairs))
    while True:
        uc: dict = {}
        ic: dict = {}
        for u, i, _ in rows:
            uc[u] = uc.get(u, 0) + 1
            ic[i] = ic.get(i, 0) + 1
        kept = [r for r in rows if uc[r[0]] >= k and ic[r[1]] >= k]
        if len(kept) == len(rows):
            return len(uc), len(ic), len(rows)
        rows = kept


def raw_beauty(root: Path) -> list:
    out = []
    for a, b in zip(open(root / "Beauty_item.txt"), open(root / "Beauty_time.txt")):
        a, b = a.split(), b.split()
        out += [(a[0], i, int(t)) for i, t in zip(a[1:], b[1:])]
    return out


def raw_ml100k(root: Path) -> list:
    return [(u, i, int(t)) for u, i, _, t in (line.split("\t") for line in open(root / "u.data"))]


def write_prefix_layout(prepared: Path, out: Path, max_len: int) -> int:
    """Every training prefix as its own sample (2, L+1): the alternative layout, for measuring."""
    out.mkdir(parents=True, exist_ok=True)
    total = 0
    for shard in sorted((prepared / "shards").glob("*.tar")):
        target = out / shard.name
        with tarfile.open(target, "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, items, times in iter_shard_tarfile(shard):
                for end in split_ends(len(items), "train"):
                    lo = max(0, end - max_len)
                    buf = io.BytesIO()
                    np.save(buf, np.stack([items[lo:end + 1], times[lo:end + 1]]))
                    info = tarfile.TarInfo(f"{key}_{end:05d}.seq.npy")
                    info.size = buf.tell()
                    buf.seek(0)
                    tar.addfile(info, buf)
        total += target.stat().st_size
    return total


def read_prefix_layout(folder: Path, batch_size: int, max_len: int) -> tuple[int, float]:
    start, n, rows = time.perf_counter(), 0, []
    for shard in sorted(folder.glob("*.tar")):
        for _key, items, times in iter_shard_tarfile(shard):
            rows.append((items, times, len(items) - 1))
            if len(rows) == batch_size:
                n += len(collate(rows, max_len))
                rows = []
    return n, time.perf_counter() - start


def reader_rate(prepared: Path, world_size: int, backend: str, batch_size: int = 1024) -> dict:
    """Samples/s of each rank's reader (ranks run one after another here: per-worker rates)."""
    rates = []
    for rank in range(world_size):
        reader = ShardReader(prepared, "train", batch_size, rank, world_size, seed=0, backend=backend)
        start, n = time.perf_counter(), 0
        for batch in reader:
            n += len(batch)
        rates.append(n / (time.perf_counter() - start))
    return {"world_size": world_size, "backend": backend, "samples_per_s_per_worker": [round(r) for r in rates]}


def run(data_root: Path, out: Path, ml_text_model: str = "minilm-offline") -> dict:
    cfgs = {
        "ml-100k": PrepConfig("movielens", str(out / "ml-100k"), input_dir=str(data_root / "ml-100k"),
                              text_model=ml_text_model, force=True, progress=False),
        "amazon-beauty": PrepConfig("sequence", str(out / "beauty"), input_dir=str(data_root / "amazon-beauty"),
                                    force=True, progress=False),
    }
    raw = {"ml-100k": raw_ml100k(data_root / "ml-100k"), "amazon-beauty": raw_beauty(data_root / "amazon-beauty")}
    ensure_ray(cfgs["ml-100k"])  # started once, outside the timed runs
    results: dict = {}
    for name, cfg in cfgs.items():
        m = prepare(cfg)
        c = m["counts"]
        direct = direct_kcore_counts(raw[name])
        work = sum(v for k, v in m["timings_s"].items() if k != "ray_start")
        prepared = Path(cfg.out_dir)
        prefix_bytes = write_prefix_layout(prepared, out / f"{name}-prefix-layout", m["max_len"])
        n_prefix, t_prefix = read_prefix_layout(out / f"{name}-prefix-layout", 1024, m["max_len"])
        results[name] = {
            "counts": {"users": c["users"], "items": c["items"], "actions": c["actions"]},
            "direct_count": dict(zip(("users", "items", "actions"), direct)),
            "match": (c["users"], c["items"], c["actions"]) == direct,
            "samples": c["samples"],
            "timings_s": m["timings_s"],
            "pipeline_actions_per_s": round(c["rows_read"] / work),
            "shard_bytes_per_user_layout": sum(s["bytes"] for s in m["shards"]),
            "shard_bytes_per_prefix_layout_train_only": prefix_bytes,
            "shards": len(m["shards"]),
            "reader": [reader_rate(prepared, 1, "tarfile"), reader_rate(prepared, 1, "webdataset"),
                       reader_rate(prepared, 2, "tarfile"), reader_rate(prepared, 4, "tarfile")],
            "prefix_layout_read_samples_per_s": round(n_prefix / t_prefix),
        }
    return results


def print_table(results: dict) -> None:
    for name, r in results.items():
        print(f"== {name}")
        print(f"  after 5-core: {r['counts']}  direct count: {r['direct_count']}  match={r['match']}")
        print(f"  samples: {r['samples']}")
        print(f"  pipeline: {r['pipeline_actions_per_s']:,} actions/s (stages: {r['timings_s']})")
        print(f"  shard bytes: per-user {r['shard_bytes_per_user_layout']:,} in {r['shards']} shards; "
              f"per-prefix (train only) {r['shard_bytes_per_prefix_layout_train_only']:,}")
        for rd in r["reader"]:
            print(f"  reader {rd['backend']:<10} world {rd['world_size']}: samples/s per worker "
                  f"{rd['samples_per_s_per_worker']}")
        print(f"  per-prefix layout reader: {r['prefix_layout_read_samples_per_s']:,} samples/s")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--out", default="outputs/bench")
    parser.add_argument("--ml-text-model", default="minilm-offline")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = run(Path(args.data_root), out, args.ml_text_model)
    print_table(results)
    (out / "data_bench.json").write_text(json.dumps(results, indent=1))
    return results


@pytest.mark.benchmark
def test_data_pipeline_benchmark(tmp_path):
    root = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
    if not (root / "amazon-beauty").is_dir():
        pytest.skip(f"{root}: the shared real data sets are not present on this machine")
    results = main(["--data-root", str(root), "--out", str(tmp_path)])
    assert results["amazon-beauty"]["counts"] == {"users": 22363, "items": 12101, "actions": 198502}
    assert all(r["match"] for r in results.values())


if __name__ == "__main__":
    main()
