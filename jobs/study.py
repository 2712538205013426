"""Run a study of the paper in one command: settings x seeds on one prepared data set, as Ray Tune
trials that are Ray Train runs, then CSV/Markdown tables and PNG figures.

    python jobs/study.py --prepared-dir outputs/prepared/beauty --study table1 --seeds 2020 2021
    python jobs/study.py --prepared-dir DIR --study fig3 --seeds 2020 2021 2022      # ablations
    python jobs/study.py --prepared-dir DIR --study fig4 --param k1 --param l2 --seeds 2020
    python jobs/study.py --prepared-dir DIR --study fig4 --param l2 --values 0.5,1.0 optim.epochs=20
    python jobs/study.py --prepared-dir DIR --study grid --param k1 --param k2     # 25-point product
    python jobs/study.py --prepared-dir DIR --study fig5 --seeds 2020 2021 optim.epochs=50
    python jobs/study.py --prepared-dir DIR --study custom --variant-list hm4sr -TMoE \\
        --setting "loss.idcl_weight=0.5" --setting "nopcl:loss.pcl_weight=0" --seeds 1 2

Studies: table1 (HM4SR vs SASRec), fig3 (-IMoE -TMoE -CP -IDCL -PCL -Text -Image, those the data
supports), fig4 (one-at-a-time k1, k2, l2, l3, beta over the paper grids; --param picks panels),
fig5 (the five time embeddings and the default), grid (the full product of --param keys, the
paper's grids or --values; the old tune_sweep.py --sweep grid), custom (--variant-list and --setting). Every
`key.path=value` (anywhere on the command line) changes the base config of every trial.

Before Ray starts, every trial's config is built and checked (an unknown key or bad value is one
`error: ...` line, exit 2), what the data cannot support is left out with a note, settings that
resolve to the same config run once, and a study of more than --max-trials (24) trials needs --yes.
Re-running the same command resumes: the Tune experiment is restored and finished trials are not
re-run. With --asha, a weak trial is stopped between epochs and ends its Train run cleanly
(runs/<run>/stopped.json; listed as stopped by ASHA, left out of the tables' means).
Output: <output>/ (default outputs/studies/<dataset>-<study>): study_plan.json, trials.json,
runs/<setting>__seed<seed>/ (results.json + per_user_test.npz, for hm4sr-compare), study.csv,
study.md, and the PNG figures. `--report-only` rebuilds the tables and figures.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

from hm4sr_dist.config import ConfigError
from hm4sr_dist.feasibility import DataOffer
from hm4sr_dist.job_config import resolve_job_config
from hm4sr_dist.study.space import parse_values, resolve_param
from hm4sr_dist.study.plan import (DEFAULT_MAX_TRIALS, STUDIES, parse_setting, plan_mismatch, plan_study,
                                   write_plan)
from jobs.common import JobArgumentParser, exit_on_user_error

MIN_BOOTSTRAP = 100         # paired-bootstrap resamples below which a 95% CI means little

say = functools.partial(print, flush=True)


class _InOrder(argparse.Action):
    """--param / --values: appended to their list, and to `args.param_order` as (flag, value), so a
    --values binds to the --param just before it."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [*getattr(namespace, self.dest), values])
        namespace.param_order = [*namespace.param_order, (self.dest, values)]


