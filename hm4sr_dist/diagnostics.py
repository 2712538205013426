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
"""

from __future__ import annotations

import math

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
        if out.interactive_gates is not None:
            gates = out.interactive_gates[real]                                 # (n, M, k1)
            self._add("interactive_gates", gates.sum(0))
            self._add("interactive_entropy", _entropy(gates).sum(0))
            self._add("interactive_count", torch.tensor(float(gates.shape[0])))
        if out.temporal_gates is not None:
            gates = out.temporal_gates[real]                                    # (n, k2)
            which = interval_range_index(intervals(time_seq, out.real.long())[real])
            per_range = torch.zeros(len(INTERVAL_RANGES), gates.shape[1], dtype=torch.float64,
                                    device=gates.device)
            per_range.index_add_(0, which, gates.double())
            self._add("temporal_gates", per_range)
            self._add("temporal_range_count", torch.bincount(which, minlength=len(INTERVAL_RANGES)))
            self._add("temporal_entropy", _entropy(gates).sum())
            self._add("temporal_count", torch.tensor(float(gates.shape[0])))
            if temporal_weight is not None:
                mult = gates.double() @ temporal_weight.detach().double()      # (n, M*d)
                self._add("mult_sum", mult.sum(0))
                self._add("mult_sq", (mult * mult).sum(0))
                self._add("mult_abs", mult.abs().sum(0))

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
