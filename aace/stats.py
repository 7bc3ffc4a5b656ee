"""The book's statistical rules, declared before the reference runs, on SciPy and statsmodels.

A comparison is a paired difference over seeds (each seed draws its own data subsets, the same for both arms).
Per comparison, in this order:
- "better by X" / "worse by X" when the two-sided paired t-test rejects at the Holm-adjusted level (alpha 0.05
  over its declared family);
- "equivalent within ±0.5 points" when TOST at alpha 0.05 rejects both one-sided nulls (the 90 % interval lies
  inside the margin);
- otherwise "inconclusive: compatible with [lo, hi]" (the family-adjusted interval, 1 - alpha / m).
Each verdict prints the interval its rule used (the 90 % one for TOST). The median and a Wilcoxon signed-rank p
go beside a skewed comparison as a sensitivity check (``sensitivity``).
The margin is SAM's own published gain on Fashion-MNIST (Foret et al. 2021, Table 5: WRN-28-10 with basic
augmentation, 4.57 -> 3.98 % error, 0.59 points), rounded down: a margin wider than SAM's own effect could not
separate "AACE helps as much as SAM does" from "no effect". The minimum detectable effect (MDE) is the true
difference a paired t-test finds with 80 % power at the strictest level Holm applies in the family (alpha / m).
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats as st
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestPower
from statsmodels.stats.weightstats import DescrStatsW

ALPHA = 0.05
POWER = 0.8
# Equivalence margin in accuracy (fraction): ±0.5 points, see the module's docstring for its source.
EQUIVALENCE_MARGIN = 0.005
MARGIN_SOURCE = ("SAM's own published gain on Fashion-MNIST: 0.59 points (Foret et al. 2021, Table 5, WRN-28-10, "
                 "basic augmentation, 4.57 → 3.98 % error), rounded down")


def spread(values) -> dict:
    """Mean, standard deviation, 95 % t-interval half-width, n, and the values themselves."""
    values = [float(v) for v in values]
    n = len(values)
    mean = float(np.mean(values)) if n else float("nan")
    std = float(np.std(values, ddof=1)) if n > 1 else float("nan")
    half = t_quantile(0.975, n - 1) * std / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "std": std, "ci95": half, "n": n, "values": values}


def t_quantile(q: float, dof: int) -> float:
    """The q quantile of Student's t with ``dof`` degrees of freedom (NaN below 1)."""
    return float(st.t.ppf(q, dof)) if dof >= 1 and 0 < q < 1 else float("nan")


def t95(dof: int) -> float:
    """Two-sided 95 % quantile of Student's t."""
    return t_quantile(0.975, dof)


def interval(d: dict, confidence: float = 0.95) -> tuple[float, float]:
    """The two-sided t-interval of a ``spread``'s mean."""
    if d["n"] < 2:
        return float("nan"), float("nan")
    half = t_quantile(0.5 + confidence / 2, d["n"] - 1) * d["std"] / math.sqrt(d["n"])
    return d["mean"] - half, d["mean"] + half


def p_value(d: dict) -> float:
    """Two-sided p-value of the paired t-test that the mean difference is zero (scipy.stats.ttest_1samp on
    the differences, which is scipy.stats.ttest_rel on the pairs)."""
    if d["n"] < 2:
        return float("nan")
    if not d["std"] > 0:
        return 0.0 if d["mean"] else 1.0
    if "values" in d:
        return float(st.ttest_1samp(d["values"], 0.0).pvalue)
    t = d["mean"] / (d["std"] / math.sqrt(d["n"]))
    return float(2 * st.t.sf(abs(t), d["n"] - 1))


def tost_p(d: dict, margin: float) -> float:
    """p-value of the two one-sided tests that the mean difference lies inside (-margin, +margin)
    (statsmodels' DescrStatsW.ttost_mean); below 0.05 exactly when the 90 % interval lies inside the margin."""
    if d["n"] < 2:
        return float("nan")
    if not d["std"] > 0:
        return 0.0 if abs(d["mean"]) < margin else 1.0
    return float(DescrStatsW(np.asarray(d["values"])).ttost_mean(-margin, margin)[0])


def minimum_detectable_effect(d: dict, alpha: float = ALPHA, power: float = POWER) -> float:
    """The true mean difference a two-sided paired t-test at ``alpha`` detects with ``power``, at this spread
    and n (statsmodels' TTestPower, the noncentral t)."""
    if d["n"] < 2 or not d["std"] > 0:
        return float("nan")
    effect = TTestPower().solve_power(effect_size=None, nobs=d["n"], alpha=alpha, power=power,
                                      alternative="two-sided")
    return float(effect) * d["std"]


