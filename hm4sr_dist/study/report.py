"""A study's tables and figures, from its run folders (`<study dir>/runs/<setting>__seed<seed>/`).

Tables (`study.csv`, `study.md`): one row per setting: finished/planned runs, mean ± std over seeds
of the test metrics, relative change of the seed mean vs the baseline row and the paired-bootstrap
95% CI of the mean per-user difference (`hm4sr_dist.compare.compare`), the seed-level intervals
(Student t over paired seeds, hierarchical bootstrap from 3 seeds), best epoch and wall time;
failed, stopped (by ASHA: `seed 2: stopped by ASHA after 2/6 epochs`) or unfinished trials are
listed under the table, never silently dropped, and never enter its means.

Significance: a table is one family of comparisons, every non-baseline setting x metric in it.
The user-level CI's two-sided bootstrap p is Holm-adjusted over that family (`table_holm`), and
only a difference that excludes 0 after the adjustment (Holm p <= 0.05) is bold in `study.md` and
starred in `diffs.png`; the unadjusted CIs are printed as they are, never bold on their own.

Figures (matplotlib, Agg, PNG): `curves_<setting>.png` (loss terms and validation NDCG@5 per epoch,
one line per seed), `bars.png` (test metrics per setting with std error bars: Table 1 / Fig. 3 /
Fig. 5), `diffs.png` (each setting's change vs the baseline in %, with the paired-bootstrap 95% CI:
the evidence bar, meaningful with one seed too; * over a bar = excludes 0 after Holm), `fig4.png`
(one panel per swept hyper-parameter), `routing_<setting>.png` (Temporal-MoE gate weight per expert
and interval range, Interactive-MoE gate weight per expert and modality).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from hm4sr_dist.compare import HOLM_ALPHA, CompareError, compare, load_run, metric_label
from hm4sr_dist.stats import UNIT_USERS, holm
from hm4sr_dist.study.plan import slug

METRICS = ("ndcg@5", "ndcg@10", "mrr@10")


def _mean_std(values: list[float]) -> tuple[float, float]:
    v = [x for x in values if isinstance(x, (int, float)) and math.isfinite(x)]
    if not v:
        return math.nan, math.nan
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else math.nan


def _fmt(m: float, s: float, digits: int = 4) -> str:
    if math.isnan(m):
        return "n/a"
    return f"{m:.{digits}f}" if math.isnan(s) else f"{m:.{digits}f} ± {s:.{digits}f}"


def load_study(study_dir: Path) -> tuple[dict, list[dict], dict]:
    plan = json.loads((study_dir / "study_plan.json").read_text())
    status = json.loads((study_dir / "trials.json").read_text())
    runs = {}
    for row in status:
        if row["status"] == "finished":
            runs[row["run"]] = load_run(study_dir / "runs" / row["run"])
    return plan, status, runs


def not_finished(row: dict) -> str:
    """`seed 2: stopped by ASHA after 2/6 epochs`, `seed 1: failed (RuntimeError(...))`."""
    if row["status"] == "stopped":
        by = str(row.get("stopped_by") or "a stop request")
        by = by.upper() if by == "asha" else by
        return f"seed {row['seed']}: stopped by {by} after {row.get('epochs_run')}/{row.get('epochs')} epochs"
    return f"seed {row['seed']}: {row['status']}" + (f" ({row['error']})" if row.get("error") else "")


def tabulate(study_dir: Path, n_boot: int = 2000) -> list[dict]:
    """Write study.csv and study.md; return the rows."""
    plan, status, runs = load_study(study_dir)
    labels = [s["label"] for s in plan["settings"]]
    done = [lab for lab in labels if any(r["setting"] == lab and r["status"] == "finished" for r in status)]
    notes = list(plan["notes"])
    comparison = None
    if done:
        baseline = plan["baseline"] if plan["baseline"] in done else done[0]
        if baseline != plan["baseline"]:
            notes.append(f"baseline {plan['baseline']} has no finished run: compared against {baseline}")
        ordered = [runs[r["run"]] for lab in done for r in status if r["setting"] == lab and r["run"] in runs]
        try:
            globs = [(lab, f"{slug(lab)}__seed*") for lab in done]
            comparison = compare(ordered, metrics=list(METRICS), labels=globs, baseline=baseline,
                                 n_boot=n_boot)
        except CompareError as exc:
            notes.append(f"no paired comparison: {exc}")
    notes += code_versions_note(status, runs)
    rows = []
    for lab in labels:
        mine = [r for r in status if r["setting"] == lab]
        fin = [r for r in mine if r["status"] == "finished"]
        summary = next((s for s in comparison.settings if s.name == lab), None) if comparison else None
        diff = comparison.comparison_for(lab) if comparison else None
        row = {"setting": lab, "baseline": bool(comparison) and lab == comparison.baseline,
               "runs": f"{len(fin)}/{len(mine)}", "seeds": " ".join(str(r["seed"]) for r in fin),
               "test_users": summary.n_users if summary else 0,
               "failed": "; ".join(not_finished(r) for r in mine if r["status"] != "finished")}
        for m in METRICS:
            ms = summary.metrics[m] if summary else None
            d = diff.metrics[m] if diff else None
            row[f"{m}_mean"] = ms.mean if ms else math.nan
            row[f"{m}_std"] = ms.std if ms else math.nan
            row[f"{m}_rel_change"] = d.rel_change if d else math.nan
            row[f"{m}_diff"] = d.diff if d else math.nan
            row[f"{m}_ci_low"] = d.ci_low if d else math.nan
            row[f"{m}_ci_high"] = d.ci_high if d else math.nan
            row[f"{m}_seeds_ahead"] = d.seeds_ahead if d else ""
            row |= _seed_fields(m, d)
        row["best_epoch_mean"], row["best_epoch_std"] = _mean_std([r["best_epoch"] for r in fin])
        row["wall_seconds_mean"], row["wall_seconds_std"] = _mean_std([r["wall_seconds"] for r in fin])
        row["train_seconds_mean"], _ = _mean_std([r["train_seconds"] for r in fin])
        rows.append(row)
    table_holm(rows)
    with open(study_dir / "study.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([{k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
                     for r in rows])
    (study_dir / "study.md").write_text(markdown(plan, rows, comparison, notes))
    return rows


def _seed_fields(m: str, d) -> dict:
    """A row's interval units, two-sided p and seed-level intervals of metric m (`compare`'s
    MetricDifference d, None for the baseline or an unfinished setting: nan / '')."""
    row = {f"{m}_interval_unit": d.interval_unit if d else "",
           f"{m}_p_two_sided": d.p_two_sided if d else math.nan}
    for key in ("seed_t", "seed_hier"):
        iv = getattr(d, key) if d else None
        row |= {f"{m}_{key}_unit": iv.unit if iv else "", f"{m}_{key}_low": iv.low if iv else math.nan,
                f"{m}_{key}_high": iv.high if iv else math.nan,
                f"{m}_{key}_p": iv.p_value if iv else math.nan,
                f"{m}_{key}_note": getattr(d, f"{key}_note") if d else ""}
    return row


def table_holm(rows: list[dict], metrics=METRICS, alpha: float = HOLM_ALPHA) -> int:
    """Holm-adjust the user-level p of every non-baseline row x metric of one table (its family).

    Sets `{m}_holm_p` (nan outside the family: the baseline, settings without a comparison) and
    `{m}_holm_excludes_0` (Holm p <= alpha) on every row; returns the family size. See `stats.holm`.
    """
    members = [(r, m) for r in rows for m in metrics
               if not r["baseline"] and math.isfinite(r.get(f"{m}_p_two_sided", math.nan))]
    for r in rows:
        for m in metrics:
            r[f"{m}_holm_p"], r[f"{m}_holm_excludes_0"] = math.nan, False
    for (r, m), p in zip(members, holm([r[f"{m}_p_two_sided"] for r, m in members])):
        r[f"{m}_holm_p"], r[f"{m}_holm_excludes_0"] = p, bool(p <= alpha)
    return len(members)


def holm_note(rows: list[dict], metrics=METRICS, alpha: float = HOLM_ALPHA) -> str:
    """The Markdown paragraph under the table: the family, the adjustment and what survived it."""
    n = sum(math.isfinite(r[f"{m}_holm_p"]) for r in rows for m in metrics)
    settings = sum(any(math.isfinite(r[f"{m}_holm_p"]) for m in metrics) for r in rows)
    hits = [f"{r['setting']} {metric_label(m)} (Holm p={r[f'{m}_holm_p']:.3f})"
            for r in rows for m in metrics if r[f"{m}_holm_excludes_0"]]
    names = ", ".join(metric_label(m) for m in metrics)
    return (f"**Significance.** One family: every non-baseline setting x metric of this table ({settings} "
            f"settings x {len(metrics)} metrics: {names}; {n} comparisons). Each comparison's two-sided "
            f"bootstrap p of "
            f"its user-level CI (interval unit: {UNIT_USERS}), min(1, 2 min(P(diff <= 0), P(diff >= 0))), is "
            f"adjusted by the Holm-Bonferroni step-down method over the {n}; bold = excludes 0 after Holm "
            f"(Holm p <= {alpha:g}). "
            f"The CIs are printed unadjusted and are not bold on their own; the seed-level intervals are "
            f"unadjusted too. Holm p of every metric: study.csv (`<metric>_holm_p`). Excluding 0 after Holm: "
            + ("; ".join(hits) if hits else "none") + ".")


def code_versions_note(status: list[dict], runs: dict) -> list[str]:
    """One note when the finished runs were trained by more than one code version (a re-run study
    reuses finished runs by config, whatever code trained them), naming which runs each version
    trained; none when all agree. Versions are told apart by source fingerprint (`code_version`):
    commits that changed no computing file are one version."""
    by_version: dict[str | None, list[str]] = {}
    commits: dict[str | None, set[str]] = {}
    for row in status:
        run = runs.get(row["run"])
        if run is None:
            continue
        versions = [*run.results.get("code_history", []), run.results.get("code")]
        for code in versions:
            commits.setdefault((code or {}).get("fingerprint"), set()).update(
                [code["git"]] if (code or {}).get("git") else [])
        for fp in dict.fromkeys((code or {}).get("fingerprint") for code in versions):
            by_version.setdefault(fp, []).append(f"{row['setting']} seed {row['seed']}")
    if len(by_version) < 2:
        return []

    def label(fp):
        if fp is None:
            return "an unrecorded version"
        return fp + (f" (git {', '.join(sorted(commits[fp]))})" if commits[fp] else "")

    parts = "; ".join(f"{label(fp)}: {', '.join(names)}" for fp, names in by_version.items())
    return [f"runs trained by {len(by_version)} code versions (a resumed run may list two): {parts}"]


def markdown(plan: dict, rows: list[dict], comparison, notes: list[str]) -> str:
    m0 = METRICS[0]
    heads = (["setting", "runs"] + [f"{metric_label(m)} (mean ± std)" for m in METRICS] +
             [f"Δ{metric_label(m0)} vs baseline", "diff [95% CI], users", "seed-level 95% CI", "best epoch",
              "train min"])
    lines = ["| " + " | ".join(heads) + " |", "|" + "|".join("---" for _ in heads) + "|"]
    for r in rows:
        if r["baseline"]:
            rel, ci, seed_ci = "baseline", "", ""
        elif math.isnan(r[f"{m0}_diff"]):
            rel, ci, seed_ci = "n/a", "", ""
        else:
            rel = f"{100 * r[f'{m0}_rel_change']:+.2f}%" if math.isfinite(r[f"{m0}_rel_change"]) else "n/a"
            ci = f"{r[f'{m0}_diff']:+.4f} [{r[f'{m0}_ci_low']:+.4f}, {r[f'{m0}_ci_high']:+.4f}]"
            ci = f"**{ci}**" if r[f"{m0}_holm_excludes_0"] else ci
            ci += f", Holm p={r[f'{m0}_holm_p']:.3f}" if math.isfinite(r[f"{m0}_holm_p"]) else ""
            ci += f", ahead in {r[f'{m0}_seeds_ahead']} seeds" if r[f"{m0}_seeds_ahead"] else ""
            seed_ci = _seed_cell(r, m0)
        cells = [r["setting"], r["runs"]] + [_fmt(r[f"{m}_mean"], r[f"{m}_std"]) for m in METRICS]
        cells += [rel, ci, seed_ci, _fmt(r["best_epoch_mean"], r["best_epoch_std"], 1),
                  _fmt(r["train_seconds_mean"] / 60, math.nan, 1)]
        lines.append("| " + " | ".join(cells) + " |")
    n_users = comparison.settings[0].n_users if comparison else 0
    out = [f"# Study {plan['name']} ({plan['study']})", "",
           f"Test metrics over seeds per setting; Δ = relative change of the seed mean vs the baseline; "
           f"diff = mean per-user difference in {metric_label(m0)} with its paired-bootstrap 95% CI over "
           f"{n_users} test users (B={comparison.n_boot if comparison else 0}; seed-to-seed variance does "
           f"not enter it), bold only where it excludes 0 after Holm (see Significance); seed-level = over "
           f"the seeds both ran, the per-seed difference of the two runs' test means: t = mean ± "
           f"t(0.975, n-1)·sd/√n (>= 2 seeds), hier. = hierarchical bootstrap, seeds then users "
           f"(>= 3 seeds); ahead in "
           "k/n seeds = the setting's run beats the baseline's run of the same seed on k of the n seeds both ran; "
           "train min = mean over seeds of a run's training epochs, summed over its resumes (validation passes "
           "not included; wall_seconds in study.csv is the last start of each trial only). "
           "`runs` = finished / planned.", "", *lines, "", holm_note(rows), ""]
    failed = [r for r in rows if r["failed"]]
    if failed:
        out += ["**Not finished:**", ""] + [f"- {r['setting']}: {r['failed']}" for r in failed] + [""]
    if plan.get("aliases"):
        out += ["**Same setting, run once:**", ""]
        out += [f"- {a} = {b}" for a, b in plan["aliases"].items()] + [""]
    if notes:
        out += ["**Notes:**", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(out)


def _seed_cell(r: dict, m: str) -> str:
    """'t [lo, hi]; hier. [lo, hi]' of metric m, or why there is none ('1 seed: no seed-level interval')."""
    if math.isnan(r[f"{m}_seed_t_low"]):
        return r[f"{m}_seed_t_note"]
    cell = f"t [{r[f'{m}_seed_t_low']:+.4f}, {r[f'{m}_seed_t_high']:+.4f}]"
    if math.isnan(r[f"{m}_seed_hier_low"]):
        return f"{cell}; {r[f'{m}_seed_hier_note']}"
    return f"{cell}; hier. [{r[f'{m}_seed_hier_low']:+.4f}, {r[f'{m}_seed_hier_high']:+.4f}]"


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_curves(study_dir: Path, plan: dict, runs: dict, status: list[dict]) -> list[Path]:
    plt = _plt()
    out = []
    for s in plan["settings"]:
        mine = [(r["seed"], runs[r["run"]]) for r in status
                if r["setting"] == s["label"] and r["run"] in runs]
        if not mine:
            continue
        fig, (ax_loss, ax_valid) = plt.subplots(1, 2, figsize=(11, 4))
        for seed, run in mine:
            hist = run.results.get("history") or []
            epochs = [h["epoch"] + 1 for h in hist]
            terms = sorted({k for h in hist for k in h if k.startswith("epoch/") and k.split("/", 1)[1] not in
                            ("seconds", "sequences_per_s", "data_wait_fraction")})
            for term in terms:
                ax_loss.plot(epochs, [h.get(term, np.nan) for h in hist], marker="o",
                             label=f"{term.split('/', 1)[1]} (seed {seed})")
            ax_valid.plot(epochs, [h.get("valid/ndcg@5", np.nan) for h in hist], marker="o",
                          label=f"seed {seed}")
        ax_loss.set(title=f"{s['label']}: training loss terms", xlabel="epoch",
                    ylabel="mean loss over the epoch")
        ax_valid.set(title=f"{s['label']}: validation NDCG@5", xlabel="epoch", ylabel="NDCG@5")
        from matplotlib.ticker import MaxNLocator
        for ax in (ax_loss, ax_valid):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        path = study_dir / f"curves_{slug(s['label'])}.png"
        _save(fig, path)
        out.append(path)
    return out


def _save(fig, path: Path) -> None:
    """Lay out, write the PNG and free the figure (pyplot keeps every open figure alive)."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _plt().close(fig)


