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

Before Ray starts, every trial's config is built and checked (`hm4sr_dist.tune.space.check_sweep`):
an unknown key, a bad value, a swept request the model or the data cannot honour (l3 without the
Temporal MoE, CP weights without categories) or a swept key without effect is one `error: ...` line
and exit code 2. Without --param, the Fig. 4 panels the config or the data switch off are left out
with a note.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from hm4sr_dist.config import ConfigError, command_line_keys, load_tracked
from hm4sr_dist.feasibility import DataOffer, resolve
from hm4sr_dist.tune.space import (FIG4_PARAMS, PAPER_GRID, check_sweep, fig4_trials, grid_size, grid_space,
                                   parse_values, resolve_param)
from jobs.common import JobArgumentParser, exit_on_user_error

say = functools.partial(print, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = JobArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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


def _space(sweep: str, params: list[str] | None, values: dict, base, offer, explicit):
    """(trials, grid) of the sweep, checked; default panels the config cannot use are left out."""
    def build(keys):
        if sweep == "fig4":
            return fig4_trials(keys, values), None
        return None, grid_space(keys, values)

    notes = []
    if not params and not values:        # the default panels: drop those switched off, with a note
        params = []
        for key in (FIG4_PARAMS if sweep == "fig4" else tuple(PAPER_GRID)):
            try:
                check_sweep(base, *build([key]), offer=offer, explicit=explicit)
                params.append(key)
            except ConfigError as exc:
                notes.append(f"{key} left out of the sweep: {exc}")
        if not params:
            raise ConfigError("no hyper-parameter of the default sweep takes effect in this config; "
                              "name one with --param", key="--param")
    trials, grid = build(params or None)
    check_sweep(base, trials, grid, offer=offer, explicit=explicit)
    return trials, grid, notes


def plan(argv: list[str] | None) -> dict:
    """Parse and check the whole command line and every trial's config; no Ray, no torch."""
    args = parse_args(argv)
    if len(args.values) > len(args.param):
        raise ConfigError("every --values needs a --param before it", key="--values")
    if args.max_concurrent < 1:
        raise ConfigError(key="--max-concurrent", expected="an int >= 1", got=args.max_concurrent)
    if not args.trial_cpus > 0:
        raise ConfigError(key="--trial-cpus", expected="a number > 0", got=args.trial_cpus)
    loaded, sources = load_tracked(args.config, args.overrides)
    explicit = command_line_keys(sources)
    params = [resolve_param(p) for p in args.param]
    values = {resolve_param(p): parse_values(v) for p, v in zip(args.param, args.values)}

    def fit(offer):     # the base every trial starts from, and the trials checked on it
        base, notes = resolve(loaded, offer, explicit)
        trials, grid, panel_notes = _space(args.sweep, params, values, base, offer, explicit)
        return base, trials, grid, notes + panel_notes

    base, trials, grid, notes = fit(None)           # all that can be checked before the data
    prepared = Path(args.prepared_dir)
    manifest_file = prepared / "manifest.json"
    if not manifest_file.is_file() and not args.dry_run:
        raise ConfigError(f"{prepared} holds no prepared data set (no manifest.json)", key="--prepared-dir")
    manifest, offer = {}, None
    if manifest_file.is_file():
        from hm4sr_dist.data.manifest import read_manifest
        manifest = read_manifest(prepared)
        offer = DataOffer.from_manifest(manifest)
        base, trials, grid, notes = fit(offer)
    base.data.prepared_dir = str(prepared.resolve())
    dataset = manifest.get("dataset") or prepared.name
    short = "-".join(p.rsplit(".", 1)[-1] for p in params)
    base.name = args.name or f"{dataset}-{args.sweep}" + (f"-{short}" if short else "")
    n = len(trials) if trials is not None else grid_size(grid)
    return {"args": args, "base": base, "explicit": explicit, "offer": offer, "trials": trials,
            "grid": grid, "n": n, "notes": notes}


def main(argv: list[str] | None = None) -> dict:
    p = plan(argv)
    args, base, name, n = p["args"], p["base"], p["base"].name, p["n"]
    for note in p["notes"]:
        say(f"note: {note}")
    say(f"sweep {name}: {args.sweep}, {n} trials, at most {args.max_concurrent} at once, "
        f"{base.train.num_workers} worker(s) each")
    if args.dry_run:
        for t in p["trials"] or [p["grid"]]:
            say(f"  {t}")
        return {"sweep": name, "n_trials": n}
    if args.sweep == "grid" and n > 200:
        say(f"warning: the full grid has {n} trials; pick fewer --param to make it tractable")

    from hm4sr_dist.tune.sweep import run_sweep

    table = run_sweep(base, name, trials=p["trials"], grid=p["grid"], max_concurrent=args.max_concurrent,
                      trial_cpus=args.trial_cpus, offer=p["offer"], explicit=p["explicit"],
                      output=args.output or None)
    for row in sorted(table["trials"], key=lambda r: -(r["best_valid"] or -1)):
        bv = row["best_valid"]
        say(f"  {row['overrides']}  best_valid {bv:.4f}" if isinstance(bv, float) else
            f"  {row['overrides']}  failed: {row['error']}")
    say(f"wrote {Path(args.output or Path('outputs') / name) / 'sweep_results.json'}")
    return table


if __name__ == "__main__":
    exit_on_user_error(lambda: main(sys.argv[1:]))
