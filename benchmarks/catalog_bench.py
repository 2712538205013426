"""Main loss (eq. 20) against catalogue size: peak memory and forward+backward time per step.

    python benchmarks/catalog_bench.py                          # 10^4 .. 10^7 items, B 1024, d 64
    python benchmarks/catalog_bench.py --items 1e4 1e5 --note contended \
        --out outputs/bench/catalog_contended.json                  # a quick check on a busy machine

The SASRec setting: the loss over an ID table, (n_items + 1, d) item vectors and (B, d) sequence
vectors (leaves standing in for the encoder's output), random targets. Methods (docs/scaling.md):
`full` = today's (B, n_items + 1) scores + F.cross_entropy; `chunked` = the exact chunked loss of
hm4sr_dist/catalog_loss.py (`--chunk` items per block); `sampled` = the logQ-corrected sampled
softmax (`--negatives` uniform negatives + in-batch). `full` is skipped where the memory model
predicts more than `--memory-limit-gb`.

Every setting runs in a fresh subprocess, so its peak resident memory (getrusage ru_maxrss; torch's
CPU allocations are invisible to tracemalloc) is its own. Reported: `peak_gb` (the process's peak),
`step_gb` (peak minus the resident memory after the tables were built: what the loss step adds,
gradients of the table included), `model_gb` (the memory model's prediction) and the best and mean
step time over `--repeats` steps after one warm-up step. A table is printed and JSON written to
`--out`. A benchmark, not a test: run it on a quiet machine; `--note` labels the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

GB = 2 ** 30


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024           # Linux reports KiB


def run_one(args) -> dict:
    """One (items, method) setting in this process; returns its measurements."""
    import torch

    from hm4sr_dist.catalog_loss import MainLoss, chunked_cross_entropy
    from hm4sr_dist.config import LossConfig
    from hm4sr_dist.losses import main_loss

    torch.set_num_threads(args.threads)
    n, b, d = args.n, args.batch, args.dim
    g = torch.Generator().manual_seed(0)
    items = (0.02 * torch.randn(n + 1, d, generator=g)).requires_grad_()      # the ID table
    seq = torch.randn(b, d, generator=g).requires_grad_()                      # H (B, d)
    target = torch.randint(1, n + 1, (b,), generator=g)
    if args.method == "full":
        def loss_fn():
            scores = seq @ items.T                                             # HM4SR.scores
            scores[:, 0] = float("-inf")
            return main_loss(scores, target)
    elif args.method == "chunked":
        def loss_fn():
            return chunked_cross_entropy(seq, items, target, args.chunk)
    else:
        sampled = MainLoss(LossConfig(main_loss="sampled", num_negatives=args.negatives), n)

        def loss_fn():
            return sampled(seq, items, target)
    setup_rss = _rss_bytes()

    def step() -> float:
        items.grad = seq.grad = None
        start = time.perf_counter()
        loss_fn().backward()
        return time.perf_counter() - start

    warmup = step()
    times = [step() for _ in range(args.repeats)]
    peak = _maxrss_bytes()
    return {"items": n, "method": args.method, "batch": b, "dim": d,
            "chunk": args.chunk if args.method == "chunked" else None,
            "negatives": args.negatives if args.method == "sampled" else None,
            "threads": args.threads, "warmup_s": warmup, "best_s": min(times),
            "mean_s": sum(times) / len(times), "peak_gb": peak / GB,
            "setup_gb": setup_rss / GB, "step_gb": (peak - setup_rss) / GB}


def predicted_gb(method: str, n: int, b: int, d: int, chunk: int, negatives: int) -> float:
    from hm4sr_dist.catalog_loss import chunked_loss_bytes, full_loss_bytes
    if method == "full":
        return full_loss_bytes(b, n, d) / GB
    if method == "chunked":
        return chunked_loss_bytes(b, n, d, chunk) / GB
    return 4 * (2 * b * (b + negatives) + 2 * (n + 1) * d) / GB       # (B, B+K) logits, table + grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=float, nargs="*", default=[1e4, 1e5, 1e6, 1e7])
    parser.add_argument("--methods", nargs="*", default=["full", "chunked", "sampled"],
                        choices=["full", "chunked", "sampled"])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=16384, help="items per block of the chunked loss")
    parser.add_argument("--negatives", type=int, default=4096, help="sampled negatives per step")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--memory-limit-gb", type=float, default=8.0,
                        help="skip a setting whose predicted memory exceeds this")
    parser.add_argument("--timeout", type=float, default=7200.0, help="seconds per setting")
    parser.add_argument("--note", default="", help="a label stored with the results, e.g. 'contended'")
    parser.add_argument("--out", default="outputs/bench/catalog.json")
    # internal: one setting in a subprocess
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args)), flush=True)
        return

    rows = []
    header = (f"{'items':>10} {'method':>8} {'model GB':>9} {'peak GB':>8} {'step GB':>8} "
              f"{'best s':>8} {'mean s':>8}  note")
    print(f"main loss fwd+bwd, B {args.batch}, d {args.dim}, chunk {args.chunk}, negatives "
          f"{args.negatives}, threads {args.threads}" + (f"  [{args.note}]" if args.note else ""), flush=True)
    print(header, flush=True)
    for n in (int(x) for x in args.items):
        for method in args.methods:
            model = predicted_gb(method, n, args.batch, args.dim, args.chunk, args.negatives)
            row = {"items": n, "method": method, "model_gb": model, "load_before": os.getloadavg()[0]}
            if model > args.memory_limit_gb:
                row["skipped"] = f"predicted {model:.1f} GB > --memory-limit-gb {args.memory_limit_gb:g}"
            else:
                cmd = [sys.executable, __file__, "--one", "--n", str(n), "--method", method,
                       "--batch", str(args.batch), "--dim", str(args.dim), "--chunk", str(args.chunk),
                       "--negatives", str(args.negatives), "--repeats", str(args.repeats),
                       "--threads", str(args.threads)]
                try:
                    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                    if done.returncode == 0:
                        row |= json.loads(done.stdout.strip().splitlines()[-1])
                    else:
                        row["error"] = (done.stderr.strip().splitlines() or ["exit %d" % done.returncode])[-1]
                except subprocess.TimeoutExpired:
                    row["error"] = f"timed out after {args.timeout:g} s"
            row["load_after"] = os.getloadavg()[0]
            rows.append(row)
            if "best_s" in row:
                line = (f"{n:>10,d} {method:>8} {model:>9.2f} {row['peak_gb']:>8.2f} {row['step_gb']:>8.2f} "
                        f"{row['best_s']:>8.3f} {row['mean_s']:>8.3f}  load {row['load_before']:.1f}")
            else:
                line = f"{n:>10,d} {method:>8} {model:>9.2f} {'-':>8} {'-':>8} {'-':>8} {'-':>8}  " + \
                    row.get("skipped", row.get("error", ""))
            print(line, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "note": args.note,
            "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": __import__("torch").__version__,
            "settings": {k: getattr(args, k) for k in ("batch", "dim", "chunk", "negatives", "repeats",
                                                       "threads", "memory_limit_gb")}}
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
