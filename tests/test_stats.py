"""The book's statistical rules against published values: Student's t tables, R's paired t-test of Student's
sleep data, R's power.t.test, Holm's procedure as R's p.adjust gives it, TOST against the 90 % interval."""
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from aace import stats as st

# Student's sleep data (Cushny & Peebles 1905; R's `sleep`): extra hours of sleep, the same 10 patients, two drugs.
SLEEP_1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
SLEEP_2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]


@pytest.mark.parametrize("q, dof, expected", [  # textbook table values
    (0.975, 1, 12.706), (0.975, 2, 4.303), (0.975, 7, 2.365), (0.975, 30, 2.042), (0.975, 1000, 1.962),
    (0.8, 7, 0.896), (0.8, 1, 1.376), (0.95, 4, 2.132), (0.995, 10, 3.169)])
def test_t_quantiles_match_the_tables(q, dof, expected):
    assert st.t_quantile(q, dof) == pytest.approx(expected, abs=1e-3)
    assert math.isnan(st.t_quantile(0.5, 0))


def test_paired_t_test_of_the_sleep_data_matches_r():
    # R: t.test(extra ~ group, data = sleep, paired = TRUE): t = -4.0621, df = 9, p-value = 0.002833,
    # 95 percent confidence interval -2.4598858 -0.7001142, mean difference -1.58
    d = st.spread(np.subtract(SLEEP_1, SLEEP_2))
    assert d["mean"] == pytest.approx(-1.58)
    assert st.p_value(d) == pytest.approx(0.002833, abs=5e-7)
    assert st.interval(d) == pytest.approx((-2.4598858, -0.7001142), abs=1e-7)
    assert d["ci95"] == pytest.approx((-0.7001142 + 2.4598858) / 2, abs=1e-7)
    summary_only = {k: d[k] for k in ("mean", "std", "n")}  # the same test from the summary alone
    assert st.p_value(summary_only) == pytest.approx(st.p_value(d), rel=1e-9)


def test_power_matches_r_and_the_mde_has_the_declared_power():
    # R: power.t.test(n = 20, delta = 1) (two-sample, sd 1, two-sided 0.05): power = 0.8689528. statsmodels'
    # noncentral-t computation, which the MDE uses in its one-sample (paired) form, reproduces it.
    from statsmodels.stats.power import TTestIndPower
    assert TTestIndPower().power(effect_size=1.0, nobs1=20, alpha=0.05) == pytest.approx(0.8689528, abs=1e-6)
    d = st.spread([0.01, 0.03, 0.02, 0.02, 0.0, 0.04, 0.015, 0.025])
    for alpha in (0.05, 0.05 / 3):
        mde = st.minimum_detectable_effect(d, alpha=alpha)
        # the power of the paired t-test at that true difference, from scipy's noncentral t directly
        n, crit = d["n"], scipy_stats.t.ppf(1 - alpha / 2, d["n"] - 1)
        nc = mde / d["std"] * math.sqrt(n)
        power = scipy_stats.nct.sf(crit, n - 1, nc) + scipy_stats.nct.cdf(-crit, n - 1, nc)
        assert power == pytest.approx(0.8, abs=1e-6)
    assert st.minimum_detectable_effect(d, alpha=0.05 / 3) > st.minimum_detectable_effect(d)
    assert math.isnan(st.minimum_detectable_effect(st.spread([0.1])))


def test_holm_matches_r_and_ignores_nan_whatever_the_order():
    # R: p.adjust(c(0.01, 0.04, 0.03, 0.005), "holm") = 0.03 0.06 0.06 0.02
    assert st.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert st.holm([0.9, 0.6]) == pytest.approx([1.0, 1.0])
    a, b = st.holm([float("nan"), 0.01, 0.04]), st.holm([0.04, float("nan"), 0.01])
    assert math.isnan(a[0]) and a[1:] == pytest.approx([0.02, 0.04])
    assert math.isnan(b[1]) and [b[0], b[2]] == pytest.approx([0.04, 0.02])
    assert all(math.isnan(p) for p in st.holm([float("nan")]))


@pytest.mark.parametrize("shift", [0.0, 0.002, -0.003, 0.004, 0.006])
def test_tost_rejects_exactly_when_the_90_percent_interval_lies_inside_the_margin(shift):
    rng = np.random.default_rng(7)
    d = st.spread(shift + rng.normal(0, 0.004, size=12))
    lo, hi = st.interval(d, 0.90)
    inside = -st.EQUIVALENCE_MARGIN < lo and hi < st.EQUIVALENCE_MARGIN
    assert (st.tost_p(d, st.EQUIVALENCE_MARGIN) < 0.05) == inside


