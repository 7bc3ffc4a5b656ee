"""The reference studies and the book's verdicts on them.

Each testbed's study runs once (``python -m aace study --profile cpu-reference|cpu-noise-reference|cpu-imbalanced --export
results/...``, hours on two CPU cores, resumable across machines from its committed partial export) and is
committed with its provenance; the book reads it, and on every build checks the reader's machine against it:
``DETERMINISM`` (reference seeds, bit for bit on the same kind of machine) and ``FRESH_SEEDS`` (new seeds of the
``REPLICATED`` comparisons, a replication that can fail).

Declared before the runs (issue 23): two questions, each a Holm family over the comparisons below and scored two
ways; the positive control first: a testbed on which SAM does not beat SGD cannot say whether a better
perturbation helps SAM, and every AACE verdict on it says so.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import stats
from .paths import ROOT
from .study import ALL_ARMS
from .verdicts import SCORINGS, name, paired, score, verdicts



@dataclass(frozen=True)
class Testbed:
    key: str
    plan: str      # the study's plan (aace.study.PLANS) and profile
    export: str    # the committed export, relative to the repository
    title: str
    # The MDE that SAM+AACE - SAM must reach, declared with the study (issue 23, item 7); None: no target.
    mde_target: float | None = None
    # The export's record digest (study.json's "digest", which covers the SHA-256 of every file), pinned here so
    # that changing an export's content means changing the package (issue 31, item 1); None: not pinned.
    digest: str | None = None


# Per book profile, its testbeds: the cpu profile's are the reference studies; the smoke profile's, their
# seconds-long copies, committed as the nbval fixture (make nbval-fixture).
REFERENCES = {
    "cpu": {"clean": Testbed("clean", "cpu-reference", "results/cpu-fashion-mnist", "clean labels", 0.5,
                             "030b82a266c330fcfb6212853e1db3c1b988f672daa8d9487c785be30009fb07"),
            "noise": Testbed("noise", "cpu-noise-reference", "results/cpu-fashion-mnist-noise", "40 % label noise", 1.0,
                             "b432fa857ddc73fce7f824e646707252e6ed36dd92d1c2e9d194a81987cb8f78"),
            # Declared before its runs (issue 34); pinned when the study was complete.
            "imbalanced": Testbed("imbalanced", "cpu-imbalanced", "results/cpu-fashion-mnist-imbalanced",
                                  "long-tailed classes (imbalance ratio 100)", 1.0,
                                  "36bf30714081098e805a0384a4d0a22ecfa0dd343a3b8443dbdb8b9016e7adcf")},
    "smoke": {"clean": Testbed("clean", "smoke", "tests/fixtures/study-smoke", "clean labels", None,
                               "febb7e03baec3e2ce0d1dccf8b53b891e1f6487f810ec9ba50ee3c81665aaf29"),
              "noise": Testbed("noise", "smoke-noise", "tests/fixtures/study-smoke-noise", "40 % label noise", None,
                               "10048f2f714285fe3548f9a1f49fb112a14ea276e356f7e7f031b14045e8c87b"),
              "imbalanced": Testbed("imbalanced", "smoke-imbalanced", "tests/fixtures/study-smoke-imbalanced",
                                    "long-tailed classes (imbalance ratio 10)", None,
                                    "d8c564649329708126406bf05cf65338c2a65e5d3c54913774c637e688c5d3f1")},
}
TESTBEDS = REFERENCES["cpu"]


def pinned_digest(directory) -> str | None:
    """The record digest the package pins for the export in ``directory``, or None when none is pinned there."""
    target = Path(directory).resolve()
    for beds in REFERENCES.values():
        for bed in beds.values():
            if (ROOT / bed.export).resolve() == target:
                return bed.digest
    return None


def pin_problems(directory: Path, pinned: str | None) -> list[str]:
    """One line when the export's record digest is not the pinned one (nothing when nothing is pinned)."""
    import json
    if pinned is None:
        return []
    try:
        digest = json.loads((directory / "study.json").read_text()).get("digest")
    except (OSError, ValueError, AttributeError):
        digest = None
    if digest == pinned:
        return []
    return [f"{directory.relative_to(ROOT) / 'study.json'}: its record digest {str(digest)[:16]}... is not the "
            f"{pinned[:16]}... that aace.reference pins for this study; restore the export from git (`git checkout "
            f"-- {directory.relative_to(ROOT)}`), or, for a new study, pin its digest in aace/reference.py"]


