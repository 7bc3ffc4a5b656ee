"""What the notebooks call: build the runs a page needs, train the missing ones, summarise over seeds."""
from __future__ import annotations

import math
import os

from . import formatting as fmt
from .config import Arm, RunConfig, profile_config  # Arm: the pages call it as ex.Arm
from .stats import minimum_detectable_effect, spread  # spread: the pages call it as ex.spread
from .store import Run
from .train import run

# Seeds per profile for the main comparison; ablations use the first one.
DEFAULT_SEEDS = {"paper": [42], "cpu": [0, 1, 2], "smoke": [0]}


MAIN_ARMS = {
    "sgd": Arm.of("SGD", method="sgd"),
    "sam": Arm.of("SAM", method="sam"),
    "aace": Arm.of("SAM+AACE", method="aace"),
}


# The label-noise chapter: SAM+CE, SAM+AACE, and SAM with a related loss in one of its two passes.
NOISE_ARMS = {"sam": MAIN_ARMS["sam"], "aace": MAIN_ARMS["aace"], **{
    f"{loss}_{role}": Arm.of(f"SAM, {title} {role}", method="sam", **{field: loss})
    for loss, title in (("taylor_ce", "Taylor-CE"), ("focal", "focal"), ("dual_focal", "dual focal"))
    for role, field in (("ascent", "perturbation_loss"), ("update", "update_loss"))}}
# Its setting on top of the profile. On 2 CPU cores 3 seeds x 3 noise levels x 4 arms at the full 'cpu'
# profile would take about 30 minutes, as long as the rest of the book; the chapter trains 128 images for
# 120 steps (batch 32) instead: enough for SAM to fit 40 % noisy labels completely, in about 7 s a run.
# No validation split (nothing is tuned here) and a test score every epoch (the drop from the best epoch).
NOISE_SETTING = {"paper": {}, "cpu": dict(train_subset=128, batch_size=32, epochs=30, test_subset=250, val_subset=None,
                                          eval_every=1, final_full_test=False),
                 "smoke": dict(epochs=2, val_subset=None)}


def check_choice(name: str, value, allowed) -> None:
    """Raise a ValueError naming a notebook parameter and the values it allows."""
    values = value if isinstance(value, (list, tuple)) else [value]
    bad = [v for v in values if v not in allowed]
    if bad or (isinstance(value, (list, tuple)) and not value):
        raise ValueError(f"parameter {name!r}: expected values from {list(allowed)}, got {value!r}")


def resolve_seeds(profile: str, seeds) -> list[int]:
    if seeds is None:
        if profile not in DEFAULT_SEEDS:
            raise ValueError(f"parameter 'profile': expected one of {list(DEFAULT_SEEDS)}, got {profile!r}")
        return DEFAULT_SEEDS[profile]
    if not (isinstance(seeds, (list, tuple)) and seeds and all(isinstance(s, int) and s >= 0 for s in seeds)):
        raise ValueError(f"parameter 'seeds': expected a non-empty list of integers >= 0 or None, got {seeds!r}")
    return list(seeds)


def configs(profile: str, arms: list[Arm], seeds: list[int], **overrides) -> dict[Arm, list[RunConfig]]:
    """RunConfigs for every arm and seed; the arm's settings win over the page-wide overrides."""
    return {arm: [profile_config(profile, **{**overrides, **dict(arm.settings), "seed": s}) for s in seeds]
            for arm in arms}


def ensure(grid: dict[Arm, list[RunConfig]], runs_dir=None, workers: int | None = None,
           found=None) -> dict[Arm, list[Run]]:
    """Train whatever the store does not hold yet; return the runs arm by arm. ``found(config)``: a finished
    run read in place from elsewhere (a reference study's export, ``aace.results.runs_in_export``), else None.

    Missing single-threaded CPU runs (the ``cpu`` and ``smoke`` profiles) train ``workers`` at a time (default:
    one per core) through the study's worker pool; others one after another in this process.
    Progress goes where ``aace.progress`` says (``python -m aace book``'s output), never into the notebook.
    """
    from .pool import run_pool
    from .progress import progress_stream
    from .train import is_stored, resolve_device
    terminal = progress_stream()
    try:
        elsewhere = {c: found(c) for cfgs in grid.values() for c in cfgs} if found else {}
        missing = [c for cfgs in grid.values() for c in cfgs if elsewhere.get(c) is None and not is_stored(c, runs_dir)]
        workers = workers or len(os.sched_getaffinity(0))
        # SGD's runs last, the longest first: a SAM run takes about twice as long (two passes a step), and started
        # last it would leave the other core idle while it ends.
        pooled = sorted((c for c in missing if c.threads == 1 and resolve_device(c.device).type == "cpu"),
                        key=lambda c: c.method == "sgd")
        if len(pooled) > 1 and workers > 1:
            def log(line):
                if terminal is not None:
                    print(line, file=terminal, flush=True)
            run_pool(pooled, runs_dir, min(workers, len(pooled)), log=log)
        return {arm: [elsewhere.get(c) or run(c, runs_dir, progress=terminal or False) for c in cfgs]
                for arm, cfgs in grid.items()}
    finally:
        if terminal is not None:
            terminal.close()


