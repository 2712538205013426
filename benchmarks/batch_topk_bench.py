"""Batch top-K (hm4sr-recommend) throughput against catalogue size: users/s of one actor.

    python benchmarks/batch_topk_bench.py                         # 10^4, 10^5, 10^6 items
    python benchmarks/batch_topk_bench.py --items 1e4 1e5 --note "busy 2-core box"

For each catalogue size a synthetic export is built the way a finished run leaves one (a prepared
folder's item side with random fp16 text / fp32 image features and categories, the default HM4SR
config: d 64, max_len 50, 2 layers; random weights; a run folder; `hm4sr-export`), then a fixed set
of `--users` random histories (lengths 1..max_len, real gaps) is scored by `TopKActor`, the very
object each Ray Data actor of `hm4sr-recommend` runs: Arrow batch in, (user, rank, item, score)
rows out, the scorer's encoder and chunked top-K (`--item-chunk` items per block) in between. One
warm-up batch, then every batch timed. Reported per size: the time to load the export and build
the item representations (an actor's start), encode and top-K milliseconds per batch (the same
batches timed again piece by piece), and users/s of the whole actor call. `hm4sr-recommend` runs
`--actors` of these side by side, so on N free cores (threads 1 each) or N GPUs the job's rate
is about N times this, less the driver's reading and writing.

A benchmark, not a test: it prints a table (and writes JSON with `--out`); label the machine's
state with `--note`. Without `--keep` the synthetic exports are deleted.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # this checkout's hm4sr_dist

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

T0, DAY = 1_700_000_000, 86_400


def synthetic_export(root: Path, n_items: int, text_width: int, image_width: int, seed: int = 0) -> Path:
    """A prepared item side + random-weight HM4SR + run folder, exported; returns the export folder."""
    from hm4sr_dist.config import ExperimentConfig, to_dict
    from hm4sr_dist.data import load_catalog
    from hm4sr_dist.objective import build_objective
    from hm4sr_dist.run_folder import write_run_folder
    from hm4sr_dist.serving.export import export_run

    rng = np.random.default_rng(seed)
    prepared = root / "prepared"
    prepared.mkdir(parents=True)
    pq.write_table(pa.table({"item_id": pa.array(np.arange(1, n_items + 1), pa.int64()),
                             "raw_id": pa.array([f"i{j}" for j in range(n_items)], pa.large_string())}),
                   prepared / "items.parquet")
    text = rng.standard_normal((n_items + 1, text_width), dtype=np.float32).astype(np.float16)
    image = rng.standard_normal((n_items + 1, image_width), dtype=np.float32)
    cats = (rng.random((n_items + 1, 8)) < 0.2).astype(np.float32)
    text[0] = image[0] = cats[0] = 0
    np.save(prepared / "text_features.npy", text)
    np.save(prepared / "image_features.npy", image)
    np.save(prepared / "categories.npy", cats)
    fingerprint = "be" * 32
    (prepared / "manifest.json").write_text(json.dumps({
        "schema_version": 1, "dataset": "bench", "fingerprint": fingerprint, "max_len": 50, "shards": [],
        "features": {"text": {"file": "text_features.npy", "width": text_width, "dtype": "float16"},
                     "image": {"file": "image_features.npy", "width": image_width, "dtype": "float32"}},
        "categories": {"file": "categories.npy", "n": 8},
        "counts": {"items": n_items, "users": 0, "actions": 0},
        "interval": {"mu": 100.0, "max_train_interval_seconds": 60 * DAY},
        "time": {"min": T0, "max": T0 + 365 * DAY, "n_days": 366}}))
    cfg = ExperimentConfig()
    cfg.data.prepared_dir, cfg.train.run_name = str(prepared), "bench-000000000000"
    cfg.train.storage_path = str(root / "storage")
    cfg = cfg.validate()
    model = build_objective(cfg.model, cfg.loss, load_catalog(prepared, mu=cfg.model.interval_scale)).model
    ckpt = root / "checkpoint"
    ckpt.mkdir()
    torch.save({k: v.detach().float().clone() for k, v in model.state_dict().items()}, ckpt / "model.pt")
    del model
    final = {"best_epoch": 1, "best_valid": 0.0, "epochs_run": 1}
    (ckpt / "final_metrics.json").write_text(json.dumps(final))
    np.savez(ckpt / "per_user_test.npz", user=np.arange(1), rank=np.arange(1))
    write_run_folder(root / "run", ckpt, config=to_dict(cfg), dataset="bench", identity="0" * 16,
                     fingerprint=fingerprint, wall_seconds=0.0, checkpoint_uri=str(ckpt))
    export_run(root / "run", root / "export")
    shutil.rmtree(ckpt)
    return root / "export"


def histories(n_users: int, n_items: int, max_len: int, seed: int = 1) -> pa.Table:
    """`hm4sr-recommend`'s block format: user, items (dense, list<int64>), times (list<int64>)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len + 1, n_users)
    total = int(lengths.sum())
    items = rng.integers(1, n_items + 1, total)
    gaps = rng.choice([0, 60, 3600, DAY, 20 * DAY], size=total)
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int32)
    running = np.cumsum(gaps)
    before = running[offsets[:-1]] - gaps[offsets[:-1]]               # each user's clock starts at T0
    times = T0 + running - np.repeat(before, lengths)
    return pa.table({"user": pa.array([f"u{j}" for j in range(n_users)], pa.string()),
                     "items": pa.ListArray.from_arrays(pa.array(offsets), pa.array(items, pa.int64())),
                     "times": pa.ListArray.from_arrays(pa.array(offsets), pa.array(times, pa.int64()))})


