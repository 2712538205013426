"""Quickstart: train HM4SR end to end on a small generated log, no arguments needed.

    python -m jobs.quickstart [--epochs N] [--output DIR] [key.path=value ...]

Generates a log whose next item depends on the gap before the current one (so ID, content and
time all matter), trains on one process and writes DIR/results.json with test metrics.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from hm4sr_dist.config import load_config, to_dict
from hm4sr_dist.evaluate import evaluate_sums
from hm4sr_dist.metrics import finalize, random_ranking_ndcg
from hm4sr_dist.synthetic import batches, generate_log, split_samples
from hm4sr_dist.train.loop import fit_in_process

QUICK = ["model.hidden_size=32", "model.inner_size=64", "model.max_seq_len=30",
         "model.hidden_dropout=0.1", "model.attn_dropout=0.1", "optim.lr=0.003", "optim.batch_size=128"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/hm4sr_paper.yaml")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--output", default="outputs/quickstart")
    parser.add_argument("overrides", nargs="*", help="key.path=value config overrides")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, QUICK + args.overrides)
    log = generate_log(n_users=200, n_clusters=8, items_per_cluster=12, seed=cfg.optim.seed)
    samples = split_samples(log, cfg.model.max_seq_len)
    print(f"generated log: {len(log.sequences)} users, {log.catalog.n_items} items, "
          f"{len(samples['train'])} training samples")
    started = time.time()
    L, B = cfg.model.max_seq_len, cfg.optim.batch_size
    objective, history = fit_in_process(
        cfg, log.catalog, lambda epoch: batches(samples["train"], B, L, shuffle=True, seed=epoch),
        batches(samples["valid"], cfg.eval.batch_size, L), epochs=args.epochs)
    test = finalize(evaluate_sums(objective.model, batches(samples["test"], cfg.eval.batch_size, L), cfg.eval.ks), cfg.eval.ks)
    results = {"test": test, "history": history, "config": to_dict(cfg), "wall_seconds": time.time() - started,
               "chance_ndcg@10": random_ranking_ndcg(10, log.catalog.n_items)}
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print("test " + "  ".join(f"{k} {v:.4f}" for k, v in test.items() if k != "count")
          + f"  (chance ndcg@10 {results['chance_ndcg@10']:.4f})")
    print(f"wrote {out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