# The final test accuracy a comparison reports: on the whole test set where the run scored it there
# (RunConfig.final_full_test), else the last epoch's (on the run's test subset, if it has one).
FINAL_TEST = "final_test_acc"


def final_value(run_: Run, column: str) -> float:
    """A run's final value of a metric: the last epoch's, or ``FINAL_TEST`` (see there)."""
    if column == FINAL_TEST:
        return float(run_.summary.get("full_test_acc", run_.metrics["test_acc"].iloc[-1]))
    return float(run_.metrics[column].iloc[-1])


def final_test_size(run_: Run) -> int:
    """How many test images ``FINAL_TEST`` was measured on."""
    return int(run_.summary.get("full_test_size", run_.info.get("test_size", 0)))


def final(runs: list[Run], column: str) -> list[float]:
    """The final value of a metric for each finished run (diverged runs are left out)."""
    return [final_value(r, column) for r in runs if r.finished]


def format_spread(s: dict, scale: float = 100.0, digits: int = 2) -> str:
    """'mean ± half-width of the 95 % t-interval (n=...)': short enough for a table cell."""
    if s["n"] == 0:
        return "diverged"
    if math.isnan(s["mean"]):
        return "n/a"
    if s["n"] == 1:
        return f"{scale * s['mean']:.{digits}f} (1 run)"
    return f"{scale * s['mean']:.{digits}f} ± {scale * s['ci95']:.{digits}f} (n={s['n']})"


def format_runs(runs: list[Run], column: str = "test_acc", scale: float = 100.0, digits: int = 2) -> str:
    """Final-epoch spread over the finished runs, saying how many diverged: never a number for those."""
    diverged = sum(r.status == "diverged" for r in runs)
    if diverged == len(runs):
        return f"diverged ({diverged} of {len(runs)} runs)"
    text = format_spread(spread(final(runs, column)), scale, digits)
    return text + (f"; {diverged} of {len(runs)} runs diverged" if diverged else "")


def paired_values(a: list[Run], b: list[Run], column: str = "test_acc") -> list[float]:
    """b - a, seed by seed, over the seeds present and finished in both."""
    by_seed_a = {r.config.seed: r for r in a if r.finished}
    return [final_value(r, column) - final_value(by_seed_a[r.config.seed], column)
            for r in b if r.finished and r.config.seed in by_seed_a]


def paired_difference(a: list[Run], b: list[Run], column: str = "test_acc") -> dict:
    """Mean of (b - a) over seeds present and finished in both, with a paired 95 % t-interval."""
    return spread(paired_values(a, b, column))


def describe(config: RunConfig) -> str:
    """Where a number came from: the profile-level facts a reader needs beside a cell."""
    from . import formatting as fmt
    test = f"{config.test_subset:,}" if config.test_subset else "all"
    subset = f"{config.train_subset:,} training / {test} test images" if config.train_subset else "the full data set"
    if config.imbalance_ratio > 1:  # train_subset is the balanced pool the long-tailed subset is cut from
        subset = f"its training images cut from a {config.train_subset:,}-image balanced pool, {test} test images"
    variant = "" if config.model_variant == "standard" else f" ({config.model_variant}'s variant)"
    return f"{config.model.upper()}{variant}, {config.epochs} epochs, {subset}, {config.lr_schedule} learning-rate " \
           f"schedule, {fmt.augment(config.augment)}"


