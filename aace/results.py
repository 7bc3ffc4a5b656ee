"""A study's results: the export with its provenance (``python -m aace study --export DIR``), reading it back,
checking its integrity, and what the book's pages show of it (the "GPU scale" sections)."""
from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from .machine import machine
from .study import (ALL_ARMS, BASELINE_ARMS, TUNED_ARMS, Plan, _utc, choose_rhos, final_configs,
                    final_configs_by_arm, tuned_value, tuning_configs)


def git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+uncommitted changes" if dirty.stdout.strip() else "")


EXPORTED_FILES = ("config.json", "metrics.csv", "summary.json", "steps.csv.gz")  # steps compressed (gzip -9n)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _record_digest(study: dict) -> str:
    """The digest of study.json's own content (everything but this digest), so that an edit of it is seen."""
    return hashlib.sha256(json.dumps({k: v for k, v in study.items() if k != "digest"}, sort_keys=True)
                          .encode()).hexdigest()


def _read_study(directory: Path) -> dict:
    study = json.loads((directory / "study.json").read_text())
    if not isinstance(study, dict):
        raise ValueError("study.json holds no JSON object")
    return study


def _copy(source: Path, name: str, target: Path) -> None:
    """Copy one exported file of a run folder; ``steps.csv.gz`` from an export's copy or from the store's
    steps.csv, compressed without a timestamp (the same run gives the same bytes)."""
    if name != "steps.csv.gz" or (source / name).exists():
        shutil.copyfile(source / name, target)
        return
    with open(source / "steps.csv", "rb") as f, open(target, "wb") as out:
        out.write(gzip.compress(f.read(), compresslevel=9, mtime=0))


