"""The reference studies and the book's verdicts on them.

Each testbed's study runs once (``python -m aace study --profile cpu-reference|cpu-noise-power --export
results/...``, hours on two CPU cores, resumable across machines from its committed partial export) and is
committed with its provenance; the book reads it, and on every build replicates a declared slice of it
(``REPLICATED_SEEDS`` of every final arm) to show how the reader's machine compares with the reference.

Declared before the runs (issue 23): two questions, each a Holm family over the comparisons below and scored two
ways; the positive control first: a testbed on which SAM does not beat SGD cannot say whether a better
perturbation helps SAM, and every AACE verdict on it says so.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import stats
from .study import ALL_ARMS
from .verdicts import FAMILIES, SCORINGS, name, paired, score, verdicts

ROOT = Path(__file__).resolve().parent.parent


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
    "cpu": {"clean": Testbed("clean", "cpu-reference", "results/cpu-fashion-mnist", "clean labels", 0.5),
            "noise": Testbed("noise", "cpu-noise-power", "results/cpu-fashion-mnist-noise-50", "40 % label noise", 1.0,
                             "725dbc9b8fe5875ea6bd00ef8522786cf604ab6c0dad8595b3e894bb5315c403")},
    "smoke": {"clean": Testbed("clean", "smoke", "tests/fixtures/study-smoke", "clean labels", None,
                               "7733a6614d98772b5e34d53f4616967304bcc974deb90cc137ebeb712c661744"),
              "noise": Testbed("noise", "smoke-noise", "tests/fixtures/study-smoke-noise", "40 % label noise", None,
                               "af6de6b88bc9bf4cac59c2e71ae439cc43f9286aadc449d248d7c92bf7256542")},
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


def testbeds(profile: str) -> dict:
    if profile not in REFERENCES:
        raise ValueError(f"parameter 'profile': the reference studies exist for {list(REFERENCES)}, got {profile!r}")
    return REFERENCES[profile]
# The slice every build trains again and sets beside its reference run.
REPLICATED_SEEDS = (0,)


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
    problems = pin_problems(directory, beds[testbed].digest) + git_differences(directory)
    if problems:
        return None, [], problems
    study, runs, problems = read_export(directory, __version__)
    if study is not None and not study["complete"]:
        return None, [], [f"the reference study is not complete yet: {len(runs)} runs exported; `{study['command']}` "
                          f"resumes it from the export"]
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


def replication(testbed: str, profile: str = "cpu", runs_dir=None, seeds=REPLICATED_SEEDS):
    """Train (or read) the reference's final runs at ``seeds`` on this machine and set them beside the
    reference: (per-run table, per-comparison table, problems). Per run: both final accuracies, the difference
    and whether it is bit-identical; per comparison: the replicated mean effect against the reference's 95 %
    prediction interval for a mean of that many seeds."""
    import pandas as pd

    from .experiments import ensure
    study, runs, problems = read(testbed, profile)
    if study is None:
        return None, None, problems
    bed = testbeds(profile)[testbed]
    reference = finals(study, runs)
    slice_ = {key: [r for r in rs if r.config.seed in seeds] for key, rs in reference.items()}
    grid = {ALL_ARMS[key]: [r.config for r in rs] for key, rs in slice_.items()}
    local = {arm: rs for arm, rs in ensure(grid, runs_dir).items()}
    local = {key: local[ALL_ARMS[key]] for key in slice_}
    rows = []
    for key, rs in slice_.items():
        for ref, new in zip(rs, local[key]):
            env, here = ref.info.get("environment", {}), new.info.get("environment", {})
            same_kind = (env.get("cpu"), env.get("instruction_set")) == (here.get("cpu"), here.get("instruction_set"))
            a, b = score(ref, "final"), score(new, "final")
            identical = ref.metrics["test_acc"].equals(new.metrics["test_acc"]) and a == b
            rows.append({"testbed": bed.title, "arm": ALL_ARMS[key].name, "seed": ref.config.seed,
                         "reference %": 100 * a, "this build %": 100 * b, "difference (points)": 100 * (b - a),
                         "bit-identical": "yes" if identical else "no",
                         "same kind of machine": "yes" if same_kind else "no",
                         "reference machine": f"{env.get('cpu', '?')} ({env.get('instruction_set', '?')})"})
    effects = []
    for pairs in FAMILIES.values():
        for a, b in pairs:
            if a in local and b in local:
                ref_d, new_d = paired(reference, a, b, "final"), paired(local, a, b, "final")
                lo, hi = stats.prediction_interval(ref_d, new_d["n"])
                inside = lo <= new_d["mean"] <= hi
                effects.append({"testbed": bed.title, "comparison": name(a, b),
                                "this build (points)": 100 * new_d["mean"], "seeds": new_d["n"],
                                "reference's 95 % prediction interval": f"[{100 * lo:+.2f}, {100 * hi:+.2f}]",
                                "consistent": "yes" if inside else "no"})
    return pd.DataFrame(rows), pd.DataFrame(effects), []
