"""A study's results: the export with its provenance (``python -m aace study --export DIR``), reading it back,
checking its integrity, and what the book's pages show of it (the "GPU scale" sections)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from .study import ALL_ARMS, Plan, _utc, arm_key, choose_rhos, final_configs, tuning_configs


def git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+uncommitted changes" if dirty.stdout.strip() else "")


EXPORTED_FILES = ("config.json", "metrics.csv", "summary.json")


def export(record: dict, directory, command: str) -> Path:
    """Copy every run of a complete study (config, per-epoch metrics, summary; no checkpoints) and a
    study.json with the plan, the chosen rhos, the machine, the version, the commit and the command."""
    from . import __version__
    if not record["complete"]:
        raise ValueError("export: the study is incomplete; run it to the end first (it resumes where it stopped)")
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "runs").mkdir(parents=True)
    environments = set()
    for run_ in record["runs"]:
        target = tmp / "runs" / run_.path.name
        target.mkdir()
        for name in EXPORTED_FILES:
            shutil.copyfile(run_.path / name, target / name)
        env = run_.info.get("environment", {})
        environments.add((env.get("gpu") or env.get("device", "?"), env.get("torch", "?")))
    history = record["invocations"]
    study = {"profile": record["profile"], "plan": record["plan"], "overrides": record["overrides"],
             "chosen": record["chosen"], "command": command, "aace_version": __version__, "git_commit": git_commit(),
             "exported": _utc(time.time()), "devices": sorted(f"{d} (torch {t})" for d, t in environments),
             "wall_seconds": sum(h["wall_seconds"] for h in history), "invocations": history,
             "runs": sorted(r.path.name for r in record["runs"])}
    (tmp / "study.json").write_text(json.dumps(study, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return directory


def load_export(directory):
    """(study.json as a dict, the exported runs) of an export folder; (None, []) when there is none yet."""
    from .store import load_run
    directory = Path(directory)
    if not (directory / "study.json").is_file():
        return None, []
    study = json.loads((directory / "study.json").read_text())
    return study, [load_run(directory / "runs" / name, with_steps=False) for name in study["runs"]]


def plan_of(study: dict) -> Plan:
    """The Plan a study record (or study.json) was run with."""
    p = study["plan"]
    return Plan(p["profile"], {k: tuple(v) for k, v in p["rhos"].items()}, tuple(p["tuning_seeds"]),
                tuple(p["final_seeds"]), p["settings"], tuple(p.get("final_arms", ALL_ARMS)))


def check_export(directory) -> list[str]:
    """What is wrong with an export (empty when nothing is): every run's config must rebuild the hash in its
    folder name on the device it ran on, every run of the study's grid must be there, and the chosen rhos
    must follow from the tuning runs."""
    study, runs = load_export(directory)
    if study is None:
        return [f"no study.json in {directory}"]
    problems = []
    for r in runs:
        env = r.info["environment"]
        device = "cuda" if env.get("device", "").startswith("cuda") else "cpu"
        expected = r.config.run_hash(device, env.get("threads") if device == "cpu" else None, study["aace_version"])
        stored = r.path.name.split("-")[-1]
        if expected != stored:
            problems.append(f"{r.path.name}: its config hashes to {expected}, not {stored}")
    plan = plan_of(study)
    recorded = {k: v["rho"] for k, v in study["chosen"].items()}
    expected = tuning_configs(plan, **study["overrides"]) + final_configs(plan, recorded, **study["overrides"])
    have = {json.dumps(r.config.to_dict(), sort_keys=True) for r in runs}
    missing = [f"missing from the export: {c.label()} seed {c.seed}" for c in expected
               if json.dumps(c.to_dict(), sort_keys=True) not in have]
    if missing:
        return problems + missing
    chosen = {k: v["rho"] for k, v in choose_rhos(plan, runs).items()}
    if chosen != recorded:
        problems.append(f"the chosen rhos {recorded} do not follow from the tuning runs, which choose {chosen}")
    return problems


# ----------------------------------------------------------------------------- what the book shows

# Where the book looks for the GPU study's export, per profile (the smoke pages read a fixture export).
EXPORTS = {"smoke": "tests/fixtures/study-smoke"}
DEFAULT_EXPORT = "results/gpu-fashion-mnist"
# Differences whose whole 95 % interval lies within this many accuracy points count as equivalent.
EQUIVALENCE_MARGIN = 0.015
COMPARISONS = (("aace", "sam"), ("aace_normalised", "sam"), ("sam", "sgd"))


def export_for(profile: str) -> Path:
    from .book import ROOT
    return ROOT / EXPORTS.get(profile, DEFAULT_EXPORT)


def final_runs(study: dict, runs) -> dict:
    """{arm key: the final runs}, the tuning runs left out."""
    seeds = set(study["plan"]["final_seeds"])
    chosen = {k: v["rho"] for k, v in study["chosen"].items()}
    out = {}
    for r in runs:
        key = arm_key(r.config)
        if r.config.seed in seeds and (key == "sgd" or r.config.rho == chosen[key]):
            out.setdefault(key, []).append(r)
    return out


def verdicts(study: dict, runs, margin: float = EQUIVALENCE_MARGIN):
    """``verdict_tables`` of a study's final runs at its chosen rhos."""
    return verdict_tables(final_runs(study, runs), margin)