def param_values(order: list[tuple[str, str]]) -> list[tuple[str, str | None]]:
    """(param, its --values or None) in command-line order; ConfigError for a --values with no
    --param before it or a second --values for one --param."""
    pairs: list[list] = []
    for flag, value in order:
        if flag == "param":
            pairs.append([value, None])
        elif not pairs or pairs[-1][1] is not None:
            raise ConfigError(f"every --values needs a --param just before it (--values {value} follows "
                              "none of its own)", key="--values")
        else:
            pairs[-1][1] = value
    return [(param, values) for param, values in pairs]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    # allow_abbrev=False: `--variant` (the training jobs' flag) must not silently become --variant-list
    p = JobArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                          allow_abbrev=False)
    p.add_argument("--prepared-dir", required=True, help="prepared shards (folder with manifest.json)")
    p.add_argument("--study", required=True, choices=STUDIES)
    p.add_argument("--seeds", nargs="+", type=int, default=[2020], help="optim.seed of each repeat")
    p.add_argument("--config", default="configs/hm4sr_paper.yaml", help="base config of every trial")
    p.add_argument("--variant-list", nargs="+", default=None, metavar="VARIANT",
                   help="variants (table1, fig3, custom), e.g. hm4sr sasrec; write -TMoE as is")
    p.add_argument("--param", action=_InOrder, default=[],
                   help="fig4: a panel (k1, k2, l2, l3, beta); grid: a key of the product (a paper name, "
                        "tau too, or a dotted key); repeatable")
    p.set_defaults(param_order=[])
    p.add_argument("--values", action=_InOrder, default=[],
                   help="fig4, grid: the values of the --param just before it, e.g. 0.5,1.0 "
                        "(default: the paper's grid)")
    p.add_argument("--setting", action="append", default=[], metavar="[LABEL:]KEY=VALUE ...",
                   help="custom: one setting of key=value overrides; repeatable")
    p.add_argument("--output", default="", help="study folder (default outputs/studies/<dataset>-<study>)")
    p.add_argument("--max-trials", type=int, default=DEFAULT_MAX_TRIALS, help="more trials need --yes")
    p.add_argument("--yes", action="store_true", help="run a study larger than --max-trials")
    p.add_argument("--max-concurrent", type=int, default=1, help="trials at once (each starts its workers)")
    p.add_argument("--trial-cpus", type=float, default=1.0, help="CPUs reserved by each trial's driver (> 0)")
    p.add_argument("--max-failures", type=int, default=1,
                   help="retries of a failed trial (Tune FailureConfig)")
    p.add_argument("--asha", action="store_true",
                   help="stop weak trials early: ASHA on the validation metric per epoch; a stopped trial "
                        "ends its Train run cleanly after the epoch under way (docs/studies.md)")
    p.add_argument("--asha-grace", type=int, default=1, help="--asha: epochs before a trial can be stopped")
    p.add_argument("--asha-reduction", type=float, default=2.0,
                   help="--asha: reduction factor (> 1; higher stops more trials at each rung)")
    p.add_argument("--bootstrap", type=int, default=2000,
                   help=f"paired-bootstrap resamples (>= {MIN_BOOTSTRAP})")
    p.add_argument("--dry-run", action="store_true", help="print the trials and exit")
    p.add_argument("--report-only", action="store_true", help="rebuild tables and figures, train nothing")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides of the base config")
    # argparse would read "-TMoE" after --variant-list as an option, and a key=value after --seeds
    # as a bad seed: take both lists out first (a list ends at the first word that cannot belong to it)
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, variants, seeds, in_list = [], None, None, None
    for a in argv:
        flag, _, value = a.partition("=")
        if flag == "--variant-list":             # `--variant-list=-TMoE` or `--variant-list -TMoE ...`
            in_list, variants = "variants", (variants or []) + ([value] if value else [])
        elif flag == "--seeds":
            in_list, seeds = "seeds", (seeds or []) + ([value] if value else [])
        elif in_list == "variants" and not a.startswith("--") and "=" not in a:
            variants.append(a)
        elif in_list == "seeds" and (not a.startswith("-") or a[1:].isdigit()) and "=" not in a:  # -1 too
            seeds.append(a)
        else:
            in_list = None
            rest.append(a)
    if seeds is not None:         # at the end: nothing after the list for argparse to take as a seed
        rest += ["--seeds", *seeds] if seeds else ["--seeds"]
    args = p.parse_intermixed_args(rest)     # overrides may sit between flags
    if variants is not None and not variants:
        p.error("--variant-list: expected at least one variant")
    args.variant_list = variants
    return args


def plan(argv: list[str] | None) -> dict:
    """Parse and check the command line and every trial's config; no Ray, no torch."""
    args = parse_args(argv)
    if args.max_concurrent < 1:
        raise ConfigError(key="--max-concurrent", expected="an int >= 1", got=args.max_concurrent)
    if not args.trial_cpus > 0:
        raise ConfigError(key="--trial-cpus", expected="a number > 0", got=args.trial_cpus)
    if args.max_failures < 0:
        raise ConfigError(key="--max-failures", expected="an int >= 0", got=args.max_failures)
    if args.asha_grace < 1:
        raise ConfigError(key="--asha-grace", expected="an int >= 1", got=args.asha_grace)
    if not args.asha_reduction > 1:
        raise ConfigError(key="--asha-reduction", expected="a number > 1", got=args.asha_reduction)
    if args.bootstrap < MIN_BOOTSTRAP:
        raise ConfigError(key="--bootstrap", expected=f"an int >= {MIN_BOOTSTRAP}", got=args.bootstrap,
                          why="fewer resamples give no usable 95% CI")
    if args.variant_list and args.study in ("fig4", "fig5"):
        raise ConfigError(f"{args.study} sweeps the default HM4SR; use --study custom for variants",
                          key="--variant-list")
    if args.param and args.study not in ("fig4", "grid"):
        raise ConfigError("only fig4 and grid take --param", key="--param")
    values = {resolve_param(p): parse_values(v)
              for p, v in param_values(args.param_order) if v is not None}
    if args.setting and args.study != "custom":
        raise ConfigError("only the custom study takes --setting", key="--setting")
    prepared = Path(args.prepared_dir)
    if not (prepared / "manifest.json").is_file():
        raise ConfigError(f"{prepared} holds no prepared data set (no manifest.json)", key="--prepared-dir")
    from hm4sr_dist.data.manifest import read_manifest
    manifest = read_manifest(prepared)
    offer = DataOffer.from_manifest(manifest)
    fitted = resolve_job_config(args.config, args.overrides, offer=offer, fit=True, prepared_dir=prepared)
    base, explicit, notes = fitted.config, fitted.explicit, fitted.notes
    dataset = manifest.get("dataset") or prepared.name
    custom = [parse_setting(s) for s in args.setting]
    study = plan_study(args.study, base, args.seeds, dataset=dataset,
                       fingerprint=manifest.get("fingerprint") or "", offer=offer, explicit=explicit,
                       variants=args.variant_list, params=args.param or None, custom=custom,
                       values=values)
    study.notes[:0] = notes
    metrics = sorted({t.config["eval"]["valid_metric"] for t in study.trials})
    if args.asha and len(metrics) > 1:
        raise ConfigError(f"ASHA compares trials on one validation metric, but the settings select on "
                          f"eval.valid_metric {' and '.join(metrics)}", key="--asha")
    n = len(study.trials)
    if n > args.max_trials and not (args.yes or args.dry_run or args.report_only):
        raise ConfigError(f"the study has {n} trials ({len(study.settings)} settings x "
                          f"{len(args.seeds)} seeds), more than {args.max_trials}; pass --yes to run it",
                          key="--yes")
    out = Path(args.output or Path("outputs") / "studies" / study.name)
    return {"args": args, "study": study, "out": out}


