"""hm4sr_dist.stats against hand-computed values: the t quantile, the seed-level t interval, the
two-sided bootstrap p-value, the Holm adjustment, and properties of the hierarchical bootstrap."""

import math

import numpy as np
import pytest

from hm4sr_dist.compare import paired_bootstrap
from hm4sr_dist.stats import (
    UNIT_HIERARCHICAL,
    UNIT_SEEDS_T,
    bootstrap_p_value,
    hierarchical_bootstrap,
    holm,
    seed_t_interval,
    t_critical,
    t_critical_exact,
    t_two_sided_p,
    t_two_sided_p_exact,
)


@pytest.mark.parametrize("quantile", [t_critical, t_critical_exact])
def test_t_quantile_known_values(quantile):
    # Printed tables: t_{0.975,1} = 12.706205, t_{0.975,2} = 4.302653, t_{0.975,30} = 2.042272,
    # t_{0.995,4} = 4.604095; df = 2 in closed form: t = √(2 q²/(1 - q²)) at central mass q.
    assert quantile(1) == pytest.approx(12.706205, abs=1e-6)
    assert quantile(2) == pytest.approx(4.302653, abs=1e-6)
    assert quantile(2) == pytest.approx(math.sqrt(2 * 0.95**2 / (1 - 0.95**2)), rel=1e-12)
    assert quantile(30) == pytest.approx(2.042272, abs=1e-6)
    assert quantile(4, level=0.99) == pytest.approx(4.604095, abs=1e-6)
    with pytest.raises(ValueError, match="integer df >= 1"):
        quantile(0)


def test_exact_t_matches_scipy_where_installed():
    pytest.importorskip("scipy")
    for df in range(1, 61):
        for level in (0.8, 0.9, 0.95, 0.99):
            assert t_critical_exact(df, level) == pytest.approx(t_critical(df, level), rel=1e-10)
        for t in (0.3, 1.0, 2.5, 7.0):
            assert t_two_sided_p_exact(t, df) == pytest.approx(t_two_sided_p(t, df), rel=1e-9, abs=1e-13)


def test_seed_t_interval_by_hand():
    """Beauty's three paired NDCG@5 differences, d = (+0.0002, +0.0018, +0.0017); in units of
    u = 1e-4/3 they are (6, 54, 51):
        mean = 111/3 u = 37 u                     = 0.00123333
        deviations -31, 17, 14; Σ² = 961 + 289 + 196 = 1446 u²
        sd = √(1446/2) u = √723 u                 = 0.000896289
        se = sd/√3 = √241 u                       = 0.000517472
        t_{0.975,2} = 4.302653; half = t·se       = 0.00222650
        95% CI = [0.00123333 - 0.00222650, 0.00123333 + 0.00222650] = [-0.00099317, +0.00345984]
        t stat = 37/√241 = 2.383380; df = 2: p = 1 - t/√(2 + t²) = 1 - 37/√1851 = 0.1399999
    """
    iv = seed_t_interval([0.0002, 0.0018, 0.0017])
    assert iv.unit == UNIT_SEEDS_T == "seeds (t)" and iv.n_seeds == 3 and iv.n_users == 0
    assert iv.diff == pytest.approx(0.00123333, abs=1e-8)
    assert iv.sd == pytest.approx(0.000896289, abs=1e-9)
    assert iv.t == pytest.approx(4.302653, abs=1e-6)
    assert iv.low == pytest.approx(-0.00099317, abs=1e-8)
    assert iv.high == pytest.approx(0.00345984, abs=1e-8)
    assert iv.p_value == pytest.approx(1 - 37 / math.sqrt(1851), abs=1e-9)
    assert iv.p_value == pytest.approx(0.14, abs=1e-6)
    assert not iv.excludes_zero                       # p > 0.05 and the interval holds 0: the same verdict


def test_seed_t_interval_edges():
    assert seed_t_interval([]) is None and seed_t_interval([0.003]) is None       # fewer than 2 seeds
    # two seeds: d = (0.001, 0.003): mean 0.002, sd = √2·0.001, se = sd/√2 = 0.001,
    # half = 12.706205·0.001 = 0.012706205: [-0.010706205, +0.014706205]
    two = seed_t_interval([0.001, 0.003])
    assert two.low == pytest.approx(-0.010706205, abs=1e-9)
    assert two.high == pytest.approx(0.014706205, abs=1e-9)
    same = seed_t_interval([0.01, 0.01, 0.01])                                     # sd = 0
    assert (same.low, same.high, same.p_value) == (pytest.approx(0.01), pytest.approx(0.01), 0.0)
    assert seed_t_interval([0.0, 0.0]).p_value == 1.0


def test_bootstrap_p_value_by_hand():
    # 8 replicates: 3 are <= 0 (-1, 0, 0), 7 are >= 0: p = min(1, 2·min(3/8, 7/8)) = 0.75
    assert bootstrap_p_value([-1, 0, 0, 1, 2, 3, 4, 5]) == 0.75
    assert bootstrap_p_value([-1, 1, 2, 3, 4]) == pytest.approx(0.4)            # 2·1/5
    assert bootstrap_p_value([-4, -3, -2, 1]) == pytest.approx(0.5)             # 2·min(3/4, 1/4)
    assert bootstrap_p_value([1e-9, 2, 3]) == 0.0                               # none <= 0
    assert bootstrap_p_value([0.0, 0.0, 0.0]) == 1.0                            # 2·1 capped at 1
    # paired_bootstrap's p_two_sided is the same formula over its resamples' two tails
    a = np.random.default_rng(1).random(200)
    b = a + np.random.default_rng(2).normal(0.01, 0.1, 200)
    r = paired_bootstrap(a, b, n_boot=999, seed=0)
    assert r.p_le_0 + r.p_ge_0 == pytest.approx(1.0)                            # continuous: no ties at 0
    assert r.p_two_sided == pytest.approx(min(1, 2 * min(r.p_le_0, r.p_ge_0)))