def git_differences(directory: Path) -> list[str]:
    """Inside a git checkout: one line naming the export's files that differ from what git has committed
    (changed, added or deleted); nothing outside a checkout or where git cannot tell."""
    import subprocess
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--", str(directory)],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return []
    if out.returncode != 0 or not out.stdout.strip():
        return []
    changed = [line[3:] for line in out.stdout.splitlines()]
    return [f"{directory.relative_to(ROOT)} differs from what git has committed: {', '.join(changed[:4])}"
            f"{f' and {len(changed) - 4} more' if len(changed) > 4 else ''}; restore it with `git checkout -- "
            f"{directory.relative_to(ROOT)}` (and remove what git does not know)"]


def warnings(profile: str = "cpu") -> list[str]:
    """What a page says above its numbers: each reference export under results/ that differs from what git has
    committed (the nbval fixture's exports are remade, uncommitted, by `make nbval-fixture`; their pins guard them)."""
    return [w for bed in testbeds(profile).values() if bed.export.startswith("results/")
            for w in git_differences(ROOT / bed.export)]


def testbeds(profile: str) -> dict:
    if profile not in REFERENCES:
        raise ValueError(f"parameter 'profile': the reference studies exist for {list(REFERENCES)}, got {profile!r}")
    return REFERENCES[profile]
# What every build trains again (issue 30, item 5). The determinism check: these reference seeds of the paper's three
# arms on the clean testbed, bit-identical to their reference runs on the same kind of machine (the claims page
# measures their sharpness). The replication that can fail: fresh seeds, in no reference study, of the replicated
# comparisons' arms, tested against the reference's prediction interval. Its power is declared against a build whose
# effect is SHIFT away from the reference's: 2 points, about the gain the noise study's first version found with SAM
# on a coarser grid (+2.68, evidence.FIRST_NOISE_STUDY), so that a build reproducing that gain reads inconsistent.
# (The first declaration, power against a build with no effect, cannot be met once the reference's own effect is
# near 0, as the fairly tuned noise study's is.) ``replication_power``, tested.
SHIFT = 0.02
DETERMINISM = {"testbed": "clean", "seeds": (0,), "arms": ("sgd", "sam", "aace")}
FRESH_SEEDS = tuple(range(1000, 1006))
REPLICATED = {"noise": (("aace", "sam"),)}

def read(testbed: str, profile: str = "cpu"):
    """(study.json, runs, problems) of a testbed's committed export; study None when it is missing, damaged,
    stale (another aace version) or incomplete, with the reason in ``problems``."""
    from . import __version__
    from .results import read_export
    beds = testbeds(profile)
    if testbed not in beds:
        raise ValueError(f"testbed: expected one of {list(beds)}, got {testbed!r}")
    directory = ROOT / beds[testbed].export
    if not (directory / "study.json").is_file():
        return None, [], [f"`{beds[testbed].export}` holds no export yet; `python -m aace study --profile "
                          f"{beds[testbed].plan} --workers 2 --export {beds[testbed].export}` makes it"]
    problems = pin_problems(directory, beds[testbed].digest)
    if problems:
        return None, [], problems
    study, runs, problems = read_export(directory, __version__)
    if study is not None and not study["complete"]:
        return None, [], [f"the reference study is not complete yet: {len(runs)} runs exported; `python -m aace study "
                          f"--profile {beds[testbed].plan} --workers 2 --export {beds[testbed].export}` resumes it from "
                          f"the export"]
    return study, runs, problems


def finals(study: dict, runs) -> dict:
    """{arm key: final runs by seed}."""
    from .results import final_runs
    return {k: sorted(rs, key=lambda r: r.config.seed) for k, rs in final_runs(study, runs).items()}


def answer(profile: str = "cpu"):
    """The intro's answer: per testbed, the positive control and SAM+AACE − SAM under both scorings; and the
    problems of testbeds whose export cannot be read."""
    import pandas as pd
    rows, problems = [], {}
    for key, bed in testbeds(profile).items():
        study, runs, trouble = read(key, profile)
        if study is None:
            problems[bed.title] = trouble
            continue
        f = finals(study, runs)
        for scoring in SCORINGS:
            table = verdicts(f, scoring)
            keep = table[table["comparison"].isin([name("sam", "sgd"), name("aace", "sam")])]
            for _, row in keep.iterrows():
                rows.append({"testbed": bed.title, "scoring": scoring, **row.to_dict()})
    return pd.DataFrame(rows), problems