def _grouped_bars(path: Path, settings: list[str], bars: dict[str, tuple], title: str, ylabel: str,
                  zero_line: bool = False, marks: dict[str, list[bool]] | None = None) -> Path:
    """One group of bars per setting, one bar per metric: `bars[metric] = (heights, yerr)`, yerr as
    matplotlib takes it (symmetric values, or [below, above]); `marks[metric][i]`: a * beyond the
    error bar of setting i."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(settings) * len(bars) / 2), 4.5))
    x = np.arange(len(settings))
    width = 0.8 / len(bars)
    for i, (m, (heights, yerr)) in enumerate(bars.items()):
        pos = x + (i - (len(bars) - 1) / 2) * width
        ax.bar(pos, heights, width, yerr=yerr, capsize=3, label=metric_label(m))
        below, above = np.broadcast_to(np.asarray(yerr, np.float64), (2, len(settings)))
        for j in np.flatnonzero((marks or {}).get(m, [False] * len(settings))):
            up = heights[j] >= 0
            ax.annotate("*", (pos[j], heights[j] + above[j] if up else heights[j] - below[j]),
                        ha="center", va="bottom" if up else "top", fontsize=14, fontweight="bold")
    if zero_line:
        ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x, settings, rotation=30, ha="right")
    ax.set(title=title, ylabel=ylabel, xlabel="setting")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)
    return path


def plot_bars(study_dir: Path, plan: dict, rows: list[dict]) -> Path:
    rows = [r for r in rows if not math.isnan(r[f"{METRICS[0]}_mean"])]
    bars = {m: ([r[f"{m}_mean"] for r in rows],
                [0 if math.isnan(r[f"{m}_std"]) else r[f"{m}_std"] for r in rows]) for m in METRICS}
    one_seed = all(math.isnan(r[f"{m}_std"]) for r in rows for m in METRICS)
    spread = "one seed per setting: no error bars" if one_seed else "mean ± std over seeds"
    return _grouped_bars(study_dir / "bars.png", [r["setting"] for r in rows], bars,
                         f"{plan['name']}: test metrics per setting\n({spread})", "test metric")


def relative_changes(rows: list[dict]) -> dict[str, dict[str, tuple[float, float, float]]]:
    """{setting: {metric: (change, CI low, CI high)}} in % of the baseline row's mean: the paired
    per-user difference and its bootstrap CI divided by the baseline mean. Empty without a baseline
    (or with a baseline mean of 0)."""
    baseline = next((r for r in rows if r["baseline"]), None)
    if baseline is None or any(not baseline[f"{m}_mean"] > 0 for m in METRICS):
        return {}
    return {r["setting"]: {m: tuple(100 * r[f"{m}_{k}"] / baseline[f"{m}_mean"]
                                    for k in ("diff", "ci_low", "ci_high")) for m in METRICS}
            for r in rows if not r["baseline"] and not math.isnan(r[f"{METRICS[0]}_diff"])}


def holm_marks(rows: list[dict], settings: list[str]) -> dict[str, list[bool]]:
    """{metric: [excludes 0 after Holm, per setting in `settings` order]}: the stars of diffs.png
    (the rows' `{m}_holm_excludes_0`, set by `table_holm` over the table's family)."""
    by_name = {r["setting"]: r for r in rows}
    return {m: [bool(by_name[s].get(f"{m}_holm_excludes_0", False)) for s in settings] for m in METRICS}


def plot_differences(study_dir: Path, plan: dict, rows: list[dict]) -> Path | None:
    """Per setting, the change of each test metric vs the baseline with its paired-bootstrap 95% CI
    (`relative_changes`), so "which part helps, and how sure" is one picture; a * marks a change that
    excludes 0 after Holm over the table's family (`holm_marks`)."""
    changes = relative_changes(rows)
    if not changes:
        return None
    baseline = next(r for r in rows if r["baseline"])
    bars = {}
    for m in METRICS:
        rel, lo, hi = (np.array(v) for v in zip(*(c[m] for c in changes.values())))
        bars[m] = (rel, np.clip([rel - lo, hi - rel], 0, None))   # a percentile CI may miss its mean
    name = baseline["setting"]
    family = sum(math.isfinite(r.get(f"{m}_holm_p", math.nan)) for r in rows for m in METRICS)
    return _grouped_bars(study_dir / "diffs.png", list(changes), bars,
                         f"{plan['name']}: test change vs {name}\n"
                         f"(paired-bootstrap 95% CI over {baseline['test_users']} users; "
                         f"* = excludes 0 after Holm over {family} comparisons)",
                         f"% of {name}'s mean", zero_line=True, marks=holm_marks(rows, list(changes)))


