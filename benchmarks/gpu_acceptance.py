"""GPU acceptance: one command for a bare GPU box (torch with CUDA; no network, no Ray; DeepSpeed and
webdataset from a folder of wheels). Runs, within `--budget-s`:

1. `tests`   -- `pytest -m gpu tests/device`: the fake-CUDA tier for real, bf16 against fp32,
               staged copies, DeepSpeed ZeRO-1 and ZeRO-2 steps over NCCL;
2. `epochs`  -- Beauty (a prepared folder, `--prepared-dir`) SASRec and HM4SR (IDs + time) for one
               epoch each (or `--steps`), eager and compiled, fp32 and bf16, with the production
               reader, placement, epoch loop and step (`fit_in_process`, no Ray);
3. `step`    -- the work of the authors' GPU log: 1024 sequences padded to 50, text and image tables
               (768-d), as benchmarks/model_step_bench.py builds it: HM4SR and SASRec steps;
4. `catalog` -- the main loss (eq. 20) forward + backward at 10^6 and 10^7 items (`chunked`,
               `sampled`; `full` where it fits).

It prints one table (s/epoch, sequences/s, peak GPU memory, data-wait fraction, TFLOP/s and MFU
from the FLOPs counted per step, docs/scaling.md "GPU") and writes JSON (`--out`). A section that
would start after `--budget-s` is skipped and says so. On a GPU box:

    python benchmarks/gpu_acceptance.py --prepared-dir .gpu/beauty --out $OUT/acceptance.json

`--cpu-smoke` runs every section on the CPU at toy sizes (tests/device/test_gpu_acceptance.py
does, so the script cannot rot); its figures measure nothing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))                      # this checkout's hm4sr_dist, without installing it

import torch  # noqa: E402

GB = 2 ** 30
# Dense peak of one H100 SXM (NVIDIA's data sheet): bf16 tensor cores, and fp32 without TF32
# (PyTorch's default for matmuls). MFU = achieved FLOP/s over this.
PEAK_TFLOPS = {"bf16": 989.0, "fp32": 67.0}


class Budget:
    def __init__(self, seconds: float):
        self.start, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)


# -- measuring ---------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else None


def step_flops(objective, batch) -> int:
    """FLOPs of one training step's forward + backward (matmuls and attention: what
    `torch.utils.flop_counter` counts), measured on the eager objective."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        objective(batch).total.backward()
    objective.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def mfu(flops_per_s: float, precision: str, device: torch.device) -> float | None:
    return flops_per_s / (PEAK_TFLOPS[precision] * 1e12) if device.type == "cuda" else None


# -- 1. tests ----------------------------------------------------------------------------------------

def run_tests(args) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rs",
           "--timeout", "240", str(ROOT / "tests" / "device")]
    # compile in-process: inductor's pool of compile workers would outlive the session, and the
    # suite's guard fails a run that leaves a process behind
    env = os.environ | {"TORCHINDUCTOR_COMPILE_THREADS": "1",
                        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=max(120, args.budget_s / 2))          # the other sections need time too
    lines = (done.stdout + done.stderr).strip().splitlines()
    print("\n".join(lines[-25:]), flush=True)
    return {"section": "tests", "rc": done.returncode, "summary": lines[-1] if lines else ""}


# -- 2. epochs on a prepared data set ----------------------------------------------------------------

def epoch_config(args, variant: str, precision: str, compiled: bool):
    from hm4sr_dist.data.manifest import read_manifest
    from hm4sr_dist.feasibility import DataOffer
    from hm4sr_dist.job_config import resolve_job_config

    job = resolve_job_config(ROOT / "configs" / "hm4sr_paper.yaml",
                             ["train.num_workers=1", f"train.precision={precision}",
                              f"train.compile={'true' if compiled else 'false'}"], variant,
                             DataOffer.from_manifest(read_manifest(args.prepared_dir)), fit=True,
                             prepared_dir=args.prepared_dir)
    cfg, notes = job.config, job.notes
    cfg.data.length_widths = list(args.widths)        # the same widths eager and compiled: same work
    if args.cpu_smoke:
        cfg.model.hidden_size, cfg.model.inner_size, cfg.optim.batch_size = 16, 32, 32
        cfg.eval.batch_size = 64
    return cfg.validate(), notes


