"""The book's declared questions and the verdicts on them (the rule itself is ``aace.stats``'s).

Declared before the reference runs (issue 23): two questions, each one Holm family, each scored two ways. The
positive control comes first: on a testbed where SAM does not beat SGD, nothing can be said about whether a
better perturbation helps SAM, and every AACE verdict there says so. The same comparison has the same family,
so the same p and verdict, on every page. A third question, declared before its runs (issue 30, item 3), on the
testbeds whose plans run the crossed arms: does AACE's *direction* help at equal step length, or is its gain the
longer step? Normalised AACE − SAM at each of the two arms' chosen rhos, and SAM at the larger rho − SAM.

The primary scoring is final-epoch accuracy on the whole test set (``PRIMARY``); the best-epoch scoring is a
sensitivity analysis, on the test subset the runs score during training.
"""
from __future__ import annotations

from . import stats
from .study import ALL_ARMS

# The questions, each one Holm family: (a, b) reads "a − b".
FAMILIES = {
    "positive control": (("sam", "sgd"),),
    "AACE": (("aace", "sam"), ("aace_normalised", "sam"), ("aace", "sgd_ls")),
    "direction vs step length": (("aace_normalised_at_sam_rho", "sam"), ("aace_normalised", "sam_at_normalised_rho"),
                                 ("sam_at_normalised_rho", "sam")),
    # Declared before the long-tailed study's runs (issue 34): does a minority-aware loss in either SAM pass do
    # better than SAM, and than SAM+AACE? (Its testbed's AACE question is the "AACE" family's first comparison.)
    "weighted CE in SAM": (("sam_ewce_ascent", "sam"), ("sam_ewce_update", "sam"), ("sam_ewce_ascent", "aace")),
}
# The long-tailed testbed's scorings besides PRIMARY (there the whole test set is balanced, 1,000 images a class,
# so final-epoch accuracy is balanced accuracy): the mean test accuracy of each class group (aace.plans.CLASS_GROUPS)
# in the last epoch. The prediction under test: SAM+AACE − SAM below zero on the tail, near zero on the head.
GROUP_SCORINGS = ("head", "medium", "tail")
PRIMARY = "final"
SCORINGS = {
    "final": "primary: final-epoch accuracy on the whole test set",
    "best": "sensitivity analysis: test accuracy at the epoch of best validation accuracy (chosen on the "
            "validation split, never on the test set), on the 1,000-image test subset the runs score during "
            "training",
}
# The direction-versus-length readings, by which of its contrasts the rule calls 'better': direction when AACE's
# direction beats SAM's at both step lengths, length when SAM's own larger step beats its smaller one.
READINGS = {(True, True): "both", (True, False): "direction", (False, True): "length", (False, False): "neither"}
NO_CONTROL = "this testbed cannot see SAM's own effect"


def score(run_, scoring: str) -> float:
    """A run's accuracy under a declared scoring (NaN for a run that did not finish)."""
    from .experiments import FINAL_TEST, final_value
    if not run_.finished:
        return float("nan")
    if scoring == "final":
        return final_value(run_, FINAL_TEST)
    if scoring in GROUP_SCORINGS:
        from .plans import CLASS_GROUPS
        by_class = run_.summary.get("test_accuracy_by_class")
        if not by_class:
            return float("nan")
        return sum(by_class[c] for c in CLASS_GROUPS[scoring]) / len(CLASS_GROUPS[scoring])
    scored = run_.metrics.dropna(subset=["val_acc"])
    return float(scored.loc[scored["val_acc"].idxmax(), "test_acc"])  # the earliest epoch among ties


def paired(finals_: dict, a: str, b: str, scoring: str) -> dict:
    """``stats.spread`` of a − b over the seeds both arms finished (a diverged run drops its seed)."""
    by_seed = {r.config.seed: score(r, scoring) for r in finals_[b]}
    values = [score(r, scoring) - by_seed[r.config.seed] for r in finals_[a] if r.config.seed in by_seed]
    return stats.spread([v for v in values if v == v])


def name(a: str, b: str) -> str:
    return f"{ALL_ARMS[a].name} − {ALL_ARMS[b].name}"


def verdicts(finals_: dict, scoring: str = PRIMARY):
    """One row per declared comparison: its family, name, arm keys (a, b), effect, 95 % interval, n, MDE at the
    family's Holm level, Holm-adjusted p and the rule's verdict; the AACE family's verdicts carry the positive
    control's outcome."""
    import pandas as pd
    rows, control_seen = [], None
    for family, pairs in FAMILIES.items():
        pairs = [(a, b) for a, b in pairs if a in finals_ and b in finals_ and not _same_runs(finals_, a, b)]
        if not pairs:  # a question this testbed's plan does not ask
            continue
        diffs = [paired(finals_, a, b, scoring) for a, b in pairs]
        raw = [stats.p_value(d) for d in diffs]
        adjusted = stats.holm(raw)
        for (a, b), d, p, step in zip(pairs, diffs, adjusted, stats.holm_steps(raw)):
            verdict = stats.comparison_verdict(d, p, family_size=len(pairs), holm_step=step)
            if family == "positive control":
                control_seen = verdict.startswith("better")
            elif control_seen is False:
                verdict += f"; {NO_CONTROL}"
            lo, hi = stats.interval(d)
            robust = stats.sensitivity(d)
            rows.append({"question": family, "comparison": name(a, b), "arms": (a, b),
                         "effect (points)": 100 * d["mean"],
                         "95 % interval": f"[{100 * lo:+.2f}, {100 * hi:+.2f}]", "paired seeds": d["n"],
                         "MDE (points)": 100 * stats.minimum_detectable_effect(d, stats.family_alpha(len(pairs))),
                         "Holm-adjusted p": p, "verdict": verdict, "median (points)": 100 * robust["median"],
                         "Wilcoxon p": robust["wilcoxon_p"], "skewness": stats.skewness(d)})
    return pd.DataFrame(rows)


def _same_runs(finals_: dict, a: str, b: str) -> bool:
    """Whether two arms are the same runs (a crossed arm when both arms chose one rho): no comparison to make."""
    return len(finals_[a]) == len(finals_[b]) and all(x is y for x, y in zip(finals_[a], finals_[b]))


def reading(table) -> str | None:
    """Which reading of AACE's gain the direction-versus-length verdicts support ('direction', 'length', 'both',
    'neither'); None when the testbed did not run that question."""
    rows = table[table["question"] == "direction vs step length"]
    if len(rows) < 3:
        return None
    better = rows["verdict"].str.startswith("better").tolist()
    return READINGS[(better[0] and better[1], better[2])]


def prediction_reading(head, tail) -> str:
    """The issue's prediction, read by the declared rule from SAM+AACE − SAM's verdicts on the head and the tail
    classes (``verdicts`` tables under the 'head' and 'tail' scorings), declared before the long-tailed
    study's runs: 'supported' when the tail verdict is 'worse' and the head's neither 'better' nor 'worse';
    'contradicted' when the tail verdict is 'better' or 'equivalent'; otherwise 'not decided' by these seeds. Where
    SAM does not beat SGD under a scoring (the positive control), nothing is decided."""
    words = []
    for table in (head, tail):
        rows = table[table["comparison"] == name("aace", "sam")]
        if rows.empty or NO_CONTROL in rows["verdict"].iloc[0]:
            return "not decided"
        words.append(rows["verdict"].iloc[0].split(" ")[0].rstrip(":"))
    head_word, tail_word = words
    if tail_word == "worse" and head_word not in ("better", "worse"):
        return "supported"
    if tail_word in ("better", "equivalent"):
        return "contradicted"
    return "not decided"