def sweep_points(plan: dict, rows: list[dict]) -> dict[str, list[tuple]]:
    """Fig. 4 panels: swept key -> [(value, row, is_baseline)] sorted by value, rows with a test mean
    only. The baseline sits at its own value of the key: a grid value equal to it is an alias of the
    baseline row, and a value outside the grid (`model.k1=3` on the command line) is added."""
    by_label = {r["setting"]: r for r in rows}
    base_row = by_label.get(plan["baseline"])
    base_values = plan.get("baseline_values", {})      # absent from plans written before it was stored
    m = METRICS[0]
    panels = {}
    for key in dict.fromkeys(s["axis"][0] for s in plan["settings"] if s["axis"]):
        points = [(s["axis"][1], by_label.get(s["label"])) for s in plan["settings"]
                  if s["axis"] and s["axis"][0] == key]
        for alias, owner in plan.get("aliases", {}).items():      # "k1=4": the same run as `owner`
            short, _, value = alias.partition("=")
            if short == _short(key):
                points.append((json.loads(value), by_label.get(owner)))
        if key in base_values and base_values[key] not in [v for v, _ in points]:
            points.append((base_values[key], base_row))
        panels[key] = sorted([(v, r, r is base_row) for v, r in points
                              if r and not math.isnan(r[f"{m}_mean"])], key=lambda p: p[0])
    return panels