def run_epoch_row(args, variant: str, precision: str, compiled: bool, device: torch.device) -> dict:
    from hm4sr_dist.data import ShardReader, load_catalog
    from hm4sr_dist.objective import build_objective
    from hm4sr_dist.train.acceleration import apply_precision, placement_for
    from hm4sr_dist.train.loop import fit_in_process

    cfg, _ = epoch_config(args, variant, precision, compiled)
    catalog = load_catalog(cfg.data.prepared_dir, mu=cfg.model.interval_scale)
    placement = placement_for(cfg, device)
    make = lambda split, b, **kw: ShardReader(cfg.data.prepared_dir, split, b, seed=cfg.optim.seed,  # noqa: E731
                                              max_len=cfg.model.max_seq_len, placement=placement,
                                              prefetch_batches=cfg.data.prefetch_batches, **kw)
    train = make("train", cfg.micro_batch_size, bucket_pool_batches=cfg.data.bucket_pool_batches,
                 shuffle_buffer=cfg.data.shuffle_buffer)
    steps = min(len(train), args.steps) if args.steps else len(train)
    # compiled: a first, short epoch compiles the graphs (one per width it meets); the next is timed
    warmup = min(args.warmup_steps, steps) if compiled else 0
    epochs = 2 if warmup else 1

    def batches(epoch: int):
        train.set_epoch(epoch)
        return itertools.islice(train, warmup if epoch < epochs - 1 else steps)

    # FLOPs per step at each width, counted once on an eager copy (the counter cannot see compiled
    # kernels); every batch of the epoch has one of these widths
    torch.manual_seed(cfg.optim.seed)
    counted = apply_precision(build_objective(cfg.model, cfg.loss, catalog).to(device), precision)
    flops_at = {}
    for batch in itertools.islice(make("train", cfg.micro_batch_size, bucket_pool_batches=1), 50):
        batch = placement(batch)
        w = batch.item_seq.shape[1]
        if w not in flops_at:
            flops_at[w] = step_flops(counted, batch)
    del counted
    widths_seen = []

    def record(epoch: int):
        widths_seen.clear()                     # the timed (last) epoch's widths remain
        for batch in batches(epoch):
            widths_seen.append(batch.item_seq.shape[1])
            yield batch

    reset_peak(device)
    start = time.perf_counter()
    _, history = fit_in_process(cfg, catalog, record, make("valid", cfg.eval.batch_size), epochs=epochs,
                                log=lambda line: print("   ", line, flush=True), device=device)
    wall = time.perf_counter() - start
    train.close()
    stats = history[-1]
    flops = sum(flops_at.get(w, max(flops_at.values())) for w in widths_seen)
    rate = flops / stats["seconds"] if stats["seconds"] else 0.0
    return {"section": "epochs", "model": variant, "mode": "compiled" if compiled else "eager",
            "precision": precision, "steps": steps, "batch": cfg.micro_batch_size,
            "s_per_epoch": stats["seconds"], "wall_s": wall, "sequences_per_s": stats["sequences_per_s"],
            "peak_gb": peak_gb(device), "data_wait": stats["data_wait_fraction"],
            "tflops": rate / 1e12, "mfu": mfu(rate, precision, device),
            "valid": stats.get(f"valid/{cfg.eval.valid_metric}"), "loss": stats["total"],
            "warmup_steps": warmup, "warmup_s": history[0]["seconds"] if warmup else None,
            "widths": sorted(set(widths_seen))}


# -- 3. the authors' workload: 1024 x 50, text and image tables -------------------------------------

def run_step_row(args, variant: str, precision: str, compiled: bool, device: torch.device) -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from model_step_bench import make_batch, make_catalog

    from hm4sr_dist.config import ExperimentConfig
    from hm4sr_dist.feasibility import with_variant
    from hm4sr_dist.data.placement import BatchPlacement
    from hm4sr_dist.objective import build_objective
    from hm4sr_dist.train.acceleration import apply_compile, apply_precision
    from hm4sr_dist.train.loop import optimizer_step

    b, length, items = (64, 12, 500) if args.cpu_smoke else (args.step_batch, 50, 12101)
    cfg = with_variant(ExperimentConfig(), variant)
    if args.cpu_smoke:
        cfg.model.hidden_size, cfg.model.inner_size, cfg.model.max_seq_len = 16, 32, length
    catalog = make_catalog(items, 64 if args.cpu_smoke else 768, 200)
    torch.manual_seed(0)
    objective = build_objective(cfg.model, cfg.loss, catalog).to(device)
    apply_precision(objective, precision)
    batch = BatchPlacement(device)(make_batch(b, length, items))       # every row full length: no cut
    flops = step_flops(objective, batch)
    apply_compile(objective, compiled)
    step = optimizer_step(objective, torch.optim.Adam(objective.parameters(), lr=1e-3))
    start = time.perf_counter()
    step(batch)                                                 # warm-up (compiles)
    sync(device)
    warmup = time.perf_counter() - start
    reset_peak(device)
    repeats = 3 if args.cpu_smoke else args.repeats
    start = time.perf_counter()
    for _ in range(repeats):
        step(batch)
    sync(device)
    per_step = (time.perf_counter() - start) / repeats
    return {"section": "step", "model": variant, "mode": "compiled" if compiled else "eager",
            "precision": precision, "batch": b, "length": length, "warmup_s": warmup, "s_per_step": per_step,
            "sequences_per_s": b / per_step, "peak_gb": peak_gb(device), "tflops": flops / per_step / 1e12,
            "mfu": mfu(flops / per_step, precision, device), "flops_per_step": flops}


