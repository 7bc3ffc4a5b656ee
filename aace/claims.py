"""The abstract's claims against the main comparison's runs: one row per claim with its effect, 95 % interval,
minimum detectable effect, Holm-adjusted p-value and verdict (the claims page and the introduction show it)."""
from __future__ import annotations

import math

from . import experiments as ex, stats
from .analysis import fraction_below
from .comparison import Comparison


def _log_ratio(run_, column: str = "grad_norm") -> float:
    """log(last-quarter mean / first-quarter mean) of a per-epoch metric."""
    return math.log(ex.quarter_ratio(run_, column))


def small_share(run_, small_gradient: float) -> float:
    """Share of the last quarter's steps whose ‖g‖ is below ``small_gradient`` x the first epoch's mean."""
    steps = run_.steps
    first_mean = float(steps[steps.epoch == 1].grad_norm.mean())
    last = steps[steps.epoch > run_.config.epochs * 3 // 4].grad_norm
    return fraction_below(last, small_gradient * first_mean)


def late_variation(run_) -> float:
    """Coefficient of variation of the per-step ‖g‖ over the last quarter: how much it oscillates."""
    last = run_.steps[run_.steps.epoch > run_.config.epochs * 3 // 4].grad_norm
    return float(last.std() / last.mean())


def _direction(d: dict, p: float, better: str = "higher") -> str:
    """'holds', 'reversed' or 'inconclusive: compatible with [lo, hi]' for an effect whose claimed sign is
    ``better``: a non-significant test never reads 'holds'."""
    if d["n"] < 2:
        return "inconclusive: one seed"
    if p < 0.05:
        return "holds" if (d["mean"] > 0) == (better == "higher") else "reversed"
    lo, hi = stats.interval(d)
    return f"inconclusive: compatible with [{lo:+.3g}, {hi:+.3g}]"


def _ci(d: dict, scale: float = 1.0, digits: int = 3) -> str:
    return f"{scale * d['mean']:+.{digits}f} ± {scale * d['ci95']:.{digits}f}" if d["n"] > 1 else \
        f"{scale * d['mean']:+.{digits}f} (1 seed)"


IMPLEMENTATION, EMPIRICAL = "check", "empirical"  # a check of the implementation; an empirical claim


def evaluate(comparison: Comparison, small_gradient: float = 0.1):
    """The claims table (a DataFrame indexed by claim) of a comparison with SAM and SAM+AACE arms.

    Claims 1 and 3b follow from the loss's formula: they check the implementation (each its own test, no family).
    Claims 2 and 3a are empirical, one Holm family; claim 4 is the AACE question's comparison, with that family's
    p and verdict (``aace.verdicts``), so that it reads the same here as on the comparison page."""
    import pandas as pd

    from .verdicts import name, verdicts
    sam, aace = comparison.runs["SAM"], comparison.runs["SAM+AACE"]
    sam_ok, aace_ok = [r for r in sam if r.finished], [r for r in aace if r.finished]
    growth = ex.spread([ex.quarter(r, "aace_loss", "last") - ex.quarter(r, "aace_loss", "first") for r in aace_ok])
    cosine = ex.paired(sam, aace, lambda r: ex.quarter(r, "perturbation_cosine", "last"))
    premise = ex.spread([_log_ratio(r) for r in sam_ok])
    aace_grad = ex.spread([_log_ratio(r) for r in aace_ok])
    accuracy = ex.paired_difference(sam, aace, ex.FINAL_TEST)
    adjusted = stats.holm([stats.p_value(cosine), stats.p_value(premise)])
    p = {"growth": stats.p_value(growth), "aace_grad": stats.p_value(aace_grad), "cosine": adjusted[0],
         "premise": adjusted[1]}
    question = verdicts(comparison.by_key(), "final")
    row = question[question["comparison"] == name("aace", "sam")].iloc[0]
    p["accuracy"], accuracy_verdict = row["Holm-adjusted p"], row["verdict"]

    share = ex.spread([small_share(r, small_gradient) for r in sam_ok])["mean"]
    wiggle = ex.spread([late_variation(r) for r in sam_ok])["mean"]
    ratio = math.exp(premise["mean"]) if premise["n"] else float("nan")
    if premise["n"] > 1 and p["premise"] < 0.05 and premise["mean"] < 0:
        premise_verdict = ("holds: it fades" if share >= 0.5 else
                           f"partly: ‖g‖ shrinks to {ratio:.2f}x but does not vanish ({100 * share:.0f} % of late "
                           f"steps below {small_gradient:g}x the first epoch's mean)")
    elif premise["n"] > 1 and p["premise"] < 0.05:
        premise_verdict = "does not hold: ‖g‖ grows"
    else:
        premise_verdict = _direction(premise, p["premise"], "lower")
    aace_verdict = _direction(aace_grad, p["aace_grad"])
    aace_verdict = {"holds": "holds: it grows", "reversed": "does not hold: it diminishes"}.get(aace_verdict, aace_verdict)
    rows = [
        ("1. AACE's loss grows near convergence", IMPLEMENTATION,
         "AACE loss at w, last minus first quarter of epochs (SAM+AACE)", _ci(growth),
         _direction(growth, p["growth"]), p["growth"], stats.minimum_detectable_effect(growth)),
        ("2. More consistent perturbation direction", EMPIRICAL,
         "cos(e_t, e_t-1), last quarter, SAM+AACE − SAM (paired)",
         _ci(cosine), _direction(cosine, p["cosine"]), p["cosine"], stats.minimum_detectable_effect(cosine, 0.025)),
        ("3a. Premise: SAM's CE gradient fades near convergence", EMPIRICAL,
         f"log(‖g‖ last quarter / first quarter) in SAM runs (ratio {ratio:.2f}x; per-step variation over the last "
         f"quarter {wiggle:.2f})", _ci(premise), premise_verdict, p["premise"],
         stats.minimum_detectable_effect(premise, 0.025)),
        ("3b. AACE's perturbation gradient does not diminish", IMPLEMENTATION,
         f"log(‖g‖ last quarter / first quarter) in SAM+AACE runs (ratio "
         f"{math.exp(aace_grad['mean']) if aace_grad['n'] else float('nan'):.2f}x)", _ci(aace_grad),
         aace_verdict, p["aace_grad"], stats.minimum_detectable_effect(aace_grad)),
        ("4. Better generalisation than SAM", EMPIRICAL,
         f"final test accuracy (points), SAM+AACE − SAM (paired, {ex.final_test_size(aace[0]):,} test images)",
         _ci(accuracy, 100, 2), accuracy_verdict, p["accuracy"], row["MDE (points)"]),
    ]
    table = pd.DataFrame([{"claim": c, "kind": k, "measured": m, "effect ± 95 % CI": e, "MDE": f"{mde:.3g}",
                           "p": f"{pv:.2g}", "verdict": v} for c, k, m, e, v, pv, mde in rows])
    return table.set_index("claim")


def scale(comparison: Comparison) -> str:
    """Where the claims were measured, in a few words."""
    first = next(iter(comparison.runs.values()))[0]
    c = first.config
    data = f"{c.train_subset:,} training images" if c.train_subset else "all training images"
    from .formatting import count, dataset
    return (f"{dataset(c.dataset)}, {c.model.upper()}, {data}, {c.epochs} epochs, {count(len(comparison.runs['SAM']), 'seed')}, "
            f"{'rho tuned per method' if comparison.tuned else 'default rhos'}")