def plot_sweeps(study_dir: Path, plan: dict, rows: list[dict]) -> Path | None:
    """Fig. 4: one panel per swept key, the baseline's point marked (`sweep_points`)."""
    plt = _plt()
    panels = sweep_points(plan, rows)
    if not panels:
        return None
    m = METRICS[0]
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6.5, 4.5 * len(panels)), 4), squeeze=False)
    for ax, (key, points) in zip(axes[0], panels.items()):
        if points:
            std = [0 if math.isnan(r[f"{m}_std"]) else r[f"{m}_std"] for _, r, _ in points]
            ax.errorbar([v for v, _, _ in points], [r[f"{m}_mean"] for _, r, _ in points], yerr=std,
                        marker="o", capsize=3, label=f"test {metric_label(m)}")
            base = [(v, r[f"{m}_mean"]) for v, r, is_base in points if is_base]
            if base:
                ax.plot(*zip(*base), linestyle="none", marker="*", markersize=14, color="tab:red",
                        label=f"{plan['baseline']} (baseline)")
        ax.set(title=f"{_short(key)} ({key})", xlabel=key, ylabel=f"test {metric_label(m)}")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{plan['name']}: one-at-a-time sweeps, test {metric_label(m)} (mean ± std over seeds)")
    path = study_dir / "fig4.png"
    _save(fig, path)
    return path


