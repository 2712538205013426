"""Parameter count and forward+backward time per batch for the paper's settings and for SASRec.

    python benchmarks/model_step_bench.py [--batch 1024] [--length 50] [--items 12101] [--repeats 3]

A catalogue of Beauty's size with 768-d text and image features (BERT / ViT widths) and random
categories; every sequence is full length (the worst case: real batches are trimmed to their
longest sequence). Prints one line per setting. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import time

import torch

from hm4sr_dist.batch import Batch
from hm4sr_dist.config import ExperimentConfig
from hm4sr_dist.feasibility import with_variant
from hm4sr_dist.model.catalog import ItemCatalog
from hm4sr_dist.objective import build_objective


def make_catalog(n_items: int, width: int, n_categories: int) -> ItemCatalog:
    g = torch.Generator().manual_seed(0)
    text = torch.randn(n_items + 1, width, generator=g)
    image = torch.randn(n_items + 1, width, generator=g)
    cats = torch.rand(n_items + 1, n_categories, generator=g) < 0.02
    text[0] = image[0] = 0
    cats[0] = False
    return ItemCatalog(n_items, text, image, cats, max_interval_bucket=2900,
                       time_origin=1_300_000_000, n_days=4000)


def make_batch(b: int, length: int, n_items: int) -> Batch:
    g = torch.Generator().manual_seed(1)
    items = torch.randint(1, n_items + 1, (b, length), generator=g)
    gaps = torch.randint(0, 86400 * 60, (b, length), generator=g)
    times = 1_300_000_000 + gaps.cumsum(1)
    return Batch(items, times, torch.full((b,), length), torch.randint(1, n_items + 1, (b,), generator=g))


def bench(variant: str, args) -> None:
    cfg = with_variant(ExperimentConfig(), variant)
    catalog = make_catalog(args.items, 768, args.categories)
    torch.manual_seed(0)
    objective = build_objective(cfg.model, cfg.loss, catalog)
    batch = make_batch(args.batch, args.length, args.items)
    objective(batch).total.backward()                                  # warm-up
    times = []
    for _ in range(args.repeats):
        objective.zero_grad(set_to_none=True)
        start = time.perf_counter()
        objective(batch).total.backward()
        times.append(time.perf_counter() - start)
    best, mean = min(times), sum(times) / len(times)
    print(f"{variant:7s} params {objective.model.parameter_count():>10,d}  fwd+bwd per {args.batch}x{args.length} "
          f"batch: best {best:.2f}s mean {mean:.2f}s  ({args.batch / best:.0f} seq/s)  "
          f"threads {torch.get_num_threads()}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--length", type=int, default=50)
    parser.add_argument("--items", type=int, default=12101)
    parser.add_argument("--categories", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="*", default=["hm4sr", "sasrec"])
    args = parser.parse_args()
    for variant in args.variants:
        bench(variant, args)


if __name__ == "__main__":
    main()
