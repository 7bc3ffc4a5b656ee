"""What the evidence pages show of a reference study: its declared comparisons as sentences and tables, the paired
values behind each, the direction-versus-length reading, and the sensitivity analyses (best-epoch scoring, the
pilot's seeds left out, underfitting seeds). Every number comes from the study's committed export."""
from __future__ import annotations

from .stats import EQUIVALENCE_MARGIN
from .verdicts import FAMILIES, NO_CONTROL, PRIMARY, name, paired, reading, verdicts

# A run "underfits" when it ends below this training accuracy on its own training labels (clean testbed): the
# paper's argument is about the end of training, which such a run has not reached.
UNDERFIT_TRAIN_ACC = 0.95
# The seeds the noise pilot (scripts/pilot_noise.py) saw test accuracy on before the grids were centred: they are
# final seeds of the noise study too, so the effect is also given without them (a threat to validity).
PILOT_SEEDS = (0, 1)


def comparison_values(finals: dict, scoring: str = PRIMARY) -> dict:
    """{comparison name: each paired seed's difference in points}, for the declared comparisons whose arms ran."""
    out = {}
    for pairs in FAMILIES.values():
        for a, b in pairs:
            if a in finals and b in finals:
                values = paired(finals, a, b, scoring)["values"]
                if any(values):
                    out[name(a, b)] = [100 * v for v in values]
    return out


def shown_table(table):
    """The verdict table as a reader reads it: question, comparison, effect, n, MDE, verdict (with the interval
    its rule used), and the median and Wilcoxon p as a sensitivity check."""
    out = table[["question", "comparison", "effect (points)", "paired seeds", "MDE (points)", "verdict",
                 "median (points)", "Wilcoxon p"]].copy()
    out["effect (points)"] = out["effect (points)"].map(lambda v: f"{v:+.2f}")
    out["MDE (points)"] = out["MDE (points)"].map(lambda v: f"{v:.2f}")
    out["median (points)"] = out["median (points)"].map(lambda v: f"{v:+.2f}")
    out["Wilcoxon p"] = out["Wilcoxon p"].map(lambda v: f"{v:.2g}")
    return out.rename(columns={"paired seeds": "n"}).set_index(["question", "comparison"])


def row(table, a: str, b: str):
    """The verdict row of comparison a − b, or None."""
    rows = table[table["comparison"] == name(a, b)]
    return None if rows.empty else rows.iloc[0]


def effect_sentence(table, a: str, b: str) -> str:
    """'+2.68 points over 50 paired seeds, better by ...' for one comparison ('' when absent)."""
    r = row(table, a, b)
    if r is None:
        return ""
    return f"{r['effect (points)']:+.2f} points over {r['paired seeds']} paired seeds, {r['verdict']}"


READING_WORDS = {
    "direction": "AACE's direction helps at equal step length, and SAM's own longer step does not: the gain is the "
                 "direction's",
    "length": "a longer step helps SAM too, and AACE's direction adds nothing at equal length: the gain is the step "
              "length's, a regularisation reading",
    "both": "AACE's direction helps at equal step length, and a longer step helps SAM too: both contribute",
    "neither": "neither AACE's direction at equal length nor SAM's longer step is shown to help by the declared rule",
}


def reading_sentence(table, chosen: dict | None) -> str:
    """The direction-versus-length question's answer, or why the testbed cannot give one."""
    which = reading(table)
    if which is not None:
        return f"**Direction or step length:** {READING_WORDS[which]}."
    chosen = chosen or {}
    if "sam" in chosen and "aace_normalised" in chosen and chosen["sam"]["rho"] == chosen["aace_normalised"]["rho"]:
        return ("**Direction or step length:** SAM and normalised AACE chose the same rho, so they already run at "
                "equal step length: normalised AACE − SAM is the direction's effect, and the length contrast is "
                "empty.")
    return ("**Direction or step length:** not answered by this export (its plan ran no crossed arms); the "
            "`cpu-noise-reference` plan runs them.")


def without_seeds(finals: dict, seeds=PILOT_SEEDS, scoring: str = PRIMARY):
    """The verdict table with the given seeds left out of every arm."""
    return verdicts({k: [r for r in rs if r.config.seed not in seeds] for k, rs in finals.items()}, scoring)


