"""Main loss (eq. 20) against catalogue size: peak memory and forward+backward time per step.

    python benchmarks/catalog_bench.py                          # 10^4 .. 10^7 items, B 1024, d 64
    python benchmarks/catalog_bench.py --items 1e4 1e5 --note contended \
        --out outputs/bench/catalog_contended.json                  # a quick check on a busy machine

Two settings (`--settings`), both through the model's own `ItemEmbedding`:
- `sasrec`: the ID table only; the item vectors are the (n_items + 1, d) ID table itself.
- `hm4sr`: ID + text, [x_id; x_txt] (n_items + 1, 2d), x_txt = W f_txt + b projected block by
  block from a float16 (n_items + 1, `--text-width`) table memory-mapped from an .npy file in
  `--feature-dir` (random features, generated once per size and reused: 7.7 GB at 10^7 x 384).
(B, M*d) sequence vectors are leaves standing in for the encoder's output; random targets.
Methods (docs/scaling.md):
`full` = today's (B, n_items + 1) scores + F.cross_entropy; `chunked` = the exact chunked loss of
hm4sr_dist/catalog_loss.py (`--chunk` items per block); `sampled` = the logQ-corrected sampled
softmax (`--negatives` uniform negatives + in-batch), which computes the item vectors of the
targets and negatives only (`ItemEmbedding.gather`, as HM4SRObjective does), not the whole
table. `full` is skipped where the memory model
predicts more than `--memory-limit-gb`.

Every setting runs in a fresh subprocess, so its peak resident memory (VmHWM of its own memory
map, `hm4sr_dist.memory`; torch's CPU allocations are invisible to tracemalloc) is its own. Reported: `peak_gb` (the process's peak
resident set, the mapped feature pages it touched included), `mapped_gb` (resident pages of the
mapped feature file at the end: page cache, shared by every process of the node that maps it),
`step_gb` (peak minus the resident memory after the tables were built minus `mapped_gb`: the
private memory the step adds, gradients included), `model_gb` (the memory model's prediction of
that) and the best and mean time of forward (item table + loss) + backward over `--repeats` steps
after one warm-up step. A table is printed and JSON written to
`--out`. A benchmark, not a test: run it on a quiet machine; `--note` labels the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # this checkout's hm4sr_dist
from hm4sr_dist.memory import peak_resident_bytes, resident_bytes

GB = 2 ** 30
SETTINGS = ("sasrec", "hm4sr")


def feature_file(folder: str, n: int, width: int) -> Path:
    """The float16 (n + 1, width) random text table of the hm4sr setting, written once (row 0 = 0)."""
    import numpy as np

    path = Path(folder) / f"text_fp16_{n}x{width}.npy"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".partial-{os.getpid()}")
    table = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float16, shape=(n + 1, width))
    step = 1 << 16
    for start in range(0, n + 1, step):           # block by block: never the whole table in memory
        stop = min(n + 1, start + step)
        rng = np.random.default_rng(start)
        table[start:stop] = rng.standard_normal((stop - start, width), dtype=np.float32)
    table[0] = 0                                  # padding item
    table.flush()
    del table
    partial.replace(path)
    return path


def _mapped_bytes(path: str) -> int:
    """Resident bytes of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    target = str(Path(path).resolve())
    with open("/proc/self/smaps") as fh:
        for line in fh:
            head = line.split()
            if head and "-" in head[0] and ":" not in head[0]:
                inside = len(head) >= 6 and head[5] == target
            elif inside and head[0] == "Rss:":
                total += int(head[1]) * 1024
    return total


def run_one(args) -> dict:
    """One (setting, items, method) in this process; returns its measurements."""
    import torch

    from hm4sr_dist.catalog_loss import MainLoss, chunked_cross_entropy
    from hm4sr_dist.config import ExperimentConfig, LossConfig
    from hm4sr_dist.losses import main_loss
    from hm4sr_dist.model import ItemCatalog
    from hm4sr_dist.model.items import ItemEmbedding

    torch.set_num_threads(args.threads)
    n, b, d = args.n, args.batch, args.dim
    g = torch.Generator().manual_seed(0)
    cfg = ExperimentConfig().model
    cfg.hidden_size = d
    if args.setting == "sasrec":
        cfg.modalities = ["id"]
        catalog = ItemCatalog(n_items=n)
    else:
        from hm4sr_dist.data.catalog import map_feature_table
        cfg.modalities = ["id", "text"]
        table = map_feature_table(args.feature_file, n + 1, args.text_width, "float16")
        catalog = ItemCatalog(n_items=n, text_features=table, feature_files={"text": args.feature_file})
    emb = ItemEmbedding(cfg, catalog)
    with torch.no_grad():
        emb.id_table.weight.normal_(0, 0.02, generator=g)
        emb.id_table.weight[0].zero_()
    width = len(cfg.modalities) * d
    seq = torch.randn(b, width, generator=g).requires_grad_()                  # H (B, M*d)
    target = torch.randint(1, n + 1, (b,), generator=g)
    if args.method == "full":
        def loss_fn(items):
            scores = seq @ items.T                                             # HM4SR.scores
            scores[:, 0] = float("-inf")
            return main_loss(scores, target)
    elif args.method == "chunked":
        def loss_fn(items):
            return chunked_cross_entropy(seq, items, target, args.chunk)
    else:
        sampled = MainLoss(LossConfig(main_loss="sampled", num_negatives=args.negatives), n)

        def loss_fn(items):                       # only the target and negative rows (HM4SRObjective)
            return sampled(seq, None, target, rows=emb.gather)
    setup_rss = resident_bytes()

    def step() -> float:
        emb.zero_grad(set_to_none=True)
        seq.grad = None
        start = time.perf_counter()
        items = None if args.method == "sampled" else emb()    # eq. 2-5, the whole item table
        loss_fn(items).backward()                              # eq. 20, backward
        return time.perf_counter() - start

    warmup = step()
    times = [step() for _ in range(args.repeats)]
    peak = peak_resident_bytes()
    mapped = _mapped_bytes(args.feature_file) if args.setting == "hm4sr" else 0
    return {"setting": args.setting, "items": n, "method": args.method, "batch": b, "dim": d,
            "width": width, "text_width": args.text_width if args.setting == "hm4sr" else None,
            "chunk": args.chunk if args.method == "chunked" else None,
            "negatives": args.negatives if args.method == "sampled" else None,
            "threads": args.threads, "warmup_s": warmup, "best_s": min(times),
            "mean_s": sum(times) / len(times), "peak_gb": peak / GB, "mapped_gb": mapped / GB,
            "setup_gb": setup_rss / GB, "step_gb": (peak - setup_rss - mapped) / GB}