def _short(key: str) -> str:
    from hm4sr_dist.study.space import PAPER_KEYS
    return {v: k for k, v in PAPER_KEYS.items()}.get(key, key.rsplit(".", 1)[-1])


def plot_routing(study_dir: Path, plan: dict, runs: dict, status: list[dict]) -> list[Path]:
    """One heatmap per setting, averaged over its seeds (`diagnostics.routing_figure`, the figure
    TensorBoard shows per epoch)."""
    from hm4sr_dist.diagnostics import routing_figure

    out = []
    for s in plan["settings"]:
        diag = [runs[r["run"]].results.get("diagnostics", {}) for r in status
                if r["setting"] == s["label"] and r["run"] in runs]
        fig = routing_figure(diag, f"{s['label']}: MoE routing (blank: no test position in that range)",
                             colorbar_label="mean gate weight (test users, over seeds)")
        if fig is None:
            continue
        path = study_dir / f"routing_{slug(s['label'])}.png"
        _save(fig, path)
        out.append(path)
    return out


def report(study_dir: Path, n_boot: int = 2000) -> dict:
    """Tables and every figure; returns {"rows": ..., "figures": [...]}."""
    study_dir = Path(study_dir)
    rows = tabulate(study_dir, n_boot)
    plan, status, runs = load_study(study_dir)
    figures = plot_curves(study_dir, plan, runs, status)
    if any(not math.isnan(r[f"{METRICS[0]}_mean"]) for r in rows):
        figures.append(plot_bars(study_dir, plan, rows))
        differences = plot_differences(study_dir, plan, rows)
        if differences:
            figures.append(differences)
    sweep = plot_sweeps(study_dir, plan, rows) if plan["study"] == "fig4" else None
    if sweep:
        figures.append(sweep)
    figures += plot_routing(study_dir, plan, runs, status)
    return {"rows": rows, "figures": [str(p) for p in figures]}
