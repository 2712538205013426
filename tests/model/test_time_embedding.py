"""Eq. 11-13 (intervals, interval buckets, learned cosines of absolute time) and the Fig. 5 variants."""

import math
import random
from datetime import datetime, timezone

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from hm4sr_dist.model import ItemCatalog
from hm4sr_dist.model.time import (TimeEmbedding, days_since_epoch_to_day_of_year, interval_buckets,
                                   intervals, max_bucket_for)
from hm4sr_tiny import D, T0, make_model, randomize_, tiny_batch, tiny_model_cfg


def _time_embedding(kind="interval_absolute", origin=0, max_bucket=3000, n_days=60, seed=0,
                    **cfg):
    catalog = ItemCatalog(n_items=3, max_interval_bucket=max_bucket, time_origin=origin, n_days=n_days)
    return randomize_(TimeEmbedding(tiny_model_cfg(time_embedding=kind, **cfg), catalog), seed)


# -- eq. 11: intervals --------------------------------------------------------------------------

def test_intervals_first_zero_padded_zero_negative_clamped():
    time_seq = torch.tensor([[T0, T0 + 5, T0 + 5, T0 + 65, 0, 0],        # repeat -> 0, padding -> 0
                             [T0, T0 - 10, T0 + 100, 0, 0, 0],           # unsorted: negative step -> 0
                             [T0 + 7, 0, 0, 0, 0, 0]])                    # one item; 0 - t is negative
    real = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    expected = torch.tensor([[0, 5, 0, 60, 0, 0], [0, 0, 110, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    got = intervals(time_seq, real)
    assert got.dtype == torch.int64
    assert torch.equal(got, expected)
    # garbage in padded slots (not only 0) is ignored as well
    garbage = torch.where(real, time_seq, torch.randint(-10**12, 10**12, time_seq.shape))
    assert torch.equal(intervals(garbage, real), expected)


# -- eq. 12: buckets ----------------------------------------------------------------------------

def _bucket_py(a: int, mu: float, max_bucket: int) -> int:
    return min(math.floor(mu * math.log2(a + 1)), max_bucket)


@pytest.mark.parametrize("mu", [100.0, 7.5])
def test_interval_buckets_match_python_log2(mu):
    rng = random.Random(0)
    special = [0, 1, 2, 3, 7, 59, 60, 3600, 86399, 86400, 2**20 - 1, 10**6, 10**9]
    gaps = special + [rng.randrange(0, 10**8) for _ in range(200)]
    max_bucket = max_bucket_for(40 * 86400, mu)                  # 10**9 s lies beyond the table
    assert _bucket_py(10**9, mu, 10**9) > max_bucket
    time_seq = torch.tensor([T0] + [T0 + sum(gaps[:i + 1]) for i in range(len(gaps))] + [0, 0]).unsqueeze(0)
    n_real = len(gaps) + 1
    real = torch.arange(time_seq.shape[1]).unsqueeze(0) < n_real
    got = interval_buckets(time_seq, real, mu, max_bucket)[0].tolist()
    expected = [0] + [_bucket_py(a, mu, max_bucket) for a in gaps] + [0, 0]   # first, then padding
    assert got == expected
    assert got[1 + special.index(0)] == 0                                      # zero interval
    assert got[1 + special.index(10**9)] == max_bucket                        # huge -> clamped
    assert got[1 + special.index(2**20 - 1)] == min(int(20 * mu), max_bucket)  # exact power of 2


def test_max_bucket_for_matches_python():
    for seconds in (0, 1, 59, 86400, 40 * 86400, 10**9):
        assert max_bucket_for(seconds, 100.0) == math.floor(100 * math.log2(seconds + 1))


def test_interval_embedding_is_a_row_lookup_with_padding_bucket_zero():
    batch = tiny_batch()
    te = _time_embedding("interval", max_bucket=700)
    real = batch.padding_mask()
    out = te(batch.time_seq, real)
    assert out.shape == (*batch.time_seq.shape, D)
    buckets = interval_buckets(batch.time_seq, real, 100.0, 700)
    assert int(buckets.max()) == 700                               # the 20-day gap is clamped
    assert torch.equal(buckets[~real], torch.zeros_like(buckets[~real]))
    assert_close(out, te.interval_table.weight[buckets], rtol=0, atol=0)


# -- eq. 13: absolute time ----------------------------------------------------------------------

def _r2_numpy(time_seq, real, weight, bias, origin, unit, freq, d):
    t = (time_seq.numpy().astype(np.int64) - origin).astype(np.float64) / unit      # exact int64 first
    j = np.arange(d, dtype=np.float64)
    angle = (t[..., None] * weight.detach().double().numpy() + bias.detach().double().numpy()) \
        * np.power(freq, -j / d)
    return np.cos(angle) * real.numpy()[..., None]


@pytest.mark.parametrize("origin, unit", [(T0 - 3 * 86400, 86400.0), (0, 1.0), (T0 - 5, 3600.0)])
def test_absolute_matches_float64_numpy(origin, unit):
    batch = tiny_batch()
    te = _time_embedding("absolute", origin=origin, time_unit_seconds=unit)
    real = batch.padding_mask()
    got = te(batch.time_seq, real)
    assert got.dtype == torch.float32 and got.shape == (*batch.time_seq.shape, D)
    expected = _r2_numpy(batch.time_seq, real, te.time_linear.weight.squeeze(-1), te.time_linear.bias,
                         origin, unit, 10000.0, D)
    assert_close(got.double(), torch.from_numpy(expected), rtol=0, atol=1e-6)
    assert torch.count_nonzero(got[~real]) == 0                                   # padding -> 0


def test_one_second_apart_at_1_7e9_is_resolved_and_float32_would_not():
    # The harshest setting: raw seconds (origin 0, unit 1 s) straight into eq. 13.
    te = _time_embedding("absolute", origin=0, time_unit_seconds=1.0)
    with torch.no_grad():
        te.time_linear.weight.fill_(1.0)
        te.time_linear.bias.zero_()
    t = torch.tensor([[1_700_000_000, 1_700_000_001]])
    real = torch.ones_like(t, dtype=torch.bool)
    r2 = te(t, real)[0]
    expected = _r2_numpy(t, real, te.time_linear.weight.squeeze(-1), te.time_linear.bias,
                         0, 1.0, 10000.0, D)[0]
    assert_close(r2.double(), torch.from_numpy(expected), rtol=0, atol=1e-6)
    assert (r2[0] - r2[1]).abs().max() > 0.1                              # cos(1.7e9) vs cos(1.7e9 + 1)
    # The same computation on float32 timestamps cannot tell them apart (128 s spacing at 1.7e9).
    t32 = t.float()
    assert t32[0, 0] == t32[0, 1]
    r2_32 = torch.cos((t32.unsqueeze(-1) * te.time_linear.weight.squeeze(-1) + te.time_linear.bias)
                      * te.freq_scales.float())[0]
    assert torch.equal(r2_32[0], r2_32[1])


def test_one_second_apart_with_data_origin_is_exact():
    # With the data's origin the offsets are small integers, exact in float64 (and in float32).
    te = _time_embedding("absolute", origin=T0, time_unit_seconds=1.0)
    with torch.no_grad():
        te.time_linear.weight.fill_(0.5)
        te.time_linear.bias.fill_(0.1)
    t = torch.tensor([[T0 + 86400 * 365, T0 + 86400 * 365 + 1]])
    r2 = te(t, torch.ones_like(t, dtype=torch.bool))[0]
    j = torch.arange(D, dtype=torch.float64)
    for col, offset in enumerate((86400 * 365, 86400 * 365 + 1)):
        expected = torch.cos((0.5 * offset + 0.1) * 10000.0 ** (-j / D))
        assert_close(r2[col].double(), expected, rtol=0, atol=1e-6)
    assert (r2[0] - r2[1]).abs().max() > 0.1


def test_interval_absolute_is_concatenation():
    batch = tiny_batch()
    te = _time_embedding("interval_absolute", origin=T0 - 3 * 86400, max_bucket=900)
    real = batch.padding_mask()
    out = te(batch.time_seq, real)
    assert te.width == 2 * D and out.shape == (*batch.time_seq.shape, 2 * D)
    buckets = interval_buckets(batch.time_seq, real, 100.0, 900)
    assert_close(out[..., :D], te.interval_table.weight[buckets], rtol=0, atol=0)
    r2 = _r2_numpy(batch.time_seq, real, te.time_linear.weight.squeeze(-1), te.time_linear.bias,
                   T0 - 3 * 86400, 86400.0, 10000.0, D)
    assert_close(out[..., D:].double(), torch.from_numpy(r2), rtol=0, atol=1e-6)


# -- Fig. 5 variants ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind, width", [("interval_absolute", 2 * D), ("interval", D), ("absolute", D),
                                         ("day", D), ("day_of_year", D), ("cos_interval", D)])
def test_width_of_every_kind(kind, width):
    batch = tiny_batch()
    te = _time_embedding(kind, origin=T0 - 3 * 86400)
    out = te(batch.time_seq, batch.padding_mask())
    assert te.width == width
    assert out.shape == (*batch.time_seq.shape, width) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def _doy(ts: int) -> int:
    return datetime.fromtimestamp(ts, tz=timezone.utc).timetuple().tm_yday


def test_day_of_year_tensor_maths_matches_datetime():
    rng = random.Random(1)
    ts = [rng.randrange(-2 * 10**9, 4 * 10**9) for _ in range(3000)]        # 1906 .. 2096
    # calendar edges: leap days and year ends (2000: leap; 2100: not; 1972, 2024: leap)
    for y, m, d in [(2000, 2, 29), (2000, 3, 1), (2000, 12, 31), (2100, 2, 28), (2100, 3, 1),
                    (2100, 12, 31), (1972, 12, 31), (2024, 2, 29), (2024, 12, 31), (2023, 12, 31),
                    (1970, 1, 1), (1969, 12, 31), (1900, 3, 1)]:
        base = int(datetime(y, m, d, tzinfo=timezone.utc).timestamp())
        ts += [base, base + 86399]
    days = torch.div(torch.tensor(ts), 86400, rounding_mode="floor")
    got = days_since_epoch_to_day_of_year(days).tolist()
    assert got == [_doy(t) for t in ts]
    assert max(got) == 366 and min(got) == 1


def test_day_of_year_embedding_rows():
    te = _time_embedding("day_of_year")
    rng = random.Random(2)
    ts = torch.tensor([[rng.randrange(0, 4 * 10**9) for _ in range(6)] for _ in range(40)])
    ts[:, 0] = int(datetime(2024, 12, 31, 12, tzinfo=timezone.utc).timestamp())     # day 366
    real = torch.arange(6).unsqueeze(0) < torch.randint(1, 7, (40, 1))
    out = te(ts, real)
    expected_rows = torch.tensor([[_doy(int(t)) if r else 0 for t, r in zip(row, rrow)]
                                  for row, rrow in zip(ts.tolist(), real.tolist())])
    assert expected_rows[:, 0].eq(366).all()
    assert_close(out, te.day_table.weight[expected_rows], rtol=0, atol=0)


def test_day_index_since_origin():
    origin, n_days = T0 - 3 * 86400 + 17, 30
    te = _time_embedding("day", origin=origin, n_days=n_days)
    offsets = [0, 1, 86399, 86400, 86401, 5 * 86400 + 3, (n_days - 1) * 86400, n_days * 86400 + 5, -1]
    ts = torch.tensor([[origin + o for o in offsets] + [0, 0]])
    real = torch.arange(ts.shape[1]).unsqueeze(0) < len(offsets)
    out = te(ts, real)
    expected = [min(max(o // 86400, 0), n_days - 1) + 1 for o in offsets] + [0, 0]
    assert expected[:4] == [1, 1, 1, 2]
    assert expected[-5:-2] == [n_days, n_days, 1]        # last day; clamped past the end; before origin
    assert_close(out[0], te.day_table.weight[torch.tensor(expected)], rtol=0, atol=0)


def test_cos_interval():
    """Fig. 5 "Cos": cos(w_j * a / unit + b_j), a = eq. 11 interval, no frequency scaling; padding -> 0."""
    batch = tiny_batch()
    te = _time_embedding("cos_interval", time_unit_seconds=3600.0)
    real = batch.padding_mask()
    out = te(batch.time_seq, real)
    a = intervals(batch.time_seq, real).double() / 3600.0
    w, b = te.time_linear.weight.squeeze(-1).double(), te.time_linear.bias.double()
    expected = torch.cos(a.unsqueeze(-1) * w + b) * real.unsqueeze(-1)
    assert_close(out.double(), expected, rtol=0, atol=1e-6)
    assert torch.count_nonzero(out[~real]) == 0


@pytest.mark.parametrize("kind", ["day", "day_of_year"])
def test_day_table_padding_row_is_zero_after_model_init(kind):
    # padding_idx=0 promises a zero row (outputs never read it: test_padded_slots_never_change_real_outputs).
    model = make_model(tiny_model_cfg(time_embedding=kind), randomize=False)
    assert torch.count_nonzero(model.time_embedding.day_table.weight[0]) == 0


def test_span_unit_measures_absolute_time_as_a_fraction_of_the_data_span():
    """eq. 13 with t in [0, 1]: the angle is (l_j * t / span + z_j) * freq^(-j/d), computed here."""
    from hm4sr_dist.config import ModelConfig
    from hm4sr_dist.model.catalog import ItemCatalog
    from hm4sr_dist.model.time import TimeEmbedding

    cfg = ModelConfig(hidden_size=4, time_embedding="absolute", absolute_time_span_unit=True)
    catalog = ItemCatalog(n_items=3, time_origin=1_600_000_000, n_days=10)
    emb = TimeEmbedding(cfg, catalog)
    times = torch.tensor([[1_600_000_000, 1_600_432_000]], dtype=torch.int64)     # t = 0 and 5 days
    out = emb(times, torch.ones_like(times, dtype=torch.bool))
    w, b = emb.time_linear.weight.detach().squeeze(-1).double(), emb.time_linear.bias.detach().double()
    for col, fraction in enumerate([0.0, 0.5]):
        for j in range(4):
            expected = math.cos((w[j] * fraction + b[j]) * 10000.0 ** (-j / 4))
            assert out[0, col, j].item() == pytest.approx(expected, abs=1e-6)