def main(argv: list[str] | None = None) -> dict:
    p = plan(argv)
    args, study, out = p["args"], p["study"], p["out"]
    for note in study.notes:
        say(f"note: {note}")
    say(f"study {study.name}: {len(study.settings)} settings x {len(args.seeds)} seeds = {len(study.trials)} "
        f"trials, baseline {study.baseline}, at most {args.max_concurrent} at once")
    if args.dry_run:
        for t in study.trials:
            say(f"  {t.setting:30s} seed {t.seed}  run {t.run}  identity {t.key}")
        return {"study": study.name, "n_trials": len(study.trials)}
    from hm4sr_dist.study.report import not_finished, report
    failed = 0
    if not args.report_only:
        from hm4sr_dist.study.runner import run_study
        write_plan(study, out)
        rows = run_study(study, out, max_concurrent=args.max_concurrent, trial_cpus=args.trial_cpus,
                         max_failures=args.max_failures, asha=args.asha, asha_grace=args.asha_grace,
                         asha_reduction=args.asha_reduction)
        for r in rows:
            if r["status"] != "finished":
                say(f"  {r['setting']}: {not_finished(r)}")
        failed = sum(r["status"] == "failed" for r in rows)
    elif not (out / "study_plan.json").is_file():
        raise ConfigError(f"{out} holds no study to report on (no study_plan.json)", key="--report-only")
    else:       # statuses from the run folders: trials.json is stale or absent after a killed driver
        from hm4sr_dist.study.runner import write_trial_statuses
        mismatch = plan_mismatch(study, out)
        if mismatch:
            raise ConfigError(f"this command's trials are not those of the study in {out} ({mismatch}); "
                              "give the seeds, settings and overrides it was run with", key="--report-only")
        old = json.loads((out / "trials.json").read_text()) if (out / "trials.json").is_file() else []
        rows = write_trial_statuses(study, out, {r["key"]: r["error"] for r in old if r.get("error")})
        say(f"statuses from the run folders: {sum(r['status'] == 'finished' for r in rows)}/{len(rows)} "
            "finished")
    made = report(out, n_boot=args.bootstrap)
    if not args.report_only or (out / "trials.json").is_file():
        from hm4sr_dist.study.runner import study_tracker
        parent = study_tracker(study, out)        # tables and figures beside the trials' runs
        for file in ("study.md", "study.csv", "trials.json", "study_plan.json", *made["figures"]):
            if (out / file).is_file():
                parent.log_artifact(out / file, artifact_path="study")
        parent.finish("FAILED" if failed else "FINISHED")
    say((out / "study.md").read_text())
    say(f"wrote {out / 'study.csv'}, {out / 'study.md'} and {len(made['figures'])} figures in {out}")
    if failed:
        say(f"error: {failed} trial(s) failed after --max-failures={args.max_failures} retries (see above "
            f"and {out / 'trials.json'}); the tables leave them out")
    return {"study": study.name, "out": str(out), "failed_trials": failed, **made}


def cli() -> None:
    result = exit_on_user_error(lambda: main(sys.argv[1:]))
    if result and result.get("failed_trials"):
        sys.exit(1)                 # tables and figures are written; a script still sees the failure


if __name__ == "__main__":
    cli()