def _check_target(directory: Path, record: dict) -> None:
    """An export goes into a new or empty folder, or replaces an earlier export of the same study: never over
    anything it did not write (a file, a folder, a link). Its parent must be writable, checked before a study of
    hours trains."""
    from .store import CorruptRun
    if directory.is_symlink() or (directory.exists() and not directory.is_dir()):
        raise ValueError(f"--export {directory}: is a file or a link, not a folder; give a new or empty folder")
    parent = next(p for p in [directory.parent, *directory.parent.parents] if p.exists())
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--export {directory}: {parent} is not writable, so the export cannot be written there "
                         f"(checked before training); give a folder you can write")
    if not directory.exists() or not any(directory.iterdir()):
        return
    if not (directory / "study.json").is_file():
        raise ValueError(f"--export {directory}: the folder is not empty and holds no export of a study; give a "
                         f"new or empty folder (nothing was written)")
    try:
        study = _read_study(directory)
        files, names = dict(study["files"]), list(study["runs"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CorruptRun(f"--export {directory}: its study.json is damaged ({type(err).__name__}: {err}); restore it "
                         f"from git or move the folder away (nothing was written)") from None
    foreign = unknown_content(directory, files, names)
    if foreign:
        raise ValueError(f"--export {directory}: holds what no export wrote ({'; '.join(foreign[:3])}"
                         f"{'; ...' if len(foreign) > 3 else ''}); give a new or empty folder (nothing was written)")
    # The same study is the same profile: its plan may have grown since (a grid extended, issue 23 item 3).
    if study.get("profile") != record["profile"]:
        raise ValueError(f"--export {directory}: holds the export of another study (profile "
                         f"{study.get('profile')!r}); give a new or empty folder (nothing was written)")


def export(record: dict, directory, command: str) -> Path:
    """Copy every stored run of a study, complete or not (config, per-epoch metrics, summary; no checkpoints),
    and a study.json with the plan, the chosen rhos, the machine, the version, the commit, the command and the
    SHA-256 of every file. Written beside ``directory`` and renamed into place: an earlier export of the same
    study is replaced whole, anything else in the way is refused (``_check_target``)."""
    from . import __version__
    from .store import StoreWriteError
    directory = Path(directory).absolute()
    _check_target(directory, record)
    needed = sum(p.stat().st_size for r in record["runs"] for p in r.path.iterdir()
                 if p.name in EXPORTED_FILES or p.name == "steps.csv")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.export-{os.getpid()}")
    old = directory.with_name(f".{directory.name}.replaced-{os.getpid()}")
    swapped = False
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "runs").mkdir(parents=True)
        environments, files = set(), {}
        for run_ in sorted(record["runs"], key=lambda r: r.path.name):
            (tmp / "runs" / run_.path.name).mkdir()
            for name in EXPORTED_FILES:
                relative = f"runs/{run_.path.name}/{name}"
                _copy(run_.path, name, tmp / relative)
                files[relative] = _sha256(tmp / relative)
            env = run_.info.get("environment", {})
            environments.add((env.get("gpu") or env.get("device", "?"), env.get("torch", "?")))
        history = record["invocations"]
        study = {"profile": record["profile"], "plan": record["plan"], "overrides": record["overrides"],
                 "chosen": record["chosen"], "complete": record["complete"], "command": command,
                 "aace_version": __version__, "git_commit": git_commit(), "exported": _utc(time.time()),
                 "exported_on": machine(), "devices": sorted(f"{d} (torch {t})" for d, t in environments),
                 "wall_seconds": sum(h["wall_seconds"] for h in history), "invocations": history,
                 "runs": sorted(r.path.name for r in record["runs"]), "files": files}
        study["digest"] = _record_digest(study)
        (tmp / "study.json").write_text(json.dumps(study, indent=2, sort_keys=True) + "\n")
        # The swap: signals wait until both renames are done, so that the folder is always one whole export.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            if directory.exists():
                os.rename(directory, old)
            os.rename(tmp, directory)
            swapped = True
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        shutil.rmtree(old, ignore_errors=True)  # the earlier export: only files it wrote (_check_target)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if not swapped and old.exists() and not directory.exists():
            os.rename(old, directory)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            free = shutil.disk_usage(directory.parent).free
            raise StoreWriteError(errno.ENOSPC, f"disk full writing the export {directory}: it needs about "
                                  f"{needed:,} bytes beside the earlier export, and the disk ran out ({free:,} bytes "
                                  f"free once the partial copy was removed); nothing was changed there and the "
                                  f"study's runs are safe in its store. Free some space or choose another --export, "
                                  f"then run the same command again") from None
        raise
    return directory


def load_export(directory):
    """(study.json as a dict, the exported runs) of an export folder; (None, []) when there is none yet.
    Raises on damage: ``read_export`` reports it instead."""
    directory = Path(directory)
    if not (directory / "study.json").is_file():
        return None, []
    study = _read_study(directory)
    return study, [_load_exported(directory / "runs" / name) for name in study["runs"]]


def _load_exported(path: Path):
    """An exported run, with its per-step table when the export carries one (exports before aace 0.5 did not)."""
    from .store import load_run, note_use
    note_use("export", path)
    return load_run(path, with_steps=(path / "steps.csv.gz").exists())


def read_export(directory, version: str | None = None):
    """(study, runs, problems) of an export folder, never raising: ``problems`` lists what is wrong (see
    ``check_export``); study is None and runs empty when the export is missing or cannot be trusted."""
    problems = check_export(directory, version)
    if problems:
        return None, [], problems
    study, runs = load_export(directory)
    return study, runs, []


def plan_of(study: dict) -> Plan:
    """The Plan a study record (or study.json) was run with."""
    p = study["plan"]
    return Plan(p["profile"], {k: tuple(v) for k, v in p["rhos"].items()}, tuple(p["tuning_seeds"]),
                tuple(p["final_seeds"]), p["settings"], tuple(p.get("final_arms", {**BASELINE_ARMS, **TUNED_ARMS})))


def check_export(directory, version: str | None = None, choices: bool = True) -> list[str]:
    """What is wrong with an export (empty when nothing is); never raises. Every file must match the SHA-256
    that study.json records for it, and study.json its own digest; every run's config must rebuild the hash in
    its folder name on the device it ran on; a complete study must hold every run of its grid, and its chosen
    rhos must follow from its tuning runs. ``version``: also report an export made by another aace version
    (stale: its runs are not the ones this version trains). ``choices=False``: the runs' integrity only, not
    whether the recorded choices follow from the current rule (a study resumed under a revised rule re-chooses)."""
    directory = Path(directory)
    if not (directory / "study.json").is_file():
        return [f"no export in {directory} (no study.json)"]
    try:
        study = _read_study(directory)
        files, names = dict(study["files"]), list(study["runs"])
        plan, recorded = plan_of(study), {k: v["rho"] for k, v in (study["chosen"] or {}).items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return [f"{directory / 'study.json'} is damaged or not an export's ({type(err).__name__}: {err})"]
    problems = []
    if study.get("digest") != _record_digest(study):
        problems.append(f"{directory / 'study.json'} was changed after the export (its digest does not match)")
    if version is not None and study.get("aace_version") != version:
        problems.append(f"stale: made by aace {study.get('aace_version')}, this is aace {version}; rerun "
                        f"`{study.get('command')}` to refresh it")
    for relative, digest in sorted(files.items()):
        path = directory / relative
        if not path.is_file():
            problems.append(f"{relative}: missing")
        elif _sha256(path) != digest:
            problems.append(f"{relative}: its content differs from the export's (SHA-256 mismatch)")
    listed = {f"runs/{n}/{f}" for n in names for f in EXPORTED_FILES if f != "steps.csv.gz"}
    problems += [f"{relative}: not recorded in study.json" for relative in sorted(listed - set(files))]
    problems += unknown_content(directory, files, names)
    if problems:
        return problems
    runs = []
    for name in names:
        try:
            runs.append(_load_exported(directory / "runs" / name))
        except Exception as err:  # noqa: BLE001 - a damaged run is a problem to report, not a crash
            problems.append(f"runs/{name}: unreadable ({err})")
    for r in runs:
        env = r.info.get("environment", {})
        device = "cuda" if str(env.get("device", "")).startswith("cuda") else "cpu"
        try:
            expected = r.config.run_hash(device, env.get("threads") if device == "cpu" else None,
                                         study["aace_version"])
        except ValueError as err:
            problems.append(f"{r.path.name}: {err}")
            continue
        if expected != r.path.name.split("-")[-1]:
            problems.append(f"{r.path.name}: its config hashes to {expected}, not {r.path.name.split('-')[-1]}")
    if problems or not study.get("complete") or not choices:
        return problems  # a partial export holds what was stored when it was written
    expected = tuning_configs(plan, **study["overrides"]) + final_configs(plan, recorded, **study["overrides"])
    have = {json.dumps(r.config.to_dict(), sort_keys=True) for r in runs}
    missing = [f"missing from the export: {c.label()} seed {c.seed}" for c in expected
               if json.dumps(c.to_dict(), sort_keys=True) not in have]
    if missing:
        return missing
    try:
        chosen = {k: v["rho"] for k, v in choose_rhos(plan, runs).items()}
    except ValueError as err:
        return [str(err)]
    if chosen != recorded:
        problems.append(f"the chosen rhos {recorded} do not follow from the tuning runs, which choose {chosen}")
    return problems


def _results(run_) -> tuple:
    """What a run computed, without its timings: its summary's accuracies and losses, its metrics' columns."""
    summary = {k: v for k, v in run_.summary.items() if k.endswith(("_acc", "_loss")) or k in ("status", "epochs")}
    metrics = run_.metrics.drop(columns=[c for c in ("epoch_seconds", "images_per_second") if c in run_.metrics])
    return json.dumps(summary, sort_keys=True), metrics.to_csv(index=False)


def unknown_content(directory: Path, files: dict, names: list) -> list[str]:
    """Everything under an export that its study.json does not record: a finding, never ignored."""
    known_dirs = {"runs", *(f"runs/{n}" for n in names)}
    out = []
    for path in sorted(directory.rglob("*")):
        relative = str(path.relative_to(directory))
        if path.is_symlink() or not (path.is_dir() or path.is_file()):
            out.append(f"{relative}: not a plain file or folder (no export writes one)")
        elif path.is_dir() and relative not in known_dirs:
            out.append(f"{relative}/: a folder the export does not record")
        elif path.is_file() and relative != "study.json" and relative not in files:
            out.append(f"{relative}: a file the export does not record")
    return out


def runs_in_export(directory, pinned: str | None = None, runs_dir=None, check_store: bool = False):
    """For a study that resumes from an export: a function config -> that config's run read in place from the
    export (or None), and the export's invocation history. Refuses a damaged export (``check_export``), one whose
    record digest is not ``pinned`` (the pin of the reference study exported there, ``aace.reference``), and, with
    ``check_store`` (a study resuming), run by run, one whose results disagree with the store's copy of the same
    run: an export never overrides a stored run, nor is a forged one laundered into a fresh export. (A page
    reading a pinned export does not ask: its store may hold the same config retrained on another machine.)"""
    from .store import CorruptRun, default_runs_dir, run_dir
    from .train import resolve_device
    directory = Path(directory)
    if not (directory / "study.json").is_file():
        return None, []
    problems = check_export(directory, choices=False)
    if not problems and pinned and _read_study(directory).get("digest") != pinned:
        problems = [f"its record digest is not the one the package pins ({pinned[:16]}...)"]
    if problems:
        raise CorruptRun(f"the export {directory} cannot be resumed from: {'; '.join(problems[:3])}"
                         f"{' ...' if len(problems) > 3 else ''}. Move it away (or restore it from git) and run again")
    study = _read_study(directory)
    names = set(study["runs"])
    store = Path(runs_dir or default_runs_dir())

    def found(config):
        device = resolve_device(config.device)
        name = run_dir(config, device).name
        if name not in names:
            return None
        exported, stored = directory / "runs" / name, run_dir(config, device, store)
        run_ = _load_exported(exported)
        if check_store and (stored / "summary.json").is_file():
            from .store import load_run
            try:
                other = load_run(stored, with_steps=False)
            except CorruptRun:
                other = None
            if other is None or other.finished and _results(other) != _results(run_):
                raise CorruptRun(f"{exported} and the stored run {stored} disagree on its results: one of them was "
                                 f"changed, or the two were trained on different kinds of machine (config.json says "
                                 f"where). Keep the one you trust, move the other away, and run again")
        return run_
    return found, study["invocations"]



# ----------------------------------------------------------------------------- what the book shows



def final_runs(study: dict, runs) -> dict:
    """{arm key: the final runs}, the tuning runs left out; the runs of each arm's final configs under the
    study's plan and choices (a crossed arm's may be another arm's runs, ``aace.study.CROSSED``)."""
    chosen = {k: v["rho"] for k, v in (study["chosen"] or {}).items()}
    by_config = {r.config: r for r in runs}
    out = {}
    for key, configs in final_configs_by_arm(plan_of(study), chosen, **study.get("overrides", {})).items():
        found = [by_config[c] for c in configs if c in by_config]
        if found:
            out[key] = found
    return out


def verdicts(study: dict, runs):
    """``verdict_tables`` of a study's final runs at its chosen rhos."""
    return verdict_tables(final_runs(study, runs))


def verdict_tables(finals: dict):
    """(arms table, comparisons table) of {arm key: final runs}: final test accuracy per arm; per comparison
    (the declared ones whose arms ran) the paired effect, its 95 % interval, the minimum detectable
    effect at the family's Holm level, the Holm-adjusted p and the declared rule's verdict (``aace.verdicts``)."""
    import pandas as pd

    from . import experiments as ex
    arms = pd.DataFrame([{"arm": ALL_ARMS[k].name, "tuned value": "-" if k == "sgd" else
                          f"{tuned_value(k, rs[0].config):g}",
                          "test accuracy %": ex.format_runs(rs, ex.FINAL_TEST),
                          "training accuracy %": ex.format_runs(rs, "train_acc"),
                          "mean ‖e‖": "-" if k in ("sgd", "sgd_ls") else
                          f"{ex.spread([float(r.metrics['perturbation_norm'].mean()) for r in rs])['mean']:.3g}"}
                         for k, rs in finals.items()]).set_index("arm")
    from .verdicts import verdicts as declared
    table = declared(finals, "final")
    rows = [{"comparison": r["comparison"], "effect [95 % interval]": f"{r['effect (points)']:+.2f} {r['95 % interval']}", "n": r["paired seeds"],
             "MDE (80 % power)": f"{r['MDE (points)']:.2f}", "Holm p": f"{r['Holm-adjusted p']:.2g}",
             "verdict": r["verdict"]} for _, r in table.iterrows()]
    return arms, pd.DataFrame(rows).set_index("comparison")