def underfit_seeds(finals: dict, key: str, threshold: float = UNDERFIT_TRAIN_ACC) -> list[int]:
    """The seeds whose run of arm ``key`` ended below ``threshold`` training accuracy."""
    return sorted(r.config.seed for r in finals.get(key, []) if r.finished and r.summary.get("train_acc", 1.0) < threshold)


def testbed_relative(table) -> str:
    """Whether SAM+AACE − SAM's family-adjusted interval excludes losing SAM's own gain over SGD (the clean
    testbed's reading: is the interval tight enough to rule out AACE undoing what SAM adds?)."""
    control, aace = row(table, "sam", "sgd"), row(table, "aace", "sam")
    if control is None or aace is None:
        return ""
    gain = control["effect (points)"]
    lo = float(aace["95 % interval"].strip("[]").split(",")[0])
    excluded = lo > -gain
    return (f"Relative to this testbed: SAM's own gain over SGD here is {gain:+.2f} points; SAM+AACE − SAM's 95 % "
            f"interval starts at {lo:+.2f}, so it {'excludes' if excluded else 'does not exclude'} losing all of "
            f"SAM's gain.")


def best_epoch_table(finals: dict):
    """The sensitivity analysis: the verdicts under best-epoch scoring (on the 1,000-image test subset)."""
    return verdicts(finals, "best")


def skewed(table, limit: float = 1.0) -> list[str]:
    """The comparisons whose paired differences are skewed (|skewness| above ``limit``)."""
    return [r["comparison"] for _, r in table.iterrows() if abs(r["skewness"]) > limit]


def stages(finals: dict, a: str, b: str, first: int = 10, scoring: str = PRIMARY) -> dict:
    """The two-stage design's check: a − b over the first ``first`` seeds (the first look) and over the rest."""
    early = {k: [r for r in rs if r.config.seed < first] for k, rs in finals.items()}
    late = {k: [r for r in rs if r.config.seed >= first] for k, rs in finals.items()}
    return {"first": paired(early, a, b, scoring), "rest": paired(late, a, b, scoring)}


def published_fashion_mnist_sam() -> str:
    """The SAM paper's Fashion-MNIST accuracy (WRN-28-10, basic augmentation), with its source."""
    from .experiments import published_results
    t = published_results()
    rows = t[(t["dataset"] == "fashionmnist") & (t["augmentation"] == "basic") & (t["method"] == "SAM")]
    if rows.empty:
        return "not available"
    r = rows.iloc[0]
    return f"{100 - float(r['value']):.2f} % ({r['source']}, {r['model']})"


def authors_logs() -> list[str]:
    """The closest evidence at the paper's scale: the authors' own training logs, one line per method, with
    source, setting and the number of runs (aace/reference/published_results.csv)."""
    from .experiments import published_results
    t = published_results()
    rows = t[t["source"].str.contains("training logs")]
    out = []
    if rows.empty:
        return []
    first = rows.iloc[0]
    for _, r in rows.iterrows():
        spread = f" ± {r['spread'].split(' ')[0]} (SD)" if r["spread"] else ""
        epochs = "" if r["epochs"] == first["epochs"] else f", {r['epochs']} epochs"
        out.append(f"{r['method']} {r['value']} %{spread} ({r['n_runs']} run{'s' if r['n_runs'] != '1' else ''}"
                   f"{epochs})")
    return [f"{'; '.join(out)}: {first['dataset'].upper().replace('CIFAR', 'CIFAR-')}, {first['model']}, "
            f"{first['epochs']} epochs, final-epoch test accuracy ({first['source']})"]


def class_frame(finals: dict):
    """One row per final run and class of a long-tailed study: arm, seed, class, its training images, its share of
    the training images, test accuracy (%) and share of the perturbation (%), from what each run recorded at its end.
    ``finals``: {arm name: runs}."""
    import pandas as pd
    rows = []
    for arm, runs in finals.items():
        for r in runs:
            counts = r.config.class_counts()
            accuracy, shares = r.summary.get("test_accuracy_by_class"), r.summary.get("perturbation_share_by_class")
            if not (r.finished and counts and accuracy):
                continue
            for c, n in enumerate(counts):
                rows.append({"arm": arm, "seed": r.config.seed, "class": c, "training images": n,
                             "share of the training images (%)": 100 * n / sum(counts),
                             "test accuracy (%)": 100 * accuracy[c],
                             "perturbation share (%)": 100 * shares[c] if shares else float("nan")})
    return pd.DataFrame(rows)


