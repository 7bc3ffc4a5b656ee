"""The book's "GPU scale" sections: the GPU study's export (``python -m aace study --profile gpu``), read and
shown by the pages that have such a section, or the command that makes it."""
from __future__ import annotations

from pathlib import Path

from . import formatting as fmt
from .results import read_export, verdicts
from .stats import EQUIVALENCE_MARGIN
from .study import ALL_ARMS

# Where the book looks for the GPU study's export, per profile (the smoke pages read a fixture export).
EXPORTS = {"smoke": "tests/fixtures/study-smoke"}
DEFAULT_EXPORT = "results/gpu-fashion-mnist"


def export_for(profile: str) -> Path:
    from .paths import ROOT
    return ROOT / EXPORTS.get(profile, DEFAULT_EXPORT)


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
    from . import __version__
    directory = export_for(profile)
    study, runs, problems = read_export(directory, __version__)
    if problems and (directory / "study.json").is_file():
        return (f"**The export `{directory.relative_to(directory.parent.parent)}` cannot be shown:** "
                + "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
                + ". Restore it from git (`git checkout -- <folder>`) or make it again with the study's command.", [])
    if study is not None and not study["complete"]:
        return (f"**The GPU-scale study is not complete yet:** `{DEFAULT_EXPORT}` holds {len(runs)} of its runs. "
                f"Run `{study['command']}` to finish it (it resumes from the export).", [])
    if study is None:
        return (f"**No GPU-scale results yet:** `{DEFAULT_EXPORT}` holds no export. One command on a GPU makes "
                f"it (about 20 minutes on one H100 or H200): `python -m aace study --profile gpu --workers 6 "
                f"--export {DEFAULT_EXPORT}`; the GPU page says more.", [])
    first = runs[0]
    chosen = ", ".join(f"{ALL_ARMS[k].name} {v['rho']:g}" for k, v in study["chosen"].items())
    text = (f"**Setting:** {fmt.dataset(first.config.dataset)}, {describe(first.config)}, {first.info.get('val_size', 0)} "
            f"validation images; rho tuned per method on the validation split over {study['plan']['rhos']} with "
            f"seeds {study['plan']['tuning_seeds']}, chosen: {chosen}; then seeds {study['plan']['final_seeds']} "
            f"at the chosen rhos, test accuracy on {first.info.get('test_size')} test images. Verdicts by the "
            f"declared rule: Holm within each question, 'equivalent' by TOST within ±{100 * EQUIVALENCE_MARGIN:.1f} "
            f"points. " + provenance(study))
    return text, list(verdicts(study, runs))