def verdict_tables(finals: dict, margin: float = EQUIVALENCE_MARGIN):
    """(arms table, comparisons table) of {arm key: final runs}: final test accuracy per arm; per comparison
    (those of ``COMPARISONS`` whose arms ran) the paired effect, its 95 % interval, the minimum detectable
    effect, the Holm-adjusted p and a verdict."""
    import pandas as pd

    from . import experiments as ex, stats
    arms = pd.DataFrame([{"arm": ALL_ARMS[k].name, "rho": "-" if k == "sgd" else f"{rs[0].config.rho:g}",
                          "test accuracy %": ex.format_runs(rs, ex.FINAL_TEST),
                          "training accuracy %": ex.format_runs(rs, "train_acc")}
                         for k, rs in finals.items()]).set_index("arm")
    pairs = [(a, b) for a, b in COMPARISONS if a in finals and b in finals]
    diffs = [ex.paired_difference(finals[b], finals[a], ex.FINAL_TEST) for a, b in pairs]
    adjusted = stats.holm([stats.p_value(d) for d in diffs])
    rows = [{"comparison": f"{ALL_ARMS[a].name} − {ALL_ARMS[b].name}", "effect (points)": f"{100 * d['mean']:+.2f}",
             "95 % CI": f"± {100 * d['ci95']:.2f}", "n (paired seeds)": d["n"],
             "minimum detectable effect (80 % power)": f"{100 * stats.minimum_detectable_effect(d):.2f}",
             "Holm-adjusted p": f"{p:.2g}", "verdict": stats.comparison_verdict(d, p, margin)}
            for (a, b), d, p in zip(pairs, diffs, adjusted)]
    return arms, pd.DataFrame(rows).set_index("comparison")


def provenance(study: dict) -> str:
    """One paragraph: where, when, with what and by which command the export was made."""
    gpu = study.get("invocations", [{}])[-1].get("gpu") or {}
    use = f", mean GPU utilisation {gpu['mean_utilisation_percent']:.0f} %" if gpu else ""
    return (f"Ran on {', '.join(study['devices'])} with aace {study['aace_version']} at commit "
            f"`{study['git_commit'][:12]}`, exported {study['exported'][:10]}; {len(study['runs'])} runs in "
            f"{study['wall_seconds'] / 60:.1f} minutes of wall time over {len(study['invocations'])} invocation(s)"
            f"{use}. Reproduce with `{study['command']}`.")


def gpu_scale_section(profile: str) -> tuple[str, list]:
    """(a paragraph of Markdown, the tables) for a page's "GPU scale" section, or a paragraph saying that no
    export exists yet and the command that makes one."""
    from .experiments import describe
    directory = export_for(profile)
    study, runs = load_export(directory)
    if study is None:
        return (f"**No GPU-scale results yet:** `{DEFAULT_EXPORT}` holds no export. One command on a GPU makes "
                f"it (about 20 minutes on one H100 or H200): `python -m aace study --profile gpu --workers 6 "
                f"--export {DEFAULT_EXPORT}`; the GPU page says more.", [])
    first = runs[0]
    chosen = ", ".join(f"{ALL_ARMS[k].name} {v['rho']:g}" for k, v in study["chosen"].items())
    text = (f"**Setting:** {first.config.dataset}, {describe(first.config)}, {first.info.get('val_size', 0)} "
            f"validation images; rho tuned per method on the validation split over {study['plan']['rhos']} with "
            f"seeds {study['plan']['tuning_seeds']}, chosen: {chosen}; then seeds {study['plan']['final_seeds']} "
            f"at the chosen rhos, test accuracy on {first.info.get('test_size')} test images. Three comparisons, "
            f"Holm-corrected; 'equivalent' means the 95 % interval lies within ±{100 * EQUIVALENCE_MARGIN:.1f} "
            f"points. " + provenance(study))
    return text, list(verdicts(study, runs))