def test_holm_by_hand():
    # sorted 0.01 < 0.03 < 0.04 < 0.20, m = 4: 4·0.01 = 0.04, 3·0.03 = 0.09, 2·0.04 = 0.08 -> max 0.09,
    # 1·0.20 = 0.20; back in the input order:
    assert holm([0.01, 0.04, 0.03, 0.20]) == pytest.approx([0.04, 0.09, 0.09, 0.20])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])                        # 2·0.5 = 1, then max(1, 0.6)
    assert holm([0.02]) == [0.02] and holm([]) == []
    adjusted = holm([0.01, float("nan"), 0.04])                 # NaN: not in the family, m = 2
    assert adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1])
    assert adjusted[2] == pytest.approx(0.04)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm([0.1, 1.5])


def test_holm_is_monotone_capped_and_between_raw_and_bonferroni():
    p = np.random.default_rng(0).random(40) ** 3
    adj = np.array(holm(p))
    order = np.argsort(p)
    assert np.all(np.diff(adj[order]) >= 0)                     # keeps the order of the raw p
    assert np.all(adj >= p) and np.all(adj <= np.minimum(1, 40 * p) + 1e-15) and adj.max() <= 1
    assert adj[order[0]] == pytest.approx(40 * p[order[0]])                     # the smallest: Bonferroni


def _users(seed, n=400):
    rng = np.random.default_rng(seed)
    base = rng.random(n) * 0.3
    return base, base + rng.normal(0.004, 0.05, n)


def test_hierarchical_bootstrap_of_identical_seeds_is_the_user_bootstrap():
    """Every seed scores the same users identically: resampling seeds changes nothing, and the
    users are drawn as the user-level bootstrap draws them, so both give the same interval and p."""
    a, b = _users(0)
    user = paired_bootstrap(a, b, n_boot=3000, seed=7)
    hier = hierarchical_bootstrap(np.tile(a, (4, 1)), np.tile(b, (4, 1)), n_boot=3000, seed=7)
    iv = hier.interval
    assert iv.unit == UNIT_HIERARCHICAL and (iv.n_seeds, iv.n_users) == (4, 400)
    assert iv.diff == pytest.approx(user.diff, abs=1e-15)
    assert iv.low == pytest.approx(user.ci_low, abs=1e-15)
    assert iv.high == pytest.approx(user.ci_high, abs=1e-15)
    assert iv.p_value == pytest.approx(user.p_two_sided) and iv.p_value == bootstrap_p_value(hier.replicates)
    assert iv.high - iv.low > 0.005                                              # a real user-level width


def test_hierarchical_bootstrap_without_user_noise_is_driven_by_seeds():
    """b - a = c_s for every user of seed s, c = (0.001, 0.002, 0.003): the user-level bootstrap of the
    seed-averaged values sees 0.002 for every user (width 0), while the hierarchical one resamples
    the seed means: 3 draws from {c} have mean c_1 with probability 1/27 = 3.7% > 2.5% (and c_3
    likewise), so its 95% percentile interval is exactly [min c, max c] = [0.001, 0.003]."""
    rng = np.random.default_rng(3)
    c = np.array([0.001, 0.002, 0.003])
    a = rng.random((3, 500)) * 0.3
    b = a + c[:, None]
    user = paired_bootstrap(a.mean(0), b.mean(0), n_boot=2000, seed=0)
    assert user.ci_high - user.ci_low == pytest.approx(0.0, abs=1e-15) and user.diff == pytest.approx(0.002)
    hier = hierarchical_bootstrap(a, b, n_boot=2000, seed=0)
    assert (hier.interval.low, hier.interval.high) == (pytest.approx(0.001, abs=1e-15),
                                                       pytest.approx(0.003, abs=1e-15))
    share_min = np.mean(np.isclose(hier.replicates, 0.001, rtol=0, atol=1e-15))
    assert share_min == pytest.approx(1 / 27, abs=0.012)                         # all three draws seed 1
    assert hier.interval.p_value == 0.0                                          # every replicate > 0


def test_hierarchical_bootstrap_needs_three_seeds_and_is_seeded():
    a, b = _users(1, 50)
    with pytest.raises(ValueError, match="S >= 3 seeds"):
        hierarchical_bootstrap(np.tile(a, (2, 1)), np.tile(b, (2, 1)), n_boot=10)
    a3 = np.stack([a, a * 0.9, a * 1.1])
    b3 = np.stack([b, b * 0.95, b * 1.05])
    one = hierarchical_bootstrap({"m": a3}, {"m": b3}, n_boot=500, seed=4)["m"]
    assert np.array_equal(one.replicates, hierarchical_bootstrap(a3, b3, n_boot=500, seed=4).replicates)
    assert not np.array_equal(one.replicates, hierarchical_bootstrap(a3, b3, n_boot=500, seed=5).replicates)
