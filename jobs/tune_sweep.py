"""Sweep HM4SR's hyper-parameters with Ray Tune over the paper's grids (spec §3, Fig. 4).

    python jobs/tune_sweep.py --prepared-dir outputs/prepared/beauty --sweep fig4 --param l2
    python jobs/tune_sweep.py --prepared-dir DIR --sweep fig4                  # all five Fig. 4 panels
    python jobs/tune_sweep.py --prepared-dir DIR --sweep grid --param k1 --param k2   # 25-trial product
    python jobs/tune_sweep.py --prepared-dir DIR --sweep fig4 --param l2 --values 0.5,1.0 optim.epochs=20
    ray job submit --runtime-env cluster/runtime_env.yaml --working-dir . -- \\
        python jobs/tune_sweep.py --prepared-dir /shared/prepared/beauty --sweep fig4 --param k1 \\
        train.storage_path=s3://bucket/hm4sr train.num_workers=2 --max-concurrent 4

--param takes a paper name (l2, l3, tau, k1, k2, beta) or a dotted config key; repeat it for several.
Each trial is one Ray Train run named `<sweep>-<overrides>-<hash>` under train.storage_path:
re-running the same command resumes unfinished trials from their checkpoints and returns finished
ones at once. The table of trial overrides -> best_valid (validation NDCG@5) and test metrics is
written to <output>/sweep_results.json (default outputs/<sweep name>).
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from hm4sr_dist.config import load_config
from hm4sr_dist.data import read_manifest
from hm4sr_dist.train.monitor import say
from hm4sr_dist.tune.space import fig4_trials, grid_size, grid_space, parse_values, resolve_param
from jobs.common import fit_to_data


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepared-dir", required=True, help="prepared shards (folder with manifest.json)")
    p.add_argument("--config", default="configs/hm4sr_paper.yaml", help="base config of every trial")
    p.add_argument("--sweep", choices=("fig4", "grid"), default="fig4",
                   help="fig4: one hyper-parameter at a time; grid: the full product")
    p.add_argument("--param", action="append", default=[],
                   help="hyper-parameter to sweep (l2, l3, tau, k1, k2, beta or a dotted key); repeatable. "
                        "Default: the Fig. 4 panels (fig4) or all six (grid)")
    p.add_argument("--values", action="append", default=[],
                   help="values for the --param at the same position, e.g. 0.5,1.0 "
                        "(default: the paper's grid)")
    p.add_argument("--name", default="", help="sweep name (default <data set>-<sweep>-<params>)")
    p.add_argument("--max-concurrent", type=int, default=1,
                   help="trials running at once; each starts train.num_workers workers")
    p.add_argument("--trial-cpus", type=float, default=1.0,
                   help="CPUs reserved by each trial's driver function (Tune's default 1; it only drives "
                        "the Train controller, so a fraction such as 0.1 leaves more for the workers; > 0)")
    p.add_argument("--output", default="", help="folder for sweep_results.json (default outputs/<name>)")
    p.add_argument("--dry-run", action="store_true", help="print the trials and exit")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides of the base config")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if len(args.values) > len(args.param):
        raise SystemExit("error: every --values needs a --param before it")
    values = {resolve_param(p): parse_values(v) for p, v in zip(args.param, args.values)}
    if args.sweep == "fig4":
        trials, grid = fig4_trials(args.param or None, values), None
        n = len(trials)
    else:
        trials, grid = None, grid_space(args.param or None, values)
        n = grid_size(grid)
    prepared = Path(args.prepared_dir)
    if not (prepared / "manifest.json").exists() and not args.dry_run:
        raise SystemExit(f"error: {prepared} holds no prepared data set (no manifest.json)")
    manifest = read_manifest(prepared) if (prepared / "manifest.json").exists() else {}
    base = load_config(args.config, args.overrides)
    base.data.prepared_dir = str(prepared.resolve())
    dataset = manifest.get("name") or prepared.name
    short = "-".join(resolve_param(p).rsplit(".", 1)[-1] for p in args.param)
    name = args.name or f"{dataset}-{args.sweep}" + (f"-{short}" if short else "")
    base.name = name
    say(f"sweep {name}: {args.sweep}, {n} trials, at most {args.max_concurrent} at once, "
        f"{base.train.num_workers} worker(s) each")
    if args.dry_run:
        for t in trials or [grid]:
            say(f"  {t}")
        return {"sweep": name, "n_trials": n}
    if args.sweep == "grid" and n > 200:
        say(f"warning: the full grid has {n} trials; pick fewer --param to make it tractable")

    from hm4sr_dist.tune.sweep import run_sweep

    table = run_sweep(base, name, trials=trials, grid=grid, max_concurrent=args.max_concurrent,
                      trial_cpus=args.trial_cpus, adjust=functools.partial(fit_to_data, manifest=manifest),
                      output=args.output or None)
    for row in sorted(table["trials"], key=lambda r: -(r["best_valid"] or -1)):
        bv = row["best_valid"]
        say(f"  {row['overrides']}  best_valid {bv:.4f}" if isinstance(bv, float) else
            f"  {row['overrides']}  failed: {row['error']}")
    say(f"wrote {Path(args.output or Path('outputs') / name) / 'sweep_results.json'}")
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
