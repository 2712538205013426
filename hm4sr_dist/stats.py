"""Statistics for comparing runs: seed-level intervals, bootstrap p-values, the Holm adjustment.

Pure functions on numpy arrays (no run folders: `compare.py` reads those and calls these).

    t_critical(df, level)        Student-t quantile t_{(1+level)/2, df}
    seed_t_interval(diffs)       mean ± t_{0.975, n-1} · sd/√n of n >= 2 paired seed differences
    hierarchical_bootstrap(a, b) resample seeds, then users (the same users for both settings)
    bootstrap_p_value(reps)      min(1, 2 · min(share <= 0, share >= 0)), two-sided
    holm(p)                      Holm–Bonferroni step-down adjusted p-values

The t quantile and CDF come from scipy when it is installed (imported only when needed: the
hm4sr-compare command starts on numpy alone); otherwise from the exact closed form for integer
degrees of freedom (Abramowitz & Stegun 26.7.3-4), inverted by bisection.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

# Bootstrap: at most this many gathered values per chunk (64 MB of float64) whatever the user count.
CHUNK_VALUES = 1 << 23
UNIT_USERS = "users"
UNIT_SEEDS_T = "seeds (t)"
UNIT_HIERARCHICAL = "seeds then users (hierarchical bootstrap)"


# ---------------------------------------------------------------------------------------------
# Student t
# ---------------------------------------------------------------------------------------------

def _central_mass(t: float, df: int) -> float:
    """A(t|df) = P(|T| <= t) for integer df, exactly (A&S 26.7.3-4), with θ = atan(t/√df):

        df odd:  A = 2/π · (θ + sinθ · Σ_{j=0}^{(df-3)/2} c_j cos^{2j+1}θ),  c_j = c_{j-1}·2j/(2j+1)
        df even: A = sinθ · Σ_{j=0}^{(df-2)/2} c_j cos^{2j}θ,               c_j = c_{j-1}·(2j-1)/(2j)

    with c_0 = 1 (df = 1: A = 2θ/π).
    """
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2:
        term, total = math.cos(theta), 0.0
        for j in range((df - 1) // 2):          # no terms for df = 1
            total += term
            term *= c2 * (2 * j + 2) / (2 * j + 3)
        return 2 / math.pi * (theta + s * total)
    term, total = 1.0, 0.0
    for j in range(df // 2):
        total += term
        term *= c2 * (2 * j + 1) / (2 * j + 2)
    return s * total


def _check_df(df: int) -> int:
    if int(df) != df or df < 1:
        raise ValueError(f"t distribution: expected an integer df >= 1, got {df!r}")
    return int(df)


def t_critical_exact(df: int, level: float = 0.95) -> float:
    """t with P(|T_df| <= t) = level, i.e. t_{(1+level)/2, df}, by bisection on θ = atan(t/√df)."""
    df = _check_df(df)
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    lo, hi = 0.0, math.pi / 2
    for _ in range(200):                         # the mass rises with θ; 200 halvings reach float precision
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _central_mass(math.sqrt(df) * math.tan(mid), df) < level else (lo, mid)
    return math.sqrt(df) * math.tan((lo + hi) / 2)


def t_two_sided_p_exact(t: float, df: int) -> float:
    """P(|T_df| >= |t|) = 1 - A(|t| | df)."""
    return max(0.0, 1.0 - _central_mass(t, _check_df(df)))


def t_critical(df: int, level: float = 0.95) -> float:
    """t_{(1+level)/2, df}: scipy's when installed, else `t_critical_exact` (equal to ~1e-12)."""
    try:
        from scipy.special import stdtrit
    except ImportError:
        return t_critical_exact(df, level)
    return float(stdtrit(_check_df(df), 0.5 + level / 2))


def t_two_sided_p(t: float, df: int) -> float:
    """Two-sided p of a t statistic: 2 · P(T_df <= -|t|)."""
    try:
        from scipy.special import stdtr
    except ImportError:
        return t_two_sided_p_exact(t, df)
    return float(2 * stdtr(_check_df(df), -abs(t)))


# ---------------------------------------------------------------------------------------------
# Intervals
# ---------------------------------------------------------------------------------------------