def grid_edges(study: dict) -> list[str]:
    """The study's loud flags: arms whose chosen value is an end of its grid."""
    from .study import edge_warnings
    return edge_warnings(study.get("chosen"))


def replication_power(reference_diff: dict, k: int, family_size: int = 1, shift: float = SHIFT) -> float:
    """The chance that a build whose true effect is the reference's mean + ``shift`` falls outside the reference's
    prediction interval at the family's level (1 - alpha / m) for a mean of k fresh seeds, with the reference's
    spread taken as known."""
    import math

    from scipy.stats import norm
    lo, hi = stats.prediction_interval(reference_diff, k, 1 - stats.family_alpha(family_size))
    se, true = reference_diff["std"] / math.sqrt(k), reference_diff["mean"] + shift
    return float(norm.cdf((lo - true) / se) + norm.sf((hi - true) / se))


def _machine_name(env: dict) -> str:
    return f"{env.get('cpu', '?')} ({env.get('instruction_set', '?')})"


def _determinism_reference(profile: str, seeds=None):
    """({arm: the reference runs the determinism check retrains}, problems); None when the export cannot be read."""
    seeds = DETERMINISM["seeds"] if seeds is None else tuple(seeds)
    study, runs, problems = read(DETERMINISM["testbed"], profile)
    if study is None:
        return None, problems
    return {k: [r for r in rs if r.config.seed in seeds] for k, rs in finals(study, runs).items()
            if k in DETERMINISM["arms"]}, []


def _fresh_grid(study: dict, runs: list, pairs, seeds) -> dict:
    """{arm key: its configs at the fresh seeds}: each replicated comparison's arms as the reference ran them."""
    import dataclasses

    from .results import final_runs
    overlap = set(seeds) & set(study["plan"]["final_seeds"]) | set(seeds) & set(study["plan"]["tuning_seeds"])
    if overlap:
        raise ValueError(f"parameter 'fresh_seeds': {sorted(overlap)} are seeds of the reference study itself; "
                         f"a replication needs seeds it never ran")
    template = {k: final_runs(study, runs)[k][0].config for k in sorted({k for pair in pairs for k in pair})}
    return {k: [dataclasses.replace(c, seed=s) for s in seeds] for k, c in template.items()}


def train_replication(profile: str = "cpu", runs_dir=None, seeds=FRESH_SEEDS) -> None:
    """Train what the replication page lacks, the determinism check's runs and the fresh seeds', in one pool: in
    two pools a core idled while each pool's last run ended (the page took 520 s, now 454 here). ``determinism``
    and ``fresh_replication`` then read them back."""
    from .experiments import ensure
    reference, _ = _determinism_reference(profile)
    configs = [r.config for rs in (reference or {}).values() for r in rs]
    for testbed, pairs in REPLICATED.items():
        study, runs, _ = read(testbed, profile) if testbed in testbeds(profile) else (None, [], [])
        if study is not None:
            configs += [c for cs in _fresh_grid(study, runs, pairs, seeds).values() for c in cs]
    ensure({None: configs}, runs_dir)


def determinism(profile: str = "cpu", runs_dir=None, seeds=None):
    """Train (or read) the declared reference seeds of the declared arms of the clean testbed on this machine and
    set them beside their reference runs: (per-run table, problems)."""
    import pandas as pd

    from .experiments import ensure
    reference, problems = _determinism_reference(profile, seeds)
    if reference is None:
        return None, problems
    local = ensure({ALL_ARMS[k]: [r.config for r in rs] for k, rs in reference.items()}, runs_dir)
    rows = []
    for key, rs in reference.items():
        for ref, new in zip(rs, local[ALL_ARMS[key]]):
            env, here = ref.info.get("environment", {}), new.info.get("environment", {})
            a, b = score(ref, "final"), score(new, "final")
            rows.append({"arm": ALL_ARMS[key].name, "seed": ref.config.seed, "reference %": 100 * a,
                         "this build %": 100 * b, "difference (points)": 100 * (b - a),
                         "bit-identical": "yes" if ref.metrics["test_acc"].equals(new.metrics["test_acc"]) and a == b
                         else "no",
                         "reference machine": _machine_name(env), "this machine": _machine_name(here)})
    return pd.DataFrame(rows), []