# -- 4. the main loss against catalogue size ----------------------------------------------------------

def run_catalog_row(args, setting: str, n: int, method: str, device: torch.device) -> dict:
    from hm4sr_dist.catalog_loss import MainLoss, chunked_cross_entropy
    from hm4sr_dist.config import ExperimentConfig, LossConfig
    from hm4sr_dist.losses import main_loss
    from hm4sr_dist.model import ItemCatalog
    from hm4sr_dist.model.items import ItemEmbedding

    b, d, text_width = (64, 16, 32) if args.cpu_smoke else (1024, 64, 384)
    g = torch.Generator().manual_seed(0)
    cfg = ExperimentConfig().model
    cfg.hidden_size = d
    if setting == "sasrec":
        cfg.modalities, catalog = ["id"], ItemCatalog(n_items=n)
    else:
        cfg.modalities = ["id", "text"]
        text = torch.randn(n + 1, text_width, generator=g, dtype=torch.float32).to(torch.float16)
        text[0] = 0
        catalog = ItemCatalog(n_items=n, text_features=text)
    emb = ItemEmbedding(cfg, catalog).to(device)
    seq = torch.randn(b, len(cfg.modalities) * d, device=device, requires_grad=True)
    target = torch.randint(1, n + 1, (b,), device=device)
    chunk = 16384 if not args.cpu_smoke else 256
    if method == "full":
        def loss_fn():
            scores = seq @ emb().T
            scores[:, 0] = float("-inf")
            return main_loss(scores, target)
    elif method == "chunked":
        def loss_fn():
            return chunked_cross_entropy(seq, emb(), target, chunk)
    else:
        sampled = MainLoss(LossConfig(main_loss="sampled", num_negatives=4096), n).to(device)

        def loss_fn():
            return sampled(seq, None, target, rows=emb.gather)
    times = []
    reset_peak(device)
    for _ in range(3):
        emb.zero_grad(set_to_none=True)
        seq.grad = None
        sync(device)
        start = time.perf_counter()
        loss_fn().backward()
        sync(device)
        times.append(time.perf_counter() - start)
    return {"section": "catalog", "model": setting, "items": n, "mode": method, "batch": b,
            "first_s": times[0], "s_per_step": min(times[1:]), "peak_gb": peak_gb(device)}


# -- the table ---------------------------------------------------------------------------------------

def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    out = [f"{'section':8} {'model':7} {'mode':9} {'prec':5} {'items':>9} {'s/epoch':>8} {'s/step':>8} "
           f"{'seq/s':>9} {'peak GB':>8} {'wait':>6} {'TFLOP/s':>8} {'MFU':>6}"]
    for r in rows:
        if "skipped" in r or "error" in r:
            out.append(f"{r['section']:8} {r.get('model', ''):7} {r.get('mode', ''):9} {r.get('precision', ''):5} "
                       f"{r.get('skipped') or 'ERROR ' + r['error']}")
            continue
        if r["section"] == "tests":
            out.append(f"{'tests':8} rc {r['rc']}: {r['summary']}")
            continue
        out.append(f"{r['section']:8} {r['model']:7} {r['mode']:9} {r.get('precision', '-'):5} "
                   f"{fmt(r.get('items'), ',d'):>9} {fmt(r.get('s_per_epoch'), '.2f'):>8} "
                   f"{fmt(r.get('s_per_step'), '.4f'):>8} {fmt(r.get('sequences_per_s'), ',.0f'):>9} "
                   f"{fmt(r.get('peak_gb'), '.2f'):>8} {fmt(r.get('data_wait'), '.3f'):>6} "
                   f"{fmt(r.get('tflops'), '.2f'):>8} {fmt(r.get('mfu'), '.3f'):>6}")
    return "\n".join(out)


