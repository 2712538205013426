"""`train.compile` on the CPU: compiled against eager, on the machine at hand (run it quiet).

    python benchmarks/compile_bench.py --prepared-dir outputs/prepared/beauty [--steps 0] \
        [--out outputs/bench/compile.json]

1. `step`: HM4SR (paper setting: ID, 768-d text and image tables, both MoEs, four losses) and
   SASRec, one 1024 x 50 batch (every sequence full length, benchmarks/model_step_bench.py's
   batch): seconds per forward + backward + Adam step, eager and compiled (after the compiling
   call, whose time is reported apart).
2. `epoch`: SASRec and HM4SR (IDs + time: Beauty has no text or images) for one epoch of the
   prepared folder with the production reader, placement, loop and step (`fit_in_process`), at
   the widths compile uses (`data.length_widths` = 8, 16, 32, 50, eager alike), after a short
   untimed compiling epoch (`--warmup-steps`).
3. `agree`: the same batches through the eager and the compiled objective with dropout off and
   torch's own random draws in both (`fallback_random`): the largest relative difference of any
   loss term and of any gradient (by its norm). The stated tolerance is 1e-5 for the losses and
   1e-4 for the gradients (tests/device/test_compile.py asserts the same on toy sizes).

Prints a table and writes JSON. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from gpu_acceptance import run_epoch_row  # noqa: E402


def step_rows(args) -> list[dict]:
    from model_step_bench import make_batch, make_catalog

    from hm4sr_dist.config import ExperimentConfig
    from hm4sr_dist.feasibility import with_variant
    from hm4sr_dist.objective import build_objective
    from hm4sr_dist.train.acceleration import apply_compile
    from hm4sr_dist.train.loop import optimizer_step

    rows = []
    catalog = make_catalog(12101, 768, 200)
    batch = make_batch(args.batch, 50, 12101)
    for variant in ("hm4sr", "sasrec"):
        for compiled in (False, True):
            cfg = with_variant(ExperimentConfig(), variant)
            torch.manual_seed(0)
            objective = apply_compile(build_objective(cfg.model, cfg.loss, catalog), compiled)
            step = optimizer_step(objective, torch.optim.Adam(objective.parameters(), lr=1e-3))
            start = time.perf_counter()
            step(batch)
            first = time.perf_counter() - start
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                step(batch)
                times.append(time.perf_counter() - start)
            row = {"section": "step", "model": variant, "mode": "compiled" if compiled else "eager",
                   "first_s": first, "best_s": min(times), "mean_s": sum(times) / len(times),
                   "sequences_per_s": args.batch / min(times)}
            print(row, flush=True)
            rows.append(row)
    return rows


def agreement(args) -> dict:
    import torch._inductor.config as inductor

    from hm4sr_dist.data import ShardReader, load_catalog
    from hm4sr_dist.objective import build_objective
    from hm4sr_dist.train.acceleration import apply_compile, placement_for
    from gpu_acceptance import epoch_config

    inductor.fallback_random = True
    cfg, _ = epoch_config(args, "hm4sr", "fp32", True)
    cfg.model.hidden_dropout = cfg.model.attn_dropout = 0.0
    catalog = load_catalog(cfg.data.prepared_dir, mu=cfg.model.interval_scale)
    placement = placement_for(cfg, "cpu")
    reader = ShardReader(cfg.data.prepared_dir, "train", cfg.micro_batch_size, seed=3,
                         max_len=cfg.model.max_seq_len, prefetch_batches=0)
    batches = [placement(b) for b in itertools.islice(reader, args.agree_batches)]
    torch.manual_seed(0)
    eager = build_objective(cfg.model, cfg.loss, catalog)
    compiled = apply_compile(copy.deepcopy(eager))
    loss_diff = grad_diff = 0.0
    for batch in batches:
        out = []
        for objective in (eager, compiled):
            objective.zero_grad(set_to_none=True)
            torch.manual_seed(7)
            terms = objective(batch)
            terms.total.backward()
            grads = {n: p.grad for n, p in objective.named_parameters() if p.grad is not None}
            out.append((terms.scalars(), grads))
        (le, ge), (lc, gc) = out
        loss_diff = max([loss_diff] + [abs(lc[k] - le[k]) / max(abs(le[k]), 1e-12) for k in le])
        grad_diff = max([grad_diff] + [float((gc[k] - g).norm()) / max(float(g.norm()), 1e-12)
                                       for k, g in ge.items()])
    inductor.fallback_random = False
    row = {"section": "agree", "model": "hm4sr", "batches": len(batches),
           "widths": sorted({b.item_seq.shape[1] for b in batches}),
           "max_rel_loss_diff": loss_diff, "max_rel_grad_diff": grad_diff,
           "within_tolerance": loss_diff <= 1e-5 and grad_diff <= 1e-4}
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared-dir", type=Path, required=True)
    parser.add_argument("--sections", nargs="*", default=["agree", "step", "epoch"],
                        choices=["agree", "step", "epoch"])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=0, help="steps of the timed epoch (0 = all)")
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--agree-batches", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--note", default="")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/compile.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.cpu_smoke, args.widths, args.budget_s = False, [8, 16, 32, 50], 1e9
    rows = []
    if "agree" in args.sections:
        rows.append(agreement(args))
    if "step" in args.sections:
        rows += step_rows(args)
    if "epoch" in args.sections:
        for variant in ("sasrec", "hm4sr"):
            for compiled in (False, True):
                row = run_epoch_row(args, variant, "fp32", compiled, torch.device("cpu"))
                print({k: row[k] for k in ("model", "mode", "s_per_epoch", "sequences_per_s", "warmup_s",
                                           "loss", "valid", "data_wait")}, flush=True)
                rows.append(row)
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "note": args.note,
            "torch": torch.__version__, "threads": args.threads, "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "load_after": os.getloadavg()[0]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2, default=str))
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
