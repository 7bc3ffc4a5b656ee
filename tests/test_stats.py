"""The statistics behind the verdicts: Student's t, the minimum detectable effect, Holm's correction."""
import math

import pytest

from aace import stats as st


@pytest.mark.parametrize("q, dof, expected", [  # textbook table values
    (0.975, 1, 12.706), (0.975, 2, 4.303), (0.975, 7, 2.365), (0.975, 30, 2.042), (0.975, 1000, 1.962),
    (0.8, 7, 0.896), (0.8, 1, 1.376), (0.95, 4, 2.132), (0.995, 10, 3.169)])
def test_t_quantiles_match_the_tables(q, dof, expected):
    assert st.t_quantile(q, dof) == pytest.approx(expected, abs=1e-3)


def test_t_cdf_is_a_distribution_function():
    assert st.t_cdf(0.0, 5) == pytest.approx(0.5, abs=1e-12)
    assert st.t_cdf(-2.0, 5) == pytest.approx(1 - st.t_cdf(2.0, 5), abs=1e-12)
    assert st.t_cdf(1.0, 1) == pytest.approx(0.75, abs=1e-9)  # Cauchy: 1/2 + atan(1)/pi
    assert math.isnan(st.t_quantile(0.5, 0))


def test_p_value_and_minimum_detectable_effect_by_hand():
    d = st.spread([0.01, 0.03, 0.02, 0.02])  # mean 0.02, sd 0.008165, n 4
    t = 0.02 / (d["std"] / 2)
    assert st.p_value(d) == pytest.approx(2 * (1 - st.t_cdf(t, 3)))
    assert 0.01 < st.p_value(d) < 0.02  # t = 4.90 lies between the tables' 4.541 (p 0.02) and 5.841 (p 0.01)
    assert st.minimum_detectable_effect(d) == pytest.approx((3.182 + 0.978) * d["std"] / 2, rel=1e-3)
    assert math.isnan(st.minimum_detectable_effect(st.spread([0.1])))


def test_holm_steps_down_and_stays_monotone():
    assert st.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert st.holm([0.5]) == [0.5]
    assert st.holm([0.9, 0.6]) == pytest.approx([1.0, 1.0])


def test_verdict_says_what_it_could_see():
    clear = st.spread([0.02, 0.021, 0.019, 0.02])
    assert st.comparison_verdict(clear, 0.001, 0.015).startswith("higher by 2.00 points")
    tight = st.spread([0.001, -0.001, 0.0, 0.002, -0.002, 0.001])
    assert st.comparison_verdict(tight, 0.9, 0.015) == "equivalent within ±1.5 points"
    wide = st.spread([0.05, -0.05, 0.02, -0.03])
    text = st.comparison_verdict(wide, 0.9, 0.015)
    assert text.startswith("cannot tell: differences below") and f"{100 * st.minimum_detectable_effect(wide):.1f}" in text
    assert st.comparison_verdict(st.spread([0.1]), float("nan"), 0.015) == "cannot tell: one seed"