def test_verdicts_follow_the_declared_rule():
    clear = st.spread([0.02, 0.021, 0.019, 0.02])
    assert st.comparison_verdict(clear, 0.001).startswith("better by 2.00 points (Holm-adjusted p = 0.001; 95 % interval")
    assert st.comparison_verdict(st.spread([-v for v in clear["values"]]), 0.001).startswith("worse by 2.00")
    tight = st.spread([0.001, -0.001, 0.0, 0.002, -0.002, 0.001, 0.0, -0.001])
    assert st.comparison_verdict(tight, 0.9).startswith("equivalent within ±0.5 points (TOST p")
    lo90, hi90 = st.interval(tight, 0.90)  # TOST's interval, not the 95 % one
    assert st.comparison_verdict(tight, 0.9).endswith(f"90 % interval [{100 * lo90:+.2f}, {100 * hi90:+.2f}])")
    wide = st.spread([0.05, -0.05, 0.02, -0.03])
    lo, hi = st.interval(wide)
    assert st.comparison_verdict(wide, 0.9) == (f"inconclusive: compatible with [{100 * lo:+.2f}, {100 * hi:+.2f}] "
                                                f"points (95 % interval)")
    # In a family of 3, the interval beside the Holm-adjusted test is the family-adjusted one (1 - 0.05 / 3).
    lo3, hi3 = st.interval(wide, 1 - 0.05 / 3)
    assert st.comparison_verdict(wide, 0.9, family_size=3) == (
        f"inconclusive: compatible with [{100 * lo3:+.2f}, {100 * hi3:+.2f}] points (98.3 % interval, adjusted for "
        f"3 comparisons)")
    lo3, hi3 = st.interval(clear, 1 - 0.05 / 3)
    assert st.comparison_verdict(clear, 0.001, family_size=3).endswith(
        f"98.3 % interval, adjusted for 3 comparisons [{100 * lo3:+.2f}, {100 * hi3:+.2f}])")
    # decided at Holm's second step of 3: the interval shown is that step's (97.5 %), which excludes 0 as the verdict
    # says; at 98.3 % a later step's interval reached across 0 beside "better" (the long-tailed study's first read)
    edge = st.spread([0.010, 0.0, 0.009, 0.002, 0.012, -0.002, 0.008, 0.004])  # raw p 0.020
    assert st.interval(edge, 1 - 0.05 / 3)[0] < 0 < st.interval(edge, 0.975)[0]
    lo2, hi2 = st.interval(edge, 0.975)
    assert st.comparison_verdict(edge, 0.03, family_size=3, holm_step=2).endswith(
        f"97.5 % interval, Holm's step 2 of 3 [{100 * lo2:+.2f}, {100 * hi2:+.2f}])")
    assert st.holm_steps([0.03, 0.001, 0.2]) == [2, 3, 1]
    # significant before Holm, not after: never "better"
    assert st.comparison_verdict(clear, 0.06).startswith(("equivalent", "inconclusive"))
    assert st.comparison_verdict(st.spread([0.1]), float("nan")) == "inconclusive: one seed"
    assert st.EQUIVALENCE_MARGIN == 0.005 and "Foret et al. 2021, Table 5" in st.MARGIN_SOURCE


def test_prediction_interval_for_a_mean_of_k_new_seeds():
    d = st.spread([0.01, 0.02, 0.0, 0.015, 0.005, 0.01])
    lo, hi = st.prediction_interval(d, 2)
    half = scipy_stats.t.ppf(0.975, 5) * d["std"] * math.sqrt(1 / 6 + 1 / 2)
    assert (lo, hi) == pytest.approx((d["mean"] - half, d["mean"] + half))
    assert st.prediction_interval(d, 1)[1] - st.prediction_interval(d, 1)[0] > hi - lo


def test_sensitivity_gives_the_median_and_wilcoxon_beside_a_skewed_mean():
    # Three seeds lose much where the rest gain a little (the clean testbed's shape): mean below median.
    values = [0.003] * 27 + [-0.0233, -0.0153, -0.0117]
    d = st.spread(values)
    out = st.sensitivity(d)
    assert out["median"] == 0.003 and d["mean"] < out["median"]
    assert out["wilcoxon_p"] == pytest.approx(stats_wilcoxon(values))
    assert st.skewness(d) < -2
    assert math.isnan(st.sensitivity(st.spread([0.0, 0.0]))["wilcoxon_p"])


def stats_wilcoxon(values):
    from scipy.stats import wilcoxon
    return wilcoxon(values).pvalue
