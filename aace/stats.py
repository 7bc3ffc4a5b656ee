"""Statistics of the verdicts: spreads over seeds, Student's t, p-values, Holm's correction and the minimum
detectable effect of a paired comparison (SciPy is not among our dependencies)."""
from __future__ import annotations

import functools
import math

# Differences whose whole 95 % interval lies within this many accuracy points count as equivalent.
EQUIVALENCE_MARGIN = 0.015


def spread(values: list[float]) -> dict:
    """Mean, standard deviation, 95 % t-interval half-width and n of a list of numbers."""
    n = len(values)
    mean = sum(values) / n if n else float("nan")
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return {"mean": mean, "std": std, "ci95": t95(n - 1) * std / math.sqrt(n) if n > 1 else float("nan"), "n": n}


def t_cdf(t: float, dof: int) -> float:
    """Student's t distribution function, by Simpson's rule on its density (no SciPy in our dependencies):
    accurate to about 1e-9 for dof >= 1."""
    if dof < 1:
        return float("nan")
    if t < 0:
        return 1.0 - t_cdf(-t, dof)
    log_norm = math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2) - 0.5 * math.log(dof * math.pi)
    # integrate over u = atan(x) in [0, atan(t)]: the density in u is smooth and bounded
    upper, steps = math.atan(t), 2000
    h = upper / steps

    def f(u):
        x = math.tan(u)
        return math.exp(log_norm - (dof + 1) / 2 * math.log1p(x * x / dof)) * (1 + x * x)
    total = f(0) + f(upper) + sum((4 if i % 2 else 2) * f(i * h) for i in range(1, steps))
    return 0.5 + total * h / 3


@functools.lru_cache(maxsize=None)
def t_quantile(q: float, dof: int) -> float:
    """The q quantile of Student's t, by bisection on ``t_cdf``."""
    if not 0 < q < 1 or dof < 1:
        return float("nan")
    low, high = -1e3, 1e3
    for _ in range(80):
        mid = (low + high) / 2
        low, high = (mid, high) if t_cdf(mid, dof) < q else (low, mid)
    return (low + high) / 2


def t95(dof: int) -> float:
    """Two-sided 95 % quantile of Student's t."""
    return t_quantile(0.975, dof)


def p_value(d: dict) -> float:
    """Two-sided p-value of a paired t-test that the mean of a ``spread`` is zero."""
    if d["n"] < 2 or not d["std"] > 0:
        return float("nan") if d["n"] < 2 else (0.0 if d["mean"] else 1.0)
    t = abs(d["mean"]) / (d["std"] / math.sqrt(d["n"]))
    return 2 * (1 - t_cdf(t, d["n"] - 1))


def minimum_detectable_effect(d: dict, power: float = 0.8, alpha: float = 0.05) -> float:
    """Smallest true mean difference a paired t-test of this spread and n detects with ``power``
    (two-sided ``alpha``): (t_{1-alpha/2} + t_{power}) * sd / sqrt(n)."""
    if d["n"] < 2:
        return float("nan")
    dof = d["n"] - 1
    return (t_quantile(1 - alpha / 2, dof) + t_quantile(power, dof)) * d["std"] / math.sqrt(d["n"])


def holm(p_values: list[float]) -> list[float]:
    """Holm-adjusted p-values for a family of comparisons (step-down, monotone)."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [float("nan")] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def comparison_verdict(d: dict, adjusted_p: float, margin: float, scale: float = 100.0, unit: str = "points") -> str:
    """What a paired comparison could see: a difference, equivalence within ``margin``, or 'cannot tell'
    with the minimum detectable effect."""
    if d["n"] < 2:
        return "cannot tell: one seed"
    if adjusted_p < 0.05:
        return f"{'higher' if d['mean'] > 0 else 'lower'} by {scale * abs(d['mean']):.2f} {unit} (Holm-adjusted p = {adjusted_p:.2g})"
    if abs(d["mean"]) + d["ci95"] <= margin:
        return f"equivalent within ±{scale * margin:.1f} {unit}"
    return (f"cannot tell: differences below {scale * minimum_detectable_effect(d):.1f} {unit} are not detectable "
            f"here")