def guarded(rows: list, budget: Budget, need_s: float, what: dict, fn) -> None:
    """Run `fn` unless the budget cannot hold `need_s` more seconds; record an error, never stop."""
    if budget.left() < need_s:
        rows.append(what | {"skipped": f"skipped: {budget.left():.0f} s of the budget left"})
        print(f"  skipped {what}: budget", flush=True)
        return
    print(f"  {what} ...", flush=True)
    try:
        rows.append(fn())
    except Exception as exc:                    # a failure is a result: report it, go on
        rows.append(what | {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"})
        print(f"    failed: {type(exc).__name__}: {exc}", flush=True)
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared-dir", type=Path, help="a prepared data set (Beauty for the table)")
    parser.add_argument("--sections", nargs="*", default=["tests", "epochs", "step", "catalog"],
                        choices=["tests", "epochs", "step", "catalog"])
    parser.add_argument("--steps", type=int, default=0, help="steps per epoch (0 = the whole epoch)")
    parser.add_argument("--warmup-steps", type=int, default=100,
                        help="steps of the untimed first epoch of a compiled run (its compilation)")
    parser.add_argument("--widths", type=int, nargs="*", default=[8, 16, 32, 50],
                        help="data.length_widths of the epochs, eager and compiled alike")
    parser.add_argument("--step-batch", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=10, help="timed steps of the `step` section")
    parser.add_argument("--items", type=float, nargs="*", default=[1e6, 1e7])
    parser.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget of the whole run")
    parser.add_argument("--compiled", nargs="*", default=None, choices=["fp32", "bf16"],
                        help="precisions also run compiled (each compile costs about a minute; default "
                             "bf16 on a GPU, fp32 with --cpu-smoke; none: `--compiled` alone)")
    parser.add_argument("--cpu-smoke", action="store_true", help="toy sizes on the CPU (a test; no figures)")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/gpu_acceptance.json"))
    args = parser.parse_args(argv)
    budget = Budget(args.budget_s)
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: use --cpu-smoke for the CPU check")
    if "epochs" in args.sections and args.prepared_dir is None:
        parser.error("the epochs section needs --prepared-dir")
    precisions = ["fp32"] if args.cpu_smoke else ["fp32", "bf16"]
    compiled = args.compiled if args.compiled is not None else (["fp32"] if args.cpu_smoke else ["bf16"])
    if args.cpu_smoke:
        args.widths = [w for w in args.widths if w < 12] + [12]
        args.items = [1e3, 1e4]
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
            "cpu_count": os.cpu_count(), "cpu_smoke": args.cpu_smoke, "peak_tflops": PEAK_TFLOPS,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    print(f"GPU acceptance on {meta['device']} (torch {torch.__version__}), budget {args.budget_s:.0f} s",
          flush=True)
    rows: list[dict] = []
    if "tests" in args.sections:
        guarded(rows, budget, 60, {"section": "tests"}, lambda: run_tests(args))
    # (section, its row function, seconds an eager row needs at least; a compiled one 90)
    for section, row_fn, eager_s in (("epochs", run_epoch_row, 30), ("step", run_step_row, 20)):
        if section not in args.sections:
            continue
        for variant in ("sasrec", "hm4sr"):
            for precision in precisions:
                for mode in ([False, True] if precision in compiled else [False]):
                    what = {"section": section, "model": variant, "precision": precision,
                            "mode": "compiled" if mode else "eager"}
                    guarded(rows, budget, 90 if mode else eager_s, what,
                            lambda f=row_fn, v=variant, p=precision, c=mode: f(args, v, p, c, device))
    if "catalog" in args.sections:
        for n in (int(x) for x in args.items):
            for setting in ("sasrec", "hm4sr"):
                for method in (["full"] if n <= 10 ** 6 else []) + ["chunked", "sampled"]:
                    what = {"section": "catalog", "model": setting, "items": n, "mode": method}
                    guarded(rows, budget, 20, what,
                            lambda s=setting, k=n, m=method: run_catalog_row(args, s, k, m, device))
    print(table(rows), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2, default=str))
    print(f"wrote {args.out} ({time.perf_counter() - budget.start:.0f} s)", flush=True)
    failed = [r for r in rows if "error" in r or r.get("rc", 0) != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
