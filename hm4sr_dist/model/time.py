"""Time signals for the Temporal MoE gate and the PCL placeholder: eq. 11-13 and the Fig. 5 variants.

Timestamps arrive as int64 unix seconds and stay integer until intervals are taken; every
floating-point step runs in float64 and only the finished embedding is cast to float32, so a
one-second difference at 1.7e9 s survives (the authors' float32 timestamps moved in 64-128 s steps).

Variants (`ModelConfig.time_embedding`):
- ``interval_absolute`` (the paper's): [r_1; r_2], interval bucket embedding + learned cosines.
- ``interval`` / ``absolute``: r_1 or r_2 alone.
- ``day``: a learned embedding of the day index since the data's first timestamp.
- ``day_of_year``: a learned embedding of the calendar day of the year (UTC), 1..366.
- ``cos_interval``: cos(w * a + b) on the raw interval a (in `time_unit_seconds`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from hm4sr_dist.config import ModelConfig
from hm4sr_dist.model.catalog import ItemCatalog

SECONDS_PER_DAY = 86400


def intervals(time_seq: Tensor, real: Tensor) -> Tensor:
    """Eq. 11: a_1 = 0, a_i = t_i - t_{i-1} (int64 seconds); padded slots get 0.

    A negative step (unsorted input) is clamped to 0 rather than fed to log2.
    """
    # a roll, not a cat of [:, :1] and [:, :-1]: a width-(L-1) slice makes torch.export specialise
    # on L == 2, and the serving program (serving/user_program.py) is dynamic in L from 1
    first = torch.arange(time_seq.shape[1], device=time_seq.device) == 0
    previous = torch.where(first, time_seq, time_seq.roll(1, dims=1))
    return ((time_seq - previous).clamp_min(0)) * real


def interval_buckets(time_seq: Tensor, real: Tensor, mu: float, max_bucket: int) -> Tensor:
    """Eq. 12: pos_i = floor(mu * log2(a_i + 1)), clamped to [0, max_bucket]; padding -> 0."""
    a = intervals(time_seq, real).double()
    return torch.floor(mu * torch.log2(a + 1.0)).long().clamp_(0, max_bucket)


def days_since_epoch_to_day_of_year(days: Tensor) -> Tensor:
    """Calendar day of the year (1..366, UTC) for int64 days since 1970-01-01, as tensor maths.

    Uses the civil-from-days construction (era / year-of-era / day-of-year in a March-based year).
    """
    z = days + 719468
    era = torch.div(z, 146097, rounding_mode="floor")
    doe = z - era * 146097                                                     # [0, 146096]
    yoe = torch.div(doe - doe // 1460 + doe // 36524 - doe // 146096, 365, rounding_mode="floor")
    doy_march = doe - (365 * yoe + yoe // 4 - yoe // 100)                      # [0, 365], 0 = Mar 1
    mp = (5 * doy_march + 2) // 153                                            # month, 0 = March
    month = mp + torch.where(mp < 10, 3, -9)                                   # 1..12
    day = doy_march - (153 * mp + 2) // 5 + 1                                  # 1..31
    year = yoe + era * 400 + (month <= 2).long()
    leap = ((year % 4 == 0) & (year % 100 != 0)) | (year % 400 == 0)
    cumulative = torch.tensor([0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334],
                              device=days.device)
    return cumulative[month - 1] + day + ((month > 2) & leap).long()


class TimeEmbedding(nn.Module):
    """Maps (time_seq, real-position mask) to the gate input of eq. 14, (B, L, width)."""

    def __init__(self, cfg: ModelConfig, catalog: ItemCatalog):
        super().__init__()
        self.kind = cfg.time_embedding
        self.mu = cfg.interval_scale
        self.max_bucket = catalog.max_interval_bucket
        self.time_origin = int(catalog.time_origin)
        # eq. 13's t: in `time_unit_seconds`, or as a fraction of the data's span (then an Adam step
        # on l_j moves a phase by at most lr * freq^(-j/d) instead of lr * t_max * freq^(-j/d)).
        span = max(int(catalog.n_days), 1) * SECONDS_PER_DAY
        self.time_unit = float(span if cfg.absolute_time_span_unit else cfg.time_unit_seconds)
        self.interval_unit = float(cfg.time_unit_seconds)
        self.freq = float(cfg.time_freq)
        d = cfg.hidden_size
        if self.kind in ("interval_absolute", "interval"):
            self.interval_table = nn.Embedding(self.max_bucket + 1, d)          # M_t
        if self.kind in ("interval_absolute", "absolute", "cos_interval"):
            self.time_linear = nn.Linear(1, d)                                  # l_j, z_j (eq. 13)
        if self.kind == "day":
            self.n_days = max(int(catalog.n_days), 1)
            self.day_table = nn.Embedding(self.n_days + 1, d, padding_idx=0)    # 0 = padding
        if self.kind == "day_of_year":
            self.day_table = nn.Embedding(367, d, padding_idx=0)
        # freq^(-j/d), j = 0..d-1: one frequency per dimension, as in sinusoidal positions.
        scales = torch.pow(self.freq, -torch.arange(d, dtype=torch.float64) / d)
        self.register_buffer("freq_scales", scales, persistent=False)
        self.width = 2 * d if self.kind == "interval_absolute" else d

    def interval_embedding(self, time_seq: Tensor, real: Tensor) -> Tensor:
        """r_1 = M_t[pos_i] (eq. 12)."""
        return self.interval_table(interval_buckets(time_seq, real, self.mu, self.max_bucket))

    def _cosine(self, value: Tensor, real: Tensor, frequency_scaled: bool = True) -> Tensor:
        """cos((l_j * value + z_j) * freq^(-j/d)) (eq. 13), or cos(w_j * value + b_j) when not
        `frequency_scaled` (Fig. 5's "Cos"); float64 throughout; padded slots -> 0."""
        w = self.time_linear.weight.squeeze(-1).double()
        b = self.time_linear.bias.double()
        angle = value.unsqueeze(-1) * w + b
        if frequency_scaled:
            angle = angle * self.freq_scales
        return (torch.cos(angle) * real.unsqueeze(-1)).to(self.time_linear.weight.dtype)

    def absolute_embedding(self, time_seq: Tensor, real: Tensor) -> Tensor:
        """r_2 of eq. 13 on t measured from the data's first timestamp, in `time_unit_seconds` or
        (`absolute_time_span_unit`) in units of the data's span."""
        t = (time_seq - self.time_origin).double() / self.time_unit
        return self._cosine(t, real)

    def forward(self, time_seq: Tensor, real: Tensor) -> Tensor:
        real = real.long()
        if self.kind == "interval_absolute":
            return torch.cat([self.interval_embedding(time_seq, real),
                              self.absolute_embedding(time_seq, real)], dim=-1)
        if self.kind == "interval":
            return self.interval_embedding(time_seq, real)
        if self.kind == "absolute":
            return self.absolute_embedding(time_seq, real)
        if self.kind == "cos_interval":
            return self._cosine(intervals(time_seq, real).double() / self.interval_unit, real, frequency_scaled=False)
        if self.kind == "day":
            day = torch.div(time_seq - self.time_origin, SECONDS_PER_DAY, rounding_mode="floor")
            return self.day_table((day.clamp(0, self.n_days - 1) + 1) * real)
        if self.kind == "day_of_year":
            days = torch.div(time_seq, SECONDS_PER_DAY, rounding_mode="floor")
            return self.day_table(days_since_epoch_to_day_of_year(days) * real)
        raise ValueError(f"model.time_embedding: unknown kind {self.kind!r}")


def max_bucket_for(max_interval_seconds: int, mu: float) -> int:
    """The largest bucket an interval of `max_interval_seconds` falls in (sizes M_t)."""
    return int(math.floor(mu * math.log2(max_interval_seconds + 1)))