@dataclass
class Interval:
    """A 95% interval of a setting-vs-baseline difference, and what it resampled (`unit`)."""

    unit: str                   # UNIT_USERS, UNIT_SEEDS_T or UNIT_HIERARCHICAL
    diff: float                 # point estimate: the mean paired difference
    low: float
    high: float
    p_value: float              # two-sided (t test, or bootstrap_p_value)
    n_seeds: int                # paired seeds used
    n_users: int = 0            # users resampled (0: the t interval sees run means only)
    sd: float = math.nan        # t only: sample std of the seed differences
    t: float = math.nan         # t only: the critical value t_{(1+level)/2, n-1}
    holm_p: float = math.nan    # set by the caller over its family (`holm`)
    holm_excludes_0: bool = False

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def seed_t_interval(diffs: Sequence[float], level: float = 0.95) -> Interval | None:
    """Student-t interval of the mean of n paired seed differences d_1..d_n (None when n < 2):

        mean ± t_{(1+level)/2, n-1} · sd/√n,   sd = √(Σ(d_i - mean)² / (n-1))

    p is the two-sided one-sample t test of mean = 0 (so p <= 1 - level exactly when the interval
    excludes 0); with sd = 0 it is 0 for a nonzero mean and 1 for a zero one.
    """
    d = np.asarray(diffs, np.float64)
    n = d.size
    if n < 2:
        return None
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    t = t_critical(n - 1, level)
    half = t * sd / math.sqrt(n)
    if sd > 0:
        p = t_two_sided_p(mean / (sd / math.sqrt(n)), n - 1)
    else:
        p = 0.0 if mean != 0 else 1.0
    return Interval(UNIT_SEEDS_T, mean, mean - half, mean + half, p, n, sd=sd, t=t)


def bootstrap_p_value(replicates: np.ndarray) -> float:
    """Two-sided bootstrap p of "difference = 0": min(1, 2 · min(share of replicates <= 0, share >= 0)).

    Twice the smaller tail: about the smallest α at which the equal-tailed percentile (1-α)
    interval still reaches 0. A replicate exactly 0 counts in both tails, so identical runs give 1;
    0 means no replicate on the other side of 0 (p < 1/B, the resolution of B replicates).
    """
    r = np.asarray(replicates, np.float64)
    if r.size == 0:
        raise ValueError("bootstrap_p_value: no replicates")
    return two_sided_p(float((r <= 0).mean()), float((r >= 0).mean()))


def two_sided_p(share_le_0: float, share_ge_0: float) -> float:
    """`bootstrap_p_value` from the two tail shares."""
    return min(1.0, 2 * min(share_le_0, share_ge_0))


# ---------------------------------------------------------------------------------------------
# Multiple comparisons
# ---------------------------------------------------------------------------------------------