def imbalance_finding(tables: dict, word: str) -> str:
    """The long-tailed page's finding: three plain sentences (the prediction's reading by the declared rule, and why
    when SAM does not beat SGD; SAM+AACE − SAM on the tail classes; the largest other declared effect and what it
    does to the head and the tail), then each of those verdicts with the interval its rule used. ``tables``:
    {scoring: verdict table} for the primary scoring and the class groups; ``word``:
    ``verdicts.prediction_reading``'s answer."""
    primary, tail, head = tables[PRIMARY], tables["tail"], tables["head"]
    control, aace_tail = row(primary, "sam", "sgd"), row(tail, "aace", "sam")
    shown = [("SAM − SGD", "balanced accuracy", control), ("SAM+AACE − SAM", "tail classes", aace_tail),
             ("SAM+AACE − SAM", "balanced accuracy", row(primary, "aace", "sam"))]
    first = f"The prediction that AACE starves SAM's tail classes is *{word}* by the rule declared before the runs"
    if NO_CONTROL in aace_tail["verdict"]:
        itself = "does worse than" if _word(control) == "worse" else "is not shown to beat"
        first += (f": on this testbed SAM itself {itself} SGD on balanced accuracy, and the rule reads AACE's effect "
                  f"on SAM only where SAM's own effect shows")
    moved = {"better": "SAM+AACE does better than SAM", "worse": "SAM+AACE does worse than SAM",
             "equivalent": f"SAM+AACE and SAM are equivalent within ±{100 * EQUIVALENCE_MARGIN:.1f} points",
             "inconclusive": "SAM+AACE and SAM do not differ detectably"}[_word(aace_tail)]
    sentences = [first, f"On the tail classes, where AACE was predicted to hurt, {moved} "
                        f"({aace_tail['effect (points)']:+.2f} points)"]
    others = primary[~primary["comparison"].isin([name("sam", "sgd"), name("aace", "sam")])]
    if not others.empty:
        largest = others.loc[others["effect (points)"].abs().idxmax()]
        h, t = row(head, *largest["arms"]), row(tail, *largest["arms"])
        third = (f"The largest other declared effect is {largest['comparison']}: "
                 f"{largest['effect (points)']:+.2f} points of balanced accuracy")
        if h is not None and t is not None:
            he, te = h["effect (points)"], t["effect (points)"]
            lost, gained = (("head classes", he), ("tail", te)) if he < 0 else (("tail classes", te), ("head", he))
            third += (f", trading {abs(lost[1]):.2f} points on the {lost[0]} for {gained[1]:.2f} on the {gained[0]}"
                      if he * te < 0 else f", {he:+.2f} points on the head classes and {te:+.2f} on the tail")
        sentences.append(third)
        shown.append((largest["comparison"], "balanced accuracy", largest))
    verdict_lines = "\n".join(f"- {c}, {scoring}: {r['verdict'].replace(f'; {NO_CONTROL}', '')}"
                               for c, scoring, r in shown)
    return f"**Finding.** {'. '.join(sentences)}.\n\nBy the declared rule:\n{verdict_lines}"


def _word(verdict_row) -> str:
    """'better', 'worse', 'equivalent' or 'inconclusive': the first word of a verdict."""
    return verdict_row["verdict"].split(" ")[0].rstrip(":")


# The noise study's first version (2 tuning seeds, SAM's grid coarser than AACE's: 0.05, 0.1, 0.2, 0.5), which the
# reference study grew from (issue 30, item 2); kept so that the noise page can show what fair tuning changed.
FIRST_NOISE_STUDY = "results/cpu-fashion-mnist-noise-50"


def first_noise_study(profile: str):
    """(verdict table, chosen values) of the noise study's first version, read from its export and checked against
    its recorded digests; None for a profile other than 'cpu' or when the export cannot be read."""
    from .paths import ROOT
    from .results import final_runs, read_export
    if profile != "cpu":
        return None
    study, runs, problems = read_export(ROOT / FIRST_NOISE_STUDY)
    if study is None:
        return None
    finals = {k: sorted(rs, key=lambda r: r.config.seed) for k, rs in final_runs({**study, "runs": runs}, runs).items()}
    return verdicts(finals), study["chosen"]
