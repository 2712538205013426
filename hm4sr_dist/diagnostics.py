"""MoE diagnostics: does each mixture of experts do anything? (numbers for TensorBoard and results.json)

From forward passes (`MoEStats.add`, summable across batches and ranks):
- `moe/interactive_<m>/entropy`: mean entropy of the Interactive-MoE gate g^m (eq. 9) over real
  positions, divided by log(k1): 1 = uniform routing, 0 = one expert.
- `routing/interactive_<m>/expert<i>`: mean gate weight of expert i for target modality m.
- `moe/temporal/entropy`: the same for the Temporal-MoE gate g' (eq. 14), divided by log(k2).
- `routing/temporal_<range>/expert<i>`: mean g'_i over positions whose interval before the item
  falls in that range (the paper's case study, Fig. 6).
- `moe/temporal/modulation`: how much the element-wise multiplier sum_i g'_i W_i of eq. 16 varies
  with time: per dimension the std over real positions divided by the mean |multiplier|, averaged
  over dimensions. ~0 means the Temporal MoE scales every position alike (time has no effect).
From parameters (`moe_parameters`):
- `moe/alpha_<m>`: alpha_m of eq. 8; `moe/temporal/expert_spread`: std over the k2 experts of W_i,
  averaged over dimensions; `moe/temporal/expert_deviation`: mean |W_i - 1|.
The heatmap of the `routing/*` numbers (`routing_figure`) is drawn once, here, for both TensorBoard
(per epoch, hm4sr_dist/train/monitor.py) and a study's `routing_<setting>.png`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from hm4sr_dist.model.time import intervals

# Interval ranges for the Temporal-MoE routing view (upper bounds in seconds, inclusive).
INTERVAL_RANGES = (("same_time", 0), ("under_1h", 3600), ("under_1d", 86400), ("under_1w", 7 * 86400),
                   ("under_30d", 30 * 86400), ("over_30d", None))


def _entropy(gates: Tensor) -> Tensor:
    """Per-row entropy of the last dimension (natural log)."""
    return -(gates * gates.clamp_min(1e-12).log()).sum(-1)


def interval_range_index(gaps: Tensor) -> Tensor:
    """The INTERVAL_RANGES index of each interval (seconds)."""
    bounds = torch.tensor([u for _, u in INTERVAL_RANGES if u is not None], device=gaps.device)
    return torch.bucketize(gaps, bounds, right=False)


class MoEStats:
    """Summable gate statistics over real positions (float64 sums; `sums` may be all-reduced)."""

    def __init__(self, modalities: list[str]):
        self.modalities = list(modalities)
        self.sums: dict[str, Tensor] = {}

    def _add(self, name: str, value: Tensor) -> None:
        value = value.detach().double()
        self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()

    def add(self, out, time_seq: Tensor, temporal_weight: Tensor | None = None,
            rows: Tensor | None = None) -> None:
        """`out` an HM4SROutput; `temporal_weight` (k2, M*d) the experts W_i of eq. 16; `rows` (B,)
        bool keeps only those rows (evaluation batches pad with masked copies)."""
        real = out.real if rows is None else out.real & rows.bool().unsqueeze(1)
        # Weighted by the (B, L) real-position mask rather than gathered by it: no data-dependent
        # shapes, so adding a batch reads nothing back from the device.
        keep = real.double()
        if out.interactive_gates is not None:
            gates = out.interactive_gates.detach().double()                     # (B, L, M, k1)
            weights = keep[..., None, None]
            self._add("interactive_gates", (gates * weights).sum((0, 1)))
            self._add("interactive_entropy", (_entropy(gates) * keep[..., None]).sum((0, 1)))
            self._add("interactive_count", keep.sum())
        if out.temporal_gates is not None:
            gates = out.temporal_gates.detach().double()                        # (B, L, k2)
            k2 = gates.shape[-1]
            which = interval_range_index(intervals(time_seq, out.real.long()))  # (B, L)
            one_hot = torch.nn.functional.one_hot(which, len(INTERVAL_RANGES)).double() * keep[..., None]
            self._add("temporal_gates", torch.einsum("blr,blk->rk", one_hot, gates))
            self._add("temporal_range_count", one_hot.sum((0, 1)))
            self._add("temporal_entropy", (_entropy(gates) * keep).sum())
            self._add("temporal_count", keep.sum())
            if temporal_weight is not None:
                mult = gates.reshape(-1, k2) @ temporal_weight.detach().double()   # (B*L, M*d)
                w = keep.reshape(-1, 1)
                self._add("mult_sum", (mult * w).sum(0))
                self._add("mult_sq", (mult * mult * w).sum(0))
                self._add("mult_abs", (mult.abs() * w).sum(0))

    def all_reduce(self) -> None:
        """Sum the statistics over ranks (every rank holds the same keys)."""
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            for name in sorted(self.sums):
                dist.all_reduce(self.sums[name])

    def result(self) -> dict[str, float]:
        s, stats = self.sums, {}
        if "interactive_count" in s and float(s["interactive_count"]) > 0:
            n = float(s["interactive_count"])
            k = s["interactive_gates"].shape[-1]
            for i, mod in enumerate(self.modalities):
                stats[f"moe/interactive_{mod}/entropy"] = float(s["interactive_entropy"][i]) / n / math.log(k)
                for e, w in enumerate((s["interactive_gates"][i] / n).tolist()):
                    stats[f"routing/interactive_{mod}/expert{e}"] = w
        if "temporal_count" in s and float(s["temporal_count"]) > 0:
            n = float(s["temporal_count"])
            k = s["temporal_gates"].shape[-1]
            stats["moe/temporal/entropy"] = float(s["temporal_entropy"]) / n / math.log(k) if k > 1 else 0.0
            for r, (name, _) in enumerate(INTERVAL_RANGES):
                count = float(s["temporal_range_count"][r])
                if count > 0:
                    for e, w in enumerate((s["temporal_gates"][r] / count).tolist()):
                        stats[f"routing/temporal_{name}/expert{e}"] = w
            if "mult_sum" in s:
                mean = s["mult_sum"] / n
                std = (s["mult_sq"] / n - mean * mean).clamp_min(0).sqrt()
                stats["moe/temporal/modulation"] = float(std.mean() / (s["mult_abs"] / n).mean().clamp_min(1e-12))
        return stats


def moe_parameters(model) -> dict[str, float]:
    """Parameter-level diagnostics of an HM4SR model."""
    stats = {}
    if model.interactive_moe is not None:
        for mod, a in zip(model.modalities, model.interactive_moe.alpha.detach().float().tolist()):
            stats[f"moe/alpha_{mod}"] = a
    if model.temporal_moe is not None:
        w = model.temporal_moe.expert_weight.detach().double()                 # (k2, M*d)
        stats["moe/temporal/expert_spread"] = float(w.std(0, unbiased=False).mean())
        stats["moe/temporal/expert_deviation"] = float((w - 1).abs().mean())
    return stats


def batch_diagnostics(model, out, time_seq: Tensor) -> dict[str, float]:
    """Gate and parameter diagnostics of one forward pass (the per-step TensorBoard view)."""
    stats = MoEStats(model.modalities)
    weight = model.temporal_moe.expert_weight if model.temporal_moe is not None else None
    stats.add(out, time_seq, weight)
    return stats.result() | moe_parameters(model)


# ---------------------------------------------------------------------------------------------
# The routing heatmap (matplotlib, Agg; no pyplot, so no global figure registry in a worker)
# ---------------------------------------------------------------------------------------------

ROUTING_PANEL_INCHES, ROUTING_DPI = (6, 4), 100     # one panel = 600 x 400 pixels


def _routing_matrix(diag: list[dict], prefix: str, rows: list[str]) -> np.ndarray | None:
    """Mean over the dicts of `<prefix><row>/expert<e>`: (rows, experts), NaN where no dict has it."""
    experts = sorted({int(k.rsplit("expert", 1)[1]) for d in diag for k in d
                      if k.startswith(prefix) and "/expert" in k})
    if not experts:
        return None
    mat = np.full((len(rows), len(experts)), np.nan)
    for i, row in enumerate(rows):
        for j, e in enumerate(experts):
            vals = [d[f"{prefix}{row}/expert{e}"] for d in diag if f"{prefix}{row}/expert{e}" in d]
            if vals:
                mat[i, j] = float(np.mean(vals))
    return mat


def routing_panels(diag: list[dict]) -> list[tuple[str, str, np.ndarray, list[str]]]:
    """(title, y label, matrix, row labels) of each MoE present in the `routing/*` keys of `diag`
    (several dicts, e.g. seeds, are averaged)."""
    ranges = [name for name, _ in INTERVAL_RANGES]
    modalities = sorted({k.split("/")[1][len("interactive_"):] for d in diag for k in d
                         if k.startswith("routing/interactive_")})
    panels = [("Temporal MoE: gate weight per interval range", "interval before the item",
               _routing_matrix(diag, "routing/temporal_", ranges), ranges),
              ("Interactive MoE: gate weight per modality", "target modality",
               _routing_matrix(diag, "routing/interactive_", modalities) if modalities else None, modalities)]
    return [p for p in panels if p[2] is not None]


def routing_figure(diag: dict | list[dict], title: str, colorbar_label: str = "mean gate weight"):
    """A matplotlib Figure (Agg canvas) with one heatmap per MoE (expert x interval range, expert x
    modality), each cell annotated; `ROUTING_PANEL_INCHES` x `ROUTING_DPI` pixels per panel. None
    when `diag` holds no routing numbers (SASRec, -TMoE with -IMoE)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = routing_panels([diag] if isinstance(diag, dict) else list(diag))
    if not panels:
        return None
    w, h = ROUTING_PANEL_INCHES
    fig = Figure(figsize=(w * len(panels), h), dpi=ROUTING_DPI)
    FigureCanvasAgg(fig)                              # attach the Agg canvas: draw/savefig need one
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (panel_title, ylabel, mat, row_labels) in zip(axes, panels):
        top = max(1e-9, float(np.nanmax(mat)))
        im = ax.imshow(mat, aspect="auto", cmap="viridis", vmin=0, vmax=top)
        ax.set_xticks(range(mat.shape[1]), [f"expert {j}" for j in range(mat.shape[1])], rotation=30)
        ax.set_yticks(range(len(row_labels)), row_labels)
        ax.set(title=panel_title, xlabel="expert", ylabel=ylabel)
        for i in range(mat.shape[0]):
            for j in range(mat.shape[1]):
                if not math.isnan(mat[i, j]):
                    ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", color="k", fontsize=8,
                            bbox={"facecolor": "white", "alpha": 0.6, "lw": 0, "pad": 1})
        fig.colorbar(im, ax=ax, label=colorbar_label)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def figure_rgb(fig) -> np.ndarray:
    """The figure drawn by Agg as an (H, W, 3) uint8 array (what TensorBoard's add_image takes)."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