def published_results():
    """Published numbers (the AACE authors' logs, the SAM paper, davda54/sam), one row each, with source."""
    from importlib import resources

    import pandas as pd
    with resources.files("aace").joinpath("reference/published_results.csv").open() as f:
        return pd.read_csv(f, dtype=str, keep_default_na=False)


def published_for(dataset: str, family: str):
    """Published rows for one of our dataset names and a model family ('WRN' or 'PyramidNet')."""
    table = published_results()
    name = dataset.replace("_", "")
    keep = table["dataset"].str.split(";").apply(lambda ds: name in ds) & table["model"].str.contains(family)
    return table[keep]


# What Tables 2 and 3 run by default, per profile. The paper's tables cover four datasets; on 2 CPU
# cores only the embedded default is affordable, and PyramidNet (slow on a CPU: many small layers)
# gets a quarter of the epochs there (about 30 s a run) and one seed: three seeds (a minimum detectable effect
# of several points) could carry no verdict either, so the page shows an indication in a third of the time.
TABLES = {
    "table2": {"family": "WRN",
               "paper": dict(datasets=["cifar10", "cifar100", "fashion_mnist", "food101"], model="wrn-28-10"),
               "cpu": dict(datasets=["fashion_mnist"]), "smoke": dict(datasets=["fashion_mnist"])},
    "table3": {"family": "PyramidNet",
               "paper": dict(datasets=["cifar10", "cifar100", "fashion_mnist", "food101"],
                             model="pyramidnet-272-200", batch_size=64),
               "cpu": dict(datasets=["fashion_mnist"], model="pyramidnet-11-8", epochs=10, seeds=1),
               "smoke": dict(datasets=["fashion_mnist"], model="pyramidnet-11-8")},
}


def table(page: str, profile: str, datasets=None, methods=("sgd", "sam", "aace"), seeds=None, model=None,
          overrides=None, runs_dir=None, rhos=None, found=None):
    """Train (or read) every dataset x method cell of Table 2 or 3; returns (runs, our table).
    ``rhos``: {method: rho} to run SAM and SAM+AACE with (default: each method's own default); ``found``: runs
    read in place from a reference study's export (see ``ensure``)."""
    import pandas as pd
    if page not in TABLES:
        raise ValueError(f"page must be one of {list(TABLES)}, got {page!r}")
    check_choice("profile", profile, DEFAULT_SEEDS)
    check_choice("methods", list(methods), MAIN_ARMS)
    defaults = dict(TABLES[page][profile])
    datasets = datasets or defaults.pop("datasets")
    defaults.pop("datasets", None)
    from .data import DATASETS
    check_choice("datasets", list(datasets), DATASETS)
    n_seeds = defaults.pop("seeds", None)
    seeds = resolve_seeds(profile, seeds)[: n_seeds or None] if seeds is None else resolve_seeds(profile, seeds)
    settings = {**defaults, **({"model": model} if model else {}), **(overrides or {})}
    runs, rows = {}, {}
    for dataset in datasets:
        arms = [Arm.of(MAIN_ARMS[m].name, **dict(MAIN_ARMS[m].settings), **({"rho": rhos[m]} if rhos and rhos.get(m)
                                                                          is not None else {})) for m in methods]
        grid = configs(profile, arms, seeds, **{**settings, "dataset": dataset})
        done = ensure(grid, runs_dir, found=found)
        runs[dataset] = {arm.name: rs for arm, rs in done.items()}
        for arm, rs in done.items():
            rows.setdefault(dataset, {})[arm.name] = format_runs(rs, FINAL_TEST)
        by_name = {arm.name: rs for arm, rs in done.items()}
        if "SAM" in by_name and "SAM+AACE" in by_name:
            d = paired_difference(by_name["SAM"], by_name["SAM+AACE"], FINAL_TEST)
            rows[dataset]["SAM+AACE − SAM (paired)"] = (
                f"{100 * d['mean']:+.2f}" + (f" (95% CI ± {100 * d['ci95']:.2f}, n={d['n']})" if d["n"] > 1 else
                                             f" (n={d['n']})"))
    return runs, pd.DataFrame(rows).T.rename(index=fmt.dataset)   # 'Fashion-MNIST', not its key