def predicted_gb(setting: str, method: str, n: int, b: int, d: int, chunk: int, negatives: int) -> float:
    """The memory model (docs/scaling.md) of the private memory a step adds, in GB."""
    from hm4sr_dist.catalog_loss import chunked_loss_bytes, full_loss_bytes
    width = d if setting == "sasrec" else 2 * d
    # hm4sr: besides the concatenated (n+1, 2d) table and its gradient, the projected x_txt and the
    # ID table's gradient, (n+1, d) each, and the concatenation's gradient reaching x_txt.
    extra = 0 if setting == "sasrec" else 4 * 3 * (n + 1) * d
    if method == "full":
        return (full_loss_bytes(b, n, width) + extra) / GB
    if method == "chunked":
        return (chunked_loss_bytes(b, n, width, chunk) + extra) / GB
    # sampled: (B, B+K) logits, the (2B+K, M*d) rows read and their gradient, and the ID table's
    # dense gradient (n+1, d); no whole (n+1, M*d) table
    return 4 * (2 * b * (b + negatives) + 2 * (2 * b + negatives) * width + (n + 1) * d) / GB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=float, nargs="*", default=[1e4, 1e5, 1e6, 1e7])
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=SETTINGS,
                        help="sasrec = ID table only; hm4sr = ID + fp16 memory-mapped text features")
    parser.add_argument("--text-width", type=int, default=384, help="text feature width (hm4sr)")
    parser.add_argument("--feature-dir", default="/tmp/hm4sr_bench_features",
                        help="where the hm4sr setting's float16 feature files are written and reused")
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
    parser.add_argument("--setting", default="sasrec", help=argparse.SUPPRESS)
    parser.add_argument("--feature-file", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args)), flush=True)
        return

    rows = []
    header = (f"{'setting':>7} {'items':>10} {'method':>8} {'model GB':>9} {'peak GB':>8} {'mapped GB':>9} "
              f"{'step GB':>8} {'best s':>8} {'mean s':>8}  note")
    print(f"main loss fwd+bwd, B {args.batch}, d {args.dim}, chunk {args.chunk}, negatives "
          f"{args.negatives}, text width {args.text_width}, threads {args.threads}"
          + (f"  [{args.note}]" if args.note else ""), flush=True)
    print(header, flush=True)
    for setting in args.settings:
        for n in (int(x) for x in args.items):
            features = ""
            if setting == "hm4sr":
                clock = time.perf_counter()
                features = str(feature_file(args.feature_dir, n, args.text_width))
                made = time.perf_counter() - clock
                if made > 1:
                    print(f"  wrote {features} in {made:.1f} s", flush=True)
            for method in args.methods:
                rows.append(_run_setting(args, setting, n, method, features))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "note": args.note,
            "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": __import__("torch").__version__,
            "settings": {k: getattr(args, k) for k in ("batch", "dim", "chunk", "negatives", "repeats",
                                                       "threads", "memory_limit_gb", "text_width")}}
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"wrote {out}", flush=True)


def _run_setting(args, setting: str, n: int, method: str, features: str) -> dict:
    model = predicted_gb(setting, method, n, args.batch, args.dim, args.chunk, args.negatives)
    row = {"setting": setting, "items": n, "method": method, "model_gb": model,
           "load_before": os.getloadavg()[0]}
    if model > args.memory_limit_gb:
        row["skipped"] = f"predicted {model:.1f} GB > --memory-limit-gb {args.memory_limit_gb:g}"
    else:
        cmd = [sys.executable, __file__, "--one", "--n", str(n), "--method", method, "--setting", setting,
               "--feature-file", features, "--text-width", str(args.text_width),
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
    if "best_s" in row:
        line = (f"{setting:>7} {n:>10,d} {method:>8} {model:>9.2f} {row['peak_gb']:>8.2f} "
                f"{row['mapped_gb']:>9.2f} {row['step_gb']:>8.2f} {row['best_s']:>8.3f} "
                f"{row['mean_s']:>8.3f}  load {row['load_before']:.1f}")
    else:
        line = (f"{setting:>7} {n:>10,d} {method:>8} {model:>9.2f} {'-':>8} {'-':>9} {'-':>8} {'-':>8} "
                f"{'-':>8}  " + row.get("skipped", row.get("error", "")))
    print(line, flush=True)
    return row


if __name__ == "__main__":
    main()