def fresh_replication(profile: str = "cpu", runs_dir=None, seeds=FRESH_SEEDS):
    """Train (or read) fresh seeds of each replicated comparison's arms and test each comparison against its
    reference: (per-comparison table, problems). A comparison is consistent when the build's mean lies inside the
    reference's prediction interval at the Holm-adjusted level over the replicated comparisons (its p-value:
    the two-sided t-test of build mean = reference mean, variance sd^2 (1/n + 1/k), n - 1 degrees of freedom)."""
    import math

    import pandas as pd
    from scipy.stats import t as student_t

    from .experiments import ensure
    rows, problems, tests = [], [], []
    for testbed, pairs in REPLICATED.items():
        if testbed not in testbeds(profile):
            continue
        study, runs, trouble = read(testbed, profile)
        if study is None:
            problems += [f"{testbeds(profile)[testbed].title}: {t}" for t in trouble]
            continue
        reference, grid = finals(study, runs), _fresh_grid(study, runs, pairs, seeds)
        local = {k: rs for k, rs in zip(grid, ensure({ALL_ARMS[k]: cs for k, cs in grid.items()}, runs_dir).values())}
        for a, b in pairs:
            ref_d, new_d = paired(reference, a, b, "final"), paired(local, a, b, "final")
            n, k = ref_d["n"], new_d["n"]
            se = ref_d["std"] * math.sqrt(1 / n + 1 / k) if n > 1 and k > 0 else float("nan")
            p = float(2 * student_t.sf(abs(new_d["mean"] - ref_d["mean"]) / se, n - 1)) if se > 0 else float("nan")
            tests.append((testbed, a, b, ref_d, new_d, p))
    adjusted = stats.holm([t[-1] for t in tests])
    for (testbed, a, b, ref_d, new_d, p), p_adj in zip(tests, adjusted):
        m = len(tests)
        lo, hi = stats.prediction_interval(ref_d, new_d["n"], 1 - stats.family_alpha(m))
        own_lo, own_hi = stats.interval(new_d)
        rows.append({"testbed": testbeds(profile)[testbed].title, "comparison": name(a, b),
                     "this build (points)": 100 * new_d["mean"], "fresh seeds": new_d["n"],
                     "this build's own 95 % interval": f"[{100 * own_lo:+.2f}, {100 * own_hi:+.2f}]",
                     "reference (points)": 100 * ref_d["mean"], "reference seeds": ref_d["n"],
                     "reference's prediction interval": f"[{100 * lo:+.2f}, {100 * hi:+.2f}]",
                     "interval level": f"{100 * (1 - stats.family_alpha(m)):.3g} %",
                     "Holm-adjusted p": p_adj, "consistent": "yes" if p_adj >= stats.ALPHA else "no",
                     f"power against a {100 * SHIFT:g}-point shift": replication_power(ref_d, new_d["n"], m)})
    return pd.DataFrame(rows), problems


README_BEGIN = "<!-- results: generated by `python scripts/readme_results.py` from the exports; do not edit -->"
README_END = "<!-- end of results -->"


def results_markdown(profile: str = "cpu") -> str:
    """What the book finds, as the README shows it: per testbed and declared comparison (primary scoring), the
    effect, the interval the rule used, the verdict's word, the seeds and the MDE, all computed from the exports."""
    lines = ["| testbed | comparison | effect (points) | verdict | seeds | MDE |", "|---|---|---|---|---|---|"]
    problems = []
    for key, bed in testbeds(profile).items():
        study, runs, trouble = read(key, profile)
        if study is None:
            problems.append(f"- {bed.title}: cannot be read ({'; '.join(trouble)})")
            continue
        for _, r in verdicts(finals(study, runs)).iterrows():
            lines.append(f"| {bed.title} | {r['comparison']} | {r['effect (points)']:+.2f} | {r['verdict']} | "
                         f"{r['paired seeds']} | {r['MDE (points)']:.2f} |")
    return "\n".join([README_BEGIN, *lines, *problems, README_END])
