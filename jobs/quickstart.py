"""Quickstart: the whole product on a small generated data set, no arguments needed.

    python -m jobs.quickstart [--workdir outputs/quickstart] [--epochs 8] [key.path=value ...]

1. writes a demo data set in the raw Amazon 2014 format (reviews + meta json.gz, drawn images)
   whose next item depends on the product line, the item and the time gap (data_pipelines/demo.py);
2. prepares it with the real pipeline: Ray Data, the bundled MiniLM text encoder, a timm ViT
   (randomly initialised: no pretrained image weights are reachable offline), WebDataset shards;
3. trains HM4SR with Ray Train on 2 workers (DeepSpeed engines; CPU + gloo when there is no GPU)
   on an embedded local Ray, with TensorBoard events and checkpoints under <workdir>/ray_results;
4. writes <workdir>/results.json with the test metrics.

The overrides are checked before any of that: a bad one is one `error: ...` line and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from jobs.common import DatasetJob, JobArgumentParser, exit_on_user_error, plan_job, run_plan

# A small model that learns the demo rule in a few epochs on 2 CPU cores.
QUICK = ["model.hidden_size=32", "model.inner_size=64", "model.max_seq_len=30", "model.hidden_dropout=0.1",
         "model.attn_dropout=0.1", "optim.lr=0.003", "optim.batch_size=128", "train.log_every_steps=10"]


def main(argv: list[str] | None = None) -> dict:
    parser = JobArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="outputs/quickstart")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="key.path=value config overrides (anywhere on the line)")
    args = parser.parse_intermixed_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")        # the bundled text encoder needs no hub
    work = Path(args.workdir).resolve()
    raw = work / "raw"
    job = DatasetJob(name="demo", source="amazon2014", description="the generated demo data set", prep={
        "category": "Demo", "image_dir": str(raw / "images"), "text_model": "minilm-offline",
        "image_model": "vit_tiny_patch16_224", "image_pretrained": False, "min_shards": 4,
        "progress": sys.stderr.isatty()})
    defaults = [*QUICK, f"optim.epochs={args.epochs}", f"train.num_workers={args.workers}",
                f"train.storage_path={work / 'ray_results'}"]
    yours = {text.split("=", 1)[0] for text in args.overrides}     # a key you give replaces ours
    plan = plan_job(job, [          # every override checked before the demo data is written
        "--raw-dir", str(raw), "--prepared-dir", str(work / "prepared"), "--output", str(work),
        *[d for d in defaults if d.split("=", 1)[0] not in yours], *args.overrides], check_paths=False)
    if not (raw / "reviews_Demo_5.json.gz").exists():
        from data_pipelines.demo import generate_demo
        generate_demo(raw)
    results = run_plan(plan)
    from hm4sr_dist.metrics import random_ranking_ndcg
    n_items = results["data_manifest"]["counts"]["items"]
    print(f"chance level: ndcg@10 {random_ranking_ndcg(10, n_items):.4f} ({n_items} items); "
          f"TensorBoard: tensorboard --logdir {work / 'ray_results'}")
    return results


if __name__ == "__main__":
    exit_on_user_error(main)