def holm(p_values: list[float]) -> list[float]:
    """Holm-adjusted p-values (statsmodels' multipletests); NaN entries stay NaN and do not count in the family,
    so the result does not depend on the order of the list."""
    p = np.asarray(p_values, dtype=float)
    out = np.full(len(p), np.nan)
    finite = np.isfinite(p)
    if finite.any():
        out[finite] = multipletests(p[finite], alpha=ALPHA, method="holm")[1]
    return out.tolist()


def family_alpha(family_size: int, alpha: float = ALPHA) -> float:
    """The strictest level Holm applies in a family of this size (its first step): the MDE's alpha."""
    return alpha / max(1, family_size)


def adjusted_confidence(family_size: int, alpha: float = ALPHA) -> float:
    """The confidence of the family-adjusted interval that goes with a Holm-adjusted test: 1 - alpha / m, the
    level of Holm's strictest step (Bonferroni's), so that the interval excludes 0 whenever that step rejects."""
    return 1 - family_alpha(family_size, alpha)


def holm_steps(p_values: list[float]) -> list[int]:
    """Each hypothesis's Holm step, as the number of hypotheses still in play there (m for the smallest p, 1 for
    the largest): it is tested at alpha divided by that number."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    steps = [0] * len(p_values)
    for rank, i in enumerate(order):
        steps[i] = len(p_values) - rank
    return steps


def comparison_verdict(d: dict, adjusted_p: float, margin: float = EQUIVALENCE_MARGIN, scale: float = 100.0,
                       unit: str = "points", family_size: int = 1, holm_step: int | None = None) -> str:
    """The declared rule's words for one paired comparison (see the module's docstring), each with the interval
    its rule used: the family-adjusted interval (``adjusted_confidence``) beside a Holm-adjusted test, the 90 %
    interval beside TOST. ``holm_step`` (``holm_steps``): a comparison that Holm decides at a later step is shown
    with that step's interval (1 - alpha / hypotheses left), which excludes 0 as the decision says; at the
    family-adjusted level a later step's interval can reach across 0 beside a "better"."""
    if d["n"] < 2:
        return "inconclusive: one seed"

    def shown(confidence, label):
        lo, hi = interval(d, confidence)
        return f"{label} [{scale * lo:+.2f}, {scale * hi:+.2f}]"
    level = adjusted_confidence(family_size)
    adjusted = shown(level, f"{100 * level:.3g} % interval" + (f", adjusted for {family_size} comparisons"
                                                               if family_size > 1 else ""))
    if adjusted_p < ALPHA:
        if holm_step is not None and holm_step < family_size:
            step = 1 - ALPHA / holm_step
            adjusted = shown(step, f"{100 * step:.3g} % interval, Holm's step {family_size - holm_step + 1} of "
                                   f"{family_size}")
        return (f"{'better' if d['mean'] > 0 else 'worse'} by {scale * abs(d['mean']):.2f} {unit} "
                f"(Holm-adjusted p = {adjusted_p:.2g}; {adjusted})")
    if tost_p(d, margin) < ALPHA:
        return (f"equivalent within ±{scale * margin:.1f} {unit} (TOST p = {tost_p(d, margin):.2g}; "
                f"{shown(0.90, '90 % interval')})")
    lo, hi = interval(d, level)
    return f"inconclusive: compatible with [{scale * lo:+.2f}, {scale * hi:+.2f}] {unit} ({adjusted.split(' [')[0]})"


def sensitivity(d: dict) -> dict:
    """Robustness of a paired comparison to skewed differences: the median and the Wilcoxon signed-rank test's
    two-sided p (SciPy), beside the t-test's mean."""
    values = np.asarray(d["values"], dtype=float)
    if len(values) < 2 or not np.any(values):
        return {"median": float(np.median(values)) if len(values) else float("nan"), "wilcoxon_p": float("nan")}
    return {"median": float(np.median(values)), "wilcoxon_p": float(st.wilcoxon(values).pvalue)}


def skewness(d: dict) -> float:
    """Sample skewness of the paired differences (SciPy, bias-corrected)."""
    return float(st.skew(d["values"], bias=False)) if d["n"] > 2 else float("nan")


def prediction_interval(d: dict, k: int, confidence: float = 0.95) -> tuple[float, float]:
    """Where the mean of ``k`` new paired seeds should fall, given the reference's ``spread``: mean ± t *
    sd * sqrt(1/n + 1/k)."""
    if d["n"] < 2 or k < 1:
        return float("nan"), float("nan")
    half = t_quantile(0.5 + confidence / 2, d["n"] - 1) * d["std"] * math.sqrt(1 / d["n"] + 1 / k)
    return d["mean"] - half, d["mean"] + half
