"""Does the input pipeline stall the training step? Step time and data-wait fraction with and
without the reader's background prefetch, on prepared shards, one process.

    python benchmarks/reader_prefetch_bench.py [--prepared-dir outputs/prepared/beauty] \
        [--steps 120] [--batch 1024] [--variants sasrec hm4sr] [--prefetch 0 4] [--threads 1]
    python benchmarks/reader_prefetch_bench.py --epochs 2 --validate     # whole epochs + validation
    python benchmarks/reader_prefetch_bench.py --epoch-start --pause-s 5  # reader only: epoch 1's first batch

Each (variant, prefetch) trains the model from the same seed for `--steps` steps of the training
reader (epoch 0, the paper's settings resolved against the data set, a plain Adam step) through
`hm4sr_dist.train.loop.run_epoch`, the Ray Train worker's own loop, so the data-wait fraction is
the one the training runs report (`epoch/data_wait_fraction`: time blocked in `next()` on the
batch iterator / fetch + step time). `--threads` is the torch thread count (a Ray Train worker on
the CPU uses `train.cpus_per_worker`, 1 by default). The first fetch (thread start, first
bucketing pool) is reported separately and included in the fraction. With `--epochs N` each
setting trains N whole epochs instead (one row per epoch, `--validate` runs the real validation
between them): from the second epoch on, the first pool was read ahead while the previous epoch
ended, which is what the first-fetch time then shows. `--epoch-start` measures only that, without
a model: read epoch 0 to its end, pause `--pause-s` (standing in for validation), `set_epoch(1)`,
time the first batch. Writes
`outputs/bench/reader_prefetch.json` (with the load average: on a shared box the numbers are
contended). A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from itertools import islice
from pathlib import Path

import torch

from hm4sr_dist.config import ExperimentConfig
from hm4sr_dist.feasibility import with_variant
from hm4sr_dist.data import ShardReader, load_catalog, read_manifest
from hm4sr_dist.feasibility import DataOffer, resolve
from hm4sr_dist.objective import build_objective
from hm4sr_dist.train.loop import EpochProgress, optimizer_step, run_epoch


class FirstFetch:
    """Wraps a batch iterator to time its first `next()` (thread start + first pool)."""

    def __init__(self, batches):
        self.it, self.first = iter(batches), None

    def __iter__(self):
        return self

    def __next__(self):
        if self.first is None:
            start = time.perf_counter()
            batch = next(self.it)
            self.first = time.perf_counter() - start
            return batch
        return next(self.it)


def run(variant: str, prefetch: int, args, manifest: dict) -> dict:
    cfg = with_variant(ExperimentConfig(), variant)
    cfg = resolve(cfg, DataOffer.from_manifest(manifest)).config
    catalog = load_catalog(args.prepared_dir, mu=cfg.model.interval_scale)
    torch.manual_seed(cfg.optim.seed)
    objective = build_objective(cfg.model, cfg.loss, catalog)
    optimizer = torch.optim.Adam(objective.parameters(), lr=cfg.optim.lr)
    step = optimizer_step(objective, optimizer, cfg.optim.grad_clip)
    reader = ShardReader(args.prepared_dir, "train", args.batch, seed=cfg.optim.seed,
                         shuffle_buffer=cfg.data.shuffle_buffer, max_len=cfg.model.max_seq_len,
                         bucket_pool_batches=cfg.data.bucket_pool_batches, prefetch_batches=prefetch)
    if args.epochs:
        valid = (ShardReader(args.prepared_dir, "valid", args.batch, max_len=cfg.model.max_seq_len,
                             prefetch_batches=prefetch) if args.validate else None)
        rows = [epoch_row(variant, prefetch, args, e, step, reader, objective, valid, cfg)
                for e in range(args.epochs)]
        reader.close()
        return rows
    steps = min(args.steps, len(reader))
    timed = FirstFetch(islice(iter(reader), steps))
    cpu0, wall0 = time.process_time(), time.perf_counter()
    progress = run_epoch(step, timed, EpochProgress())
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    reader.close()
    rest = max(progress.batches - 1, 1)
    row = {"variant": variant, "prefetch_batches": prefetch, "steps": progress.batches,
           "batch_size": args.batch, "step_s_mean": progress.seconds / progress.batches,
           # the step without its wait: shows whether the producer thread slows the step (GIL)
           "compute_s_mean": (progress.seconds - progress.data_wait_seconds) / progress.batches,
           "data_wait_fraction": progress.data_wait_fraction(),
           "data_wait_s": progress.data_wait_seconds, "first_fetch_s": timed.first,
           "data_wait_fraction_after_first": (progress.data_wait_seconds - timed.first)
           / max(progress.seconds - timed.first, 1e-9),
           "data_wait_ms_per_step_after_first": 1000 * (progress.data_wait_seconds - timed.first) / rest,
           "wall_s": wall, "process_cpu_s": cpu, "loss": progress.means().get("total"),
           "loadavg_1m_after": os.getloadavg()[0]}
    print(f"{variant:7s} prefetch {prefetch}: {row['step_s_mean'] * 1000:7.1f} ms/step "
          f"({row['compute_s_mean'] * 1000:.1f} computing)  data wait "
          f"{100 * row['data_wait_fraction']:5.1f}% (after the first fetch "
          f"{100 * row['data_wait_fraction_after_first']:5.1f}%, "
          f"{row['data_wait_ms_per_step_after_first']:.1f} ms/step; first fetch {timed.first:.2f} s)  "
          f"loss {row['loss']:.4f}  load {row['loadavg_1m_after']:.1f}", flush=True)
    return [row]


def epoch_row(variant, prefetch, args, epoch, step, reader, objective, valid, cfg) -> dict:
    reader.set_epoch(epoch)
    timed = FirstFetch(reader)
    progress = run_epoch(step, timed, EpochProgress())
    valid_s = 0.0
    if valid is not None:
        from hm4sr_dist.evaluate import evaluate_sums
        start = time.perf_counter()
        evaluate_sums(objective.model, valid, cfg.eval.ks, cfg.eval.item_chunk_size)
        valid_s = time.perf_counter() - start
    row = {"variant": variant, "prefetch_batches": prefetch, "epoch": epoch, "steps": progress.batches,
           "batch_size": args.batch, "step_s_mean": progress.seconds / progress.batches,
           "data_wait_fraction": progress.data_wait_fraction(), "data_wait_s": progress.data_wait_seconds,
           "first_fetch_s": timed.first, "epoch_s": progress.seconds, "valid_s": valid_s,
           "loss": progress.means().get("total"), "loadavg_1m_after": os.getloadavg()[0]}
    print(f"{variant:7s} prefetch {prefetch} epoch {epoch}: {row['step_s_mean'] * 1000:7.1f} ms/step  "
          f"data wait {100 * row['data_wait_fraction']:5.1f}% (first fetch {timed.first:.2f} s)  "
          f"valid {valid_s:.1f} s  load {row['loadavg_1m_after']:.1f}", flush=True)
    return row


def epoch_start(prefetch: int, args) -> dict:
    reader = ShardReader(args.prepared_dir, "train", args.batch, seed=2020, prefetch_batches=prefetch)
    start = time.perf_counter()
    n = sum(1 for _ in reader)
    read_s = time.perf_counter() - start
    time.sleep(args.pause_s)
    reader.set_epoch(1)
    start = time.perf_counter()
    next(iter(reader))
    first = time.perf_counter() - start
    reader.close()
    row = {"mode": "epoch_start", "prefetch_batches": prefetch, "batch_size": args.batch,
           "epoch0_batches": n, "epoch0_read_s": read_s, "pause_s": args.pause_s,
           "epoch1_first_batch_s": first, "loadavg_1m_after": os.getloadavg()[0]}
    print(f"reader only, prefetch {prefetch}: epoch 0 read in {read_s:.1f} s ({n} batches); after a "
          f"{args.pause_s:.0f} s pause epoch 1's first batch took {first:.3f} s  "
          f"load {row['loadavg_1m_after']:.1f}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared-dir", default="outputs/prepared/beauty")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--variants", nargs="*", default=["sasrec", "hm4sr"])
    parser.add_argument("--prefetch", type=int, nargs="*", default=[0, 4])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each setting, interleaved")
    parser.add_argument("--epochs", type=int, default=0, help="whole epochs per setting (0 = --steps of epoch 0)")
    parser.add_argument("--validate", action="store_true", help="with --epochs: validate after each epoch")
    parser.add_argument("--epoch-start", action="store_true", help="reader only: time epoch 1's first batch")
    parser.add_argument("--pause-s", type=float, default=5.0, help="with --epoch-start: the pause between epochs")
    parser.add_argument("--out", default="outputs/bench/reader_prefetch.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    manifest = read_manifest(args.prepared_dir)
    rows = []
    load_before = os.getloadavg()[0]
    for _ in range(args.repeats):
        if args.epoch_start:
            rows.extend(epoch_start(prefetch, args) for prefetch in args.prefetch)
            continue
        for variant in args.variants:
            for prefetch in args.prefetch:
                rows.extend(run(variant, prefetch, args, manifest))
    out = {"prepared_dir": args.prepared_dir, "dataset": manifest.get("dataset"),
           "torch_threads": args.threads, "cpu_count": os.cpu_count(), "loadavg_1m_before": load_before,
           "contended": "measured on a shared 2-core box while other jobs ran; see loadavg",
           "python": platform.python_version(), "torch": torch.__version__, "runs": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