def holm(p_values: Sequence[float]) -> list[float]:
    """Holm–Bonferroni step-down adjusted p-values, in the input order.

    With the m finite p-values sorted p_(1) <= ... <= p_(m):

        p~_(i) = min(1, max_{j <= i} (m - j + 1) · p_(j))

    so the adjusted values keep the order of the raw ones and are capped at 1; rejecting where
    p~ <= α controls the family-wise error rate at α. NaN (a comparison without that test) stays
    NaN and is not counted in m.
    """
    p = np.asarray(p_values, np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    if ok.size == 0:
        return out.tolist()
    if (p[ok] < 0).any() or (p[ok] > 1).any():
        raise ValueError(f"holm: p-values must lie in [0, 1], got {p[ok].tolist()}")
    order = ok[np.argsort(p[ok], kind="stable")]
    m = order.size
    scaled = (m - np.arange(m)) * p[order]                      # (m - j + 1) p_(j), j = 1..m
    out[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return out.tolist()


# ---------------------------------------------------------------------------------------------
# Bootstrap draws
# ---------------------------------------------------------------------------------------------

def user_draws(n_users: int, n_boot: int, seed: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """(start, stop, (stop-start, U) user indices) chunks of B resamples of U users with replacement.

    Drawn from `np.random.default_rng(seed)` in chunks of at most CHUNK_VALUES indices, so the draws
    depend only on (seed, U, B): the user-level and the hierarchical bootstrap see the same users.
    """
    rng = np.random.default_rng(seed)
    rows = max(1, min(n_boot, CHUNK_VALUES // n_users))
    dtype = np.int32 if n_users < 2**31 else np.int64
    for start in range(0, n_boot, rows):
        stop = min(start + rows, n_boot)
        yield start, stop, rng.integers(0, n_users, size=(stop - start, n_users), dtype=dtype)


def seed_counts(n_seeds: int, n_boot: int, seed: int) -> np.ndarray:
    """(B, S) how often each seed is drawn in each of B resamples of S seeds with replacement.

    From its own stream (`default_rng([seed, 1])`), so the user draws stay those of `user_draws`.
    """
    idx = np.random.default_rng([seed, 1]).integers(0, n_seeds, size=(n_boot, n_seeds))
    return (idx[:, :, None] == np.arange(n_seeds)).sum(1)


@dataclass
class HierarchicalResult:
    interval: Interval
    replicates: np.ndarray      # (B,) the resampled mean differences


def paired_differences(a, b, n_boot: int, what: str, error: type = ValueError):
    """(single, names, b - a stacked as (M, ...)) of aligned per-user values given as arrays or as
    dicts of metrics; `error` (naming `what`) when the metrics differ or B < 1."""
    single = not isinstance(a, Mapping)
    a_, b_ = ({"value": a}, {"value": b}) if single else (a, b)
    if set(a_) != set(b_):
        raise error(f"{what}: metrics differ: {sorted(a_)} vs {sorted(b_)}")
    if n_boot < 1:
        raise error(f"{what}: expected B >= 1 resamples, got {n_boot}")
    names = list(a_)
    return single, names, np.stack([np.asarray(b_[m], np.float64) - np.asarray(a_[m], np.float64)
                                    for m in names])


def hierarchical_bootstrap(a: Mapping[str, np.ndarray] | np.ndarray, b: Mapping[str, np.ndarray] | np.ndarray,
                           n_boot: int = 10000, seed: int = 0, level: float = 0.95,
                           ) -> dict[str, HierarchicalResult] | HierarchicalResult:
    """Bootstrap of the mean difference b - a over seeds, then users; a, b: (S, U) per-user values
    of S >= 3 paired seeds (row s of both: the two settings' runs of seed s) on the same U users.

    Replicate r draws S seeds with replacement (counts n_rs) and U users with replacement (indices
    u_r1..u_rU), the same users for both settings and for every drawn seed, and takes

        θ*_r = 1/S Σ_s n_rs · 1/U Σ_k (b[s, u_rk] - a[s, u_rk])

    The users are drawn once per replicate, not once per drawn seed, because every seed scores the
    same test users (users are crossed with seeds, not nested in them): independent user draws per
    seed would average the user sampling noise over S copies and shrink it about √S-fold. So with
    identical seeds the interval is the user-level paired bootstrap's (same draws, `user_draws`),
    and with no user noise (b - a constant within a seed) it is the bootstrap of the S seed means.
    The interval is the percentile one; p is `bootstrap_p_value` of the replicates. Dicts (of
    metrics) are evaluated on the same draws.
    """
    single, names, d = paired_differences(a, b, n_boot, "hierarchical_bootstrap")    # d: (M, S, U)
    if d.ndim != 3 or d.shape[1] < 3 or d.shape[2] < 1:
        raise ValueError(f"hierarchical_bootstrap: expected (S, U) arrays with S >= 3 seeds and U >= 1 "
                         f"users, got {d.shape[1:]}")
    n_metrics, n_seeds, n_users = d.shape
    flat = d.transpose(2, 0, 1).reshape(n_users, n_metrics * n_seeds)       # (U, M·S)
    counts = seed_counts(n_seeds, n_boot, seed)                                 # (B, S)
    boot = np.empty((n_metrics, n_boot))
    for start, stop, idx in user_draws(n_users, n_boot, seed):
        # Per drawn user set, the mean difference of every (metric, seed): multiplicities @ values.
        mult = np.empty((stop - start, n_users))
        for r in range(stop - start):
            mult[r] = np.bincount(idx[r], minlength=n_users)
        user_means = (mult @ flat / n_users).reshape(-1, n_metrics, n_seeds)               # (c, M, S)
        boot[:, start:stop] = (user_means * counts[start:stop, None, :]).sum(-1).T / n_seeds
    tail = (1 - level) / 2
    lo, hi = np.quantile(boot, [tail, 1 - tail], axis=1)
    out = {m: HierarchicalResult(Interval(UNIT_HIERARCHICAL, float(d[i].mean()), float(lo[i]), float(hi[i]),
                                          bootstrap_p_value(boot[i]), n_seeds, n_users), boot[i])
           for i, m in enumerate(names)}
    return out["value"] if single else out