def bench(export: Path, table: pa.Table, args) -> dict:
    from hm4sr_dist.serving.batch import TopKActor
    from hm4sr_dist.serving.scorer import chunked_topk

    start = time.perf_counter()
    actor = TopKActor(str(export), args.k, item_chunk_size=args.item_chunk, batch_size=args.batch_size,
                      device=args.device, threads=args.threads)
    load_s = time.perf_counter() - start
    b = args.batch_size
    batches = [table.slice(s, b) for s in range(0, table.num_rows, b)]
    actor(batches[0])                                                     # warm-up
    start = time.perf_counter()
    rows = sum(actor(part).num_rows for part in batches)
    whole_s = time.perf_counter() - start
    assert rows == table.num_rows * args.k
    scorer = actor.scorer
    encode_s = topk_s = 0.0
    with torch.no_grad():
        for part in batches:
            items, times = (part.column(c).combine_chunks() for c in ("items", "times"))
            o = items.offsets.to_numpy()
            iv, tv = items.values.to_numpy(), times.values.to_numpy()
            dense = [(iv[o[i]:o[i + 1]], tv[o[i]:o[i + 1]]) for i in range(part.num_rows)]
            t = time.perf_counter()
            seq = scorer._encode(dense)
            _sync(args.device)
            encode_s += time.perf_counter() - t
            t = time.perf_counter()
            chunked_topk(seq, scorer.item_repr, args.k, scorer.item_chunk_size)
            _sync(args.device)
            topk_s += time.perf_counter() - t
    return {"n_items": scorer.n_items, "users": table.num_rows, "batch": b, "k": args.k,
            "item_chunk": args.item_chunk, "threads": torch.get_num_threads(), "device": args.device,
            "load_s": load_s, "encode_ms_per_batch": 1e3 * encode_s / len(batches),
            "topk_ms_per_batch": 1e3 * topk_s / len(batches), "seconds": whole_s,
            "users_per_s": table.num_rows / whole_s,
            "item_repr_mb": scorer.item_repr.numel() * scorer.item_repr.element_size() / 2**20}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=float, nargs="+", default=[1e4, 1e5, 1e6])
    parser.add_argument("--users", type=int, default=2048, help="histories scored per size")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--item-chunk", type=int, default=65_536)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (an hm4sr-recommend CPU actor runs 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--text-width", type=int, default=384)
    parser.add_argument("--image-width", type=int, default=768)
    parser.add_argument("--work-dir", default=None,
                        help="where the synthetic exports go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--note", default="")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="topk-bench-"))
    results = []
    print(f"{'items':>9} {'users':>6} {'batch':>5} {'chunk':>6} {'thr':>3} {'load s':>7} "
          f"{'encode ms/b':>11} {'top-k ms/b':>10} {'users/s':>9}", flush=True)
    try:
        for n in (int(x) for x in args.items):
            start = time.perf_counter()
            export = synthetic_export(work / f"n{n}", n, args.text_width, args.image_width)
            build_s = time.perf_counter() - start
            table = histories(args.users, n, 50)
            row = bench(export, table, args) | {"export_build_s": build_s}
            results.append(row)
            print(f"{n:>9} {row['users']:>6} {row['batch']:>5} {row['item_chunk']:>6} {row['threads']:>3} "
                  f"{row['load_s']:>7.2f} {row['encode_ms_per_batch']:>11.1f} "
                  f"{row['topk_ms_per_batch']:>10.1f} "
                  f"{row['users_per_s']:>9.0f}", flush=True)
            if not args.keep:
                shutil.rmtree(work / f"n{n}", ignore_errors=True)
    finally:
        if not args.keep and not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "note": args.note,
            "machine": {"cpus": __import__("os").cpu_count(), "platform": platform.platform(),
                        "torch": torch.__version__}, "results": results}, indent=2))
    if args.note:
        print(f"note: {args.note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
