"""Figures of the outcome runs for docs/figures: validation curves and a trained model's routing.

    python benchmarks/outcome_figures.py --runs outputs/studies/beauty-outcomes-s2020/runs \
        --curves docs/figures/beauty_valid_ndcg5.png --routing hm4sr__seed2020 \
        --routing-out docs/figures/beauty_hm4sr_routing.png --recbole-reference
    python benchmarks/outcome_figures.py --runs outputs/studies/beauty-outcomes/runs \
        --seed-bands docs/figures/beauty_valid_ndcg5_seeds.png --recbole-reference

Each run folder holds the `results.json` a study writes (its `history` has one row per epoch, its
`diagnostics` the MoE routing over the test users, with the best validation epoch's weights).
`--recbole-log LOG` adds the validation curve of a RecBole 1.2.1 SASRec run of
`../shared/tools/recbole-reference` (the output of its `--valid-every-epoch`); `--recbole-reference`
adds the curve quoted in issue 9 (epochs 0-7).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from hm4sr_dist.run_folder import read_results

# RecBole 1.2.1 SASRec, Beauty, paper settings, seed 2025: validation NDCG@5 after epochs 0-7.
RECBOLE_SASREC_BEAUTY = [0.0066, 0.0129, 0.0157, 0.0206, 0.0234, 0.0257, 0.0261, 0.0278]


# "epoch 3 valid: NDCG@5=0.0206 NDCG@10=0.0281 MRR@5=0.0161 Hit@10=0.0447", printed by the
# reference tool after every epoch with --valid-every-epoch.
_RECBOLE_VALID = re.compile(r"^epoch (\d+) valid: (.*)$")


def read_recbole_curve(log: Path, metric: str = "valid/ndcg@5") -> list[float]:
    """Validation values per epoch (0, 1, ...) from a reference-tool log; `metric` in our spelling."""
    name = metric.split("/", 1)[-1].lower()
    curve: dict[int, float] = {}
    for lineno, line in enumerate(log.read_text().splitlines(), 1):
        match = _RECBOLE_VALID.match(line.strip())
        if not match:
            continue
        values = {k.lower(): v for k, _, v in (f.partition("=") for f in match.group(2).split())}
        if name not in values:
            raise SystemExit(f"error: {log}:{lineno}: no {name} in the validation line {line.strip()!r}")
        curve[int(match.group(1))] = float(values[name])
    if not curve:
        raise SystemExit(f"error: {log}: no 'epoch N valid: ...' lines (run the reference tool "
                         "with --valid-every-epoch)")
    missing = sorted(set(range(max(curve) + 1)) - set(curve))
    if missing:
        raise SystemExit(f"error: {log}: validation lines missing for epochs {missing}")
    return [curve[e] for e in range(max(curve) + 1)]


def load_runs(folder: Path) -> dict[str, dict]:
    runs = {}
    for path in sorted(folder.glob("*/results.json")):
        if not path.parent.name.startswith("."):     # .<run>.tmp: a run folder being written
            runs[path.parent.name] = read_results(path.parent, strict=False)
    if not runs:
        raise SystemExit(f"error: --runs: no */results.json under {folder}")
    return runs


def plot_curves(runs: dict[str, dict], out: Path, metric: str, recbole: tuple[str, list] | None) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    for name, result in runs.items():
        hist = result.get("history") or []
        epochs = [h["epoch"] for h in hist if metric in h]
        values = [h[metric] for h in hist if metric in h]
        line, = ax.plot(epochs, values, marker=".", label=f"{name} (best {result['best_valid']:.4f} "
                                                            f"@ {result['best_epoch']})")
        ax.axvline(result["best_epoch"], color=line.get_color(), alpha=0.25, linestyle=":")
    _finish(fig, ax, out, metric, recbole, "epoch",
            "Beauty (IDs + time): validation curves to early stopping (patience 10)")


def plot_seed_bands(runs: dict[str, dict], out: Path, metric: str, recbole: tuple[str, list] | None,
                    title: str) -> None:
    """One line per setting (run folders `<setting>__seed<seed>`): the mean over its seeds per epoch
    while every seed still trains, a band from the lowest to the highest seed, and each seed's best
    epoch as a dot."""
    import numpy as np
    from matplotlib.figure import Figure

    groups: dict[str, list[dict]] = {}
    for name, result in runs.items():
        groups.setdefault(name.split("__seed")[0], []).append(result)
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    for setting, results in groups.items():
        curves = [[h[metric] for h in (r.get("history") or []) if metric in h] for r in results]
        n = min(len(c) for c in curves)
        if n == 0:
            continue
        stack = np.array([c[:n] for c in curves])
        best = [r["best_valid"] for r in results]
        line, = ax.plot(range(n), stack.mean(0), label=f"{setting}: {len(results)} seed{'s' if len(results) > 1 else ''}, best "
                                                         f"{np.mean(best):.4f} ± {np.std(best, ddof=1) if len(best) > 1 else 0:.4f}")
        ax.fill_between(range(n), stack.min(0), stack.max(0), color=line.get_color(), alpha=0.2)
        ax.plot([r["best_epoch"] for r in results], best, "o", color=line.get_color(), markersize=4)
    _finish(fig, ax, out, metric, recbole,
            "epoch (mean over seeds until the first seed stops; dots: each seed's best)", title)


def _finish(fig, ax, out: Path, metric: str, recbole: tuple[str, list] | None, xlabel: str,
            title: str) -> None:
    """The RecBole reference line (optional: (label, values per epoch)), labels, legend, the PNG."""
    if recbole:
        label, values = recbole
        ax.plot(range(len(values)), values, "k--", marker="x", markersize=4, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    print(f"wrote {out}")


def plot_routing(result: dict, out: Path, title: str) -> None:
    from hm4sr_dist.diagnostics import routing_figure

    fig = routing_figure(result.get("diagnostics") or {}, title)
    if fig is None:
        raise SystemExit(f"error: --routing: {title} has no routing diagnostics")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=Path, required=True, help="folder of run folders with results.json")
    ap.add_argument("--curves", type=Path, help="PNG of the validation curves")
    ap.add_argument("--metric", default="valid/ndcg@5")
    ap.add_argument("--seed-bands", type=Path, help="PNG: per setting, the mean curve over seeds with a min-max band")
    ap.add_argument("--title", default="Beauty (IDs + time): validation NDCG@5, to early stopping")
    ap.add_argument("--recbole-reference", action="store_true",
                    help="add RecBole's SASRec curve as quoted in issue 9 (epochs 0-7)")
    ap.add_argument("--recbole-log", type=Path,
                    help="add the validation curve of a recbole-reference run (its printed output)")
    ap.add_argument("--routing", help="run folder name whose routing heatmap to draw")
    ap.add_argument("--routing-out", type=Path)
    args = ap.parse_args()
    runs = load_runs(args.runs)
    recbole = None
    if args.recbole_log:
        values = read_recbole_curve(args.recbole_log, args.metric)
        best = max(range(len(values)), key=values.__getitem__)
        recbole = (f"RecBole 1.2.1 SASRec (reference): best {values[best]:.4f} @ {best}", values)
    elif args.recbole_reference:
        recbole = ("RecBole 1.2.1 SASRec (reference, epochs 0-7)", RECBOLE_SASREC_BEAUTY)
    if args.curves:
        plot_curves(runs, args.curves, args.metric, recbole)
    if args.seed_bands:
        plot_seed_bands(runs, args.seed_bands, args.metric, recbole, args.title)
    if args.routing:
        if args.routing not in runs:
            raise SystemExit(f"error: --routing: {args.routing} not among {sorted(runs)}")
        plot_routing(runs[args.routing], args.routing_out or Path(f"{args.routing}_routing.png"),
                     f"{args.routing}: gate weights on the test users (best validation epoch's weights)")


if __name__ == "__main__":
    main()
