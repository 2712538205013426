"""Figures of the outcome runs for docs/figures: validation curves and a trained model's routing.

    python benchmarks/outcome_figures.py --runs outputs/studies/beauty-outcomes-s2020/runs \
        --curves docs/figures/beauty_valid_ndcg5.png --routing hm4sr__seed2020 \
        --routing-out docs/figures/beauty_hm4sr_routing.png --recbole-reference
    python benchmarks/outcome_figures.py --runs outputs/studies/beauty-outcomes/runs \
        --seed-bands docs/figures/beauty_valid_ndcg5_seeds.png --recbole-reference

Each run folder holds the `results.json` a study writes (its `history` has one row per epoch, its
`diagnostics` the last validation pass's MoE routing). `--recbole-reference` adds RecBole 1.2.1's
SASRec on Beauty after epochs 0-7, as quoted in issue 9 (its README's run; epochs 0-4 reproduced on
this machine on 2026-11-23, the rest not: its epochs take ~4 minutes and it cannot resume).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# RecBole 1.2.1 SASRec, Beauty, paper settings, seed 2025: validation NDCG@5 after epochs 0-7.
RECBOLE_SASREC_BEAUTY = [0.0066, 0.0129, 0.0157, 0.0206, 0.0234, 0.0257, 0.0261, 0.0278]


def load_runs(folder: Path) -> dict[str, dict]:
    runs = {}
    for path in sorted(folder.glob("*/results.json")):
        runs[path.parent.name] = json.loads(path.read_text())
    if not runs:
        raise SystemExit(f"error: --runs: no */results.json under {folder}")
    return runs


def plot_curves(runs: dict[str, dict], out: Path, metric: str, recbole: bool) -> None:
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


def plot_seed_bands(runs: dict[str, dict], out: Path, metric: str, recbole: bool, title: str) -> None:
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


def _finish(fig, ax, out: Path, metric: str, recbole: bool, xlabel: str, title: str) -> None:
    """The RecBole reference line (optional), labels, legend, and the PNG."""
    if recbole:
        ax.plot(range(len(RECBOLE_SASREC_BEAUTY)), RECBOLE_SASREC_BEAUTY, "k--", marker="x",
                label="RecBole 1.2.1 SASRec (reference, epochs 0-7)")
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
    ap.add_argument("--recbole-reference", action="store_true")
    ap.add_argument("--routing", help="run folder name whose routing heatmap to draw")
    ap.add_argument("--routing-out", type=Path)
    args = ap.parse_args()
    runs = load_runs(args.runs)
    if args.curves:
        plot_curves(runs, args.curves, args.metric, args.recbole_reference)
    if args.seed_bands:
        plot_seed_bands(runs, args.seed_bands, args.metric, args.recbole_reference, args.title)
    if args.routing:
        if args.routing not in runs:
            raise SystemExit(f"error: --routing: {args.routing} not among {sorted(runs)}")
        plot_routing(runs[args.routing], args.routing_out or Path(f"{args.routing}_routing.png"),
                     f"{args.routing}: gate weights, last validation pass")


if __name__ == "__main__":
    main()