def table_finding(runs: dict, declared: dict | None = None) -> str:
    """A table page's finding: per dataset, SAM+AACE against SAM (paired), what the comparison could see (the
    minimum detectable effect at the strictest Holm level of the page's datasets), and the declared rule's verdict
    Holm-corrected over them. ``declared``: {dataset: the main comparison's verdict table} for the datasets whose
    cells are the main comparison's runs: there the declared question's row is shown, so that every page gives
    that comparison the same effect, MDE and verdict."""
    from .stats import EQUIVALENCE_MARGIN
    from .stats import ALPHA, comparison_verdict, holm, p_value
    diffs = {dataset: paired_difference(by_name["SAM"], by_name["SAM+AACE"], FINAL_TEST)
             for dataset, by_name in runs.items() if "SAM" in by_name and "SAM+AACE" in by_name}
    adjusted = dict(zip(diffs, holm([p_value(d) for d in diffs.values()])))
    parts = []
    for dataset, d in diffs.items():
        row = None
        if declared and dataset in declared:
            rows = declared[dataset][declared[dataset]["comparison"] == "SAM+AACE − SAM"]
            row = None if rows.empty else rows.iloc[0]
        if row is not None:
            parts.append(f"on {fmt.dataset(dataset)}, SAM+AACE minus SAM is {row['effect (points)']:+.2f} points of test accuracy "
                         f"({row['paired seeds']} paired seeds, minimum detectable effect {row['MDE (points)']:.2f} "
                         f"points; the main comparison's declared question): {row['verdict']}")
        elif d["n"] < 2:
            parts.append(f"on {fmt.dataset(dataset)}, SAM+AACE minus SAM is {100 * d['mean']:+.2f} points of test accuracy from "
                         f"{d['n']} seed: too few to tell a difference from noise")
        else:
            parts.append(f"on {fmt.dataset(dataset)}, SAM+AACE minus SAM is {100 * d['mean']:+.2f} points of test accuracy "
                         f"(95 % CI ± {100 * d['ci95']:.2f}, {d['n']} paired seeds, minimum detectable effect "
                         f"{100 * minimum_detectable_effect(d, ALPHA / len(diffs)):.1f} points): "
                         f"{comparison_verdict(d, adjusted[dataset], EQUIVALENCE_MARGIN, family_size=len(diffs))}")
    note = f" (Holm-corrected over {len(diffs)} datasets)" if len(diffs) > 1 else ""
    return ("**Finding" + note + ":** " + "; ".join(parts) + ".") if parts else ""


def setting_text(runs: dict, profile: str) -> str:
    """One line per dataset of a table page: what its cells ran with (model, epochs, subset, seeds)."""
    lines = []
    for dataset, by_name in runs.items():
        first = next(iter(by_name.values()))
        seeds = len(first)
        fit = ", ".join(f"{name} {100 * spread(final(rs, 'train_acc'))['mean']:.1f} %" for name, rs in by_name.items())
        rhos = ", ".join(f"{name} {rs[0].config.rho:g}" for name, rs in by_name.items() if rs[0].config.method != "sgd")
        lines.append(f"**{fmt.dataset(dataset)}** (profile `{profile}`): {describe(first[0].config)}; "
                     f"{seeds} seed{'s' if seeds > 1 else ''} per cell; rho {rhos}; test accuracy on "
                     f"{final_test_size(first[0]):,} test images; final training accuracy {fit} "
                     f"(how far each method trained)")
    return "  \n".join(lines)


PAPER_DATASETS = ("cifar10", "cifar100", "fashion_mnist", "food101")


def published_table(family: str, datasets=PAPER_DATASETS):
    """The published rows for the paper's datasets and a model family, narrow enough for a page: the method,
    the setting and the test accuracy first (derived from an error rate where that is what was published),
    the source last."""
    import pandas as pd

    from .formatting import count
    frames = [published_for(d, family) for d in datasets]
    rows = pd.concat(frames).drop_duplicates() if frames else published_results().iloc[:0]

    def accuracy(row):
        if not row["value"]:
            return "not available"
        value = float(row["value"])
        return f"{100 - value:.2f}" if row["metric"] == "test_error_percent" else f"{value:.2f}"
    def setting(row):
        return ", ".join(part for part in (f"rho {row['rho']}" if row["rho"] else "",
                                           f"{row['epochs']} ep." if row["epochs"] else "") if part)

    def source(text):  # "Author year (paper), where": the where shortened to what a reader looks up
        who, _, where = text.partition(", ")
        return f"{who}, {'training logs' if 'logs' in where else where}" if where else who
    def shown(row):
        spread = ", ".join(p for p in (row["spread"], row["n_runs"] and count(int(row["n_runs"]), "run")) if p)
        return accuracy(row) + (f" ({spread})" if spread else "")
    out = pd.DataFrame({"method": rows["method"], "data, model": rows["dataset"].str.replace(";", ", ") + "; "
                        + rows["model"].str.replace(";", ", "), "test acc. %": rows.apply(shown, axis=1),
                        "augmentation": rows["augmentation"].replace("", "not stated"),
                        "setting": rows.apply(setting, axis=1), "source": rows["source"].map(source)})
    return out.set_index("method")


def cell_status(runs: dict, profile: str, datasets=PAPER_DATASETS):
    """Per cell of the paper's table (data set x method), what this book did with it: reproduced at the paper's
    scale (the paper profile ran it), an indication at small scale (another profile ran it), or not attempted."""
    import pandas as pd

    from .formatting import dataset as dataset_name
    rows = {}
    for d in datasets:
        ran = runs.get(d, {})
        rows[dataset_name(d)] = {m: ("reproduced at the paper's scale" if profile == "paper" else
                                     f"indication at small scale ({profile} profile)") if m in ran else "not attempted"
                                 for m in ("SGD", "SAM", "SAM+AACE")}
    return pd.DataFrame(rows).T


def last_quarter(runs: list[Run], column: str) -> dict:
    """Spread over runs of a metric's mean over the last quarter of the epochs."""
    return spread([quarter(r, column, "last") for r in runs if r.finished])


def summary_row(runs: list[Run]) -> dict:
    """The numbers the book shows for one arm."""
    return {
        "method": runs[0].config.label(),
        "train accuracy %": format_runs(runs, "train_acc"),
        "test accuracy %": format_runs(runs, FINAL_TEST),
        "‖e‖, last quarter": format_spread(last_quarter(runs, "perturbation_norm"), 1, 3),
        "cos(e_t, e_t-1), last quarter": format_spread(last_quarter(runs, "perturbation_cosine"), 1, 3),
    }


def quarter(run_: Run, column: str, which: str) -> float:
    """Mean of a per-epoch metric over the first or the last quarter of a run's epochs."""
    m = run_.metrics[column]
    n = max(1, len(m) // 4)
    return float(m.iloc[:n].mean() if which == "first" else m.iloc[-n:].mean())


def quarter_ratio(run_: Run, column: str) -> float:
    """Last-quarter mean over first-quarter mean of a per-epoch metric (below 1: it diminished)."""
    return quarter(run_, column, "last") / quarter(run_, column, "first")


def paired(a: list[Run], b: list[Run], fn) -> dict:
    """Spread of fn(b) - fn(a) over the seeds finished in both."""
    pairs = {r.config.seed: fn(r) for r in a if r.finished}
    return spread([fn(r) - pairs[r.config.seed] for r in b if r.finished and r.config.seed in pairs])


def label_noise_runs(profile: str, noise_levels, arms, seeds=None, overrides=None, runs_dir=None):
    """Train (or read) every noise level x arm x seed of the label-noise chapter.

    Returns {noise level: {arm name: [runs]}}. The noisy labels depend on the seed only, so every arm sees
    the same corrupted training set for a given seed and level.
    """
    check_choice("profile", profile, NOISE_SETTING)
    check_choice("arms", list(arms), NOISE_ARMS)
    if not (isinstance(noise_levels, (list, tuple)) and noise_levels and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1 for v in noise_levels)):
        raise ValueError(f"parameter 'noise_levels': expected a non-empty list of fractions in [0, 1), "
                         f"got {noise_levels!r}")
    seeds = resolve_seeds(profile, seeds)
    settings = {**NOISE_SETTING[profile], **(overrides or {})}
    out = {}
    for level in noise_levels:
        grid = configs(profile, [NOISE_ARMS[a] for a in arms], seeds, **{**settings, "label_noise": float(level)})
        out[float(level)] = {arm.name: rs for arm, rs in ensure(grid, runs_dir).items()}
    return out


def drop_from_peak(runs: list[Run], column: str = "test_acc") -> dict:
    """Spread over runs of (best epoch's value - last epoch's value): what memorising the noise costs."""
    return spread([float(r.metrics[column].max() - r.metrics[column].iloc[-1]) for r in runs if r.finished])
