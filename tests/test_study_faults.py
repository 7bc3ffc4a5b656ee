"""The study, its export and the book under faults (issue 22): no deleted data, no hang, no orphan, no silent
corruption; and a study resumed from a committed partial export on an empty store (issue 24)."""
import errno
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aace import gpu_scale, results, study
from aace.cli import main as cli_main
from aace.store import load_run

# The smoke study at one epoch per run: the machinery, in seconds.
FAST = ["--profile", "smoke", "--workers", "2", "--epochs", "1"]
TIMING = ("epoch_seconds", "images_per_second")


def study_argv(runs_dir, *more):
    return ["study", *FAST, "--runs-dir", str(runs_dir), *more]


def shared_argv(runs_dir, *more):
    """The command of the session's smoke study (conftest's ``smoke_study_store``), whose runs ``finished`` holds."""
    return ["study", "--profile", "smoke", "--workers", "2", "--threads", "1", "--runs-dir", str(runs_dir), *more]


def retrained_final(runs_dir):
    """The run the resume test trains on another 'machine': SAM+AACE's final of seed 1."""
    return next(p for p in sorted(runs_dir.glob("*-*")) if (lambda c: c["method"] == "aace" and not c["normalize"]
                and c["seed"] == 1)(json.loads((p / "config.json").read_text())["config"]))


@pytest.fixture(scope="module")
def finished(tmp_path_factory, smoke_study_store):
    """A store holding the whole smoke study (a copy of the session's), and its export. The run the resume test
    trains again is trained here first, so that both were trained on this machine (the session's store was
    trained on the machine that recorded the fixture, whose last bits may differ)."""
    root = tmp_path_factory.mktemp("finished")
    shutil.copytree(smoke_study_store, root / "runs", ignore=shutil.ignore_patterns("lock"))
    shutil.rmtree(retrained_final(root / "runs"))
    assert cli_main(shared_argv(root / "runs", "--export", str(root / "export"))) == 0
    return root / "runs", root / "export"


def one_line_error(capsys, *words):
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line]
    assert len(err) == 1 and err[0].startswith("error: "), err
    for w in words:
        assert w in err[0], err[0]
    return err[0]


def statuses(runs_dir):
    from aace.store import shown_status
    return sorted(shown_status(load_run(p)) for p in runs_dir.glob("*-*") if (p / "config.json").exists())


def leftovers(*folders):
    return sorted(str(p) for f in folders for p in Path(f).rglob("*") if ".tmp" in p.name or ".export-" in p.name
                  or ".replaced-" in p.name)


def run_fingerprint(run_dir: Path) -> dict:
    """What a run computed: its config, its metrics without timings, its summary without timings."""
    run_ = load_run(run_dir, with_steps=False)
    summary = {k: v for k, v in run_.summary.items() if k not in ("wall_seconds", "images_per_second")}
    return {"config": run_.config.to_dict(), "summary": summary,
            "metrics": run_.metrics.drop(columns=list(TIMING)).astype(object).fillna("nan").to_dict("list")}


# ----------------------------------------------------------------------------- 1, 9: --export never deletes

def test_export_into_a_folder_with_other_files_is_refused_and_deletes_nothing(finished, tmp_path, capsys):
    runs_dir, _ = finished
    target = tmp_path / "E"
    target.mkdir()
    (target / "thesis.txt").write_text("x")
    assert cli_main(shared_argv(runs_dir, "--export", str(target))) == 2
    one_line_error(capsys, "--export", "not empty")
    assert (target / "thesis.txt").read_text() == "x" and sorted(os.listdir(target)) == ["thesis.txt"]
    # the parent of a folder, given as '..' from inside it: refused, nothing deleted
    inner = tmp_path / "project" / "sub"
    inner.mkdir(parents=True)
    (tmp_path / "project" / "notes.md").write_text("keep")
    cwd = os.getcwd()
    try:
        os.chdir(inner)
        assert cli_main(shared_argv(runs_dir, "--export", "..")) == 2
    finally:
        os.chdir(cwd)
    one_line_error(capsys, "--export")
    assert (tmp_path / "project" / "notes.md").read_text() == "keep" and inner.is_dir()
    # a file: refused, and no 'somefile.tmp' beside it
    (tmp_path / "somefile").write_text("data")
    assert cli_main(shared_argv(runs_dir, "--export", str(tmp_path / "somefile"))) == 2
    one_line_error(capsys, "is a file")
    assert (tmp_path / "somefile").read_text() == "data" and not leftovers(tmp_path)


def test_export_replaces_an_earlier_export_of_the_same_study_but_not_one_with_a_foreign_file(finished, tmp_path,
                                                                                             capsys):
    runs_dir, export_dir = finished
    copy = tmp_path / "copy"
    shutil.copytree(export_dir, copy)
    assert cli_main(shared_argv(runs_dir, "--export", str(copy))) == 0
    assert results.check_export(copy) == [] and not leftovers(tmp_path)
    (copy / "runs" / "mine.txt").write_text("x")
    assert cli_main(shared_argv(runs_dir, "--export", str(copy))) == 2
    one_line_error(capsys, "mine.txt")
    assert (copy / "runs" / "mine.txt").exists()
    # an empty folder and a link it did not write: refused, kept (issue 31, item 6)
    (copy / "runs" / "mine.txt").unlink()
    (copy / "runs" / "my-notes").mkdir()
    assert cli_main(shared_argv(runs_dir, "--export", str(copy))) == 2
    one_line_error(capsys, "runs/my-notes/")
    assert (copy / "runs" / "my-notes").is_dir()
    (copy / "runs" / "my-notes").rmdir()
    (copy / "paper.pdf").symlink_to(tmp_path)
    assert cli_main(shared_argv(runs_dir, "--export", str(copy))) == 2
    one_line_error(capsys, "paper.pdf: not a plain file")
    assert (copy / "paper.pdf").is_symlink()
    (copy / "paper.pdf").unlink()
    (copy / "study.json").write_text('{"profile": "smo')  # a damaged export: the run store's exit code
    assert cli_main(shared_argv(runs_dir, "--export", str(copy))) == 4
    one_line_error(capsys, "study.json is damaged", str(copy))


def test_export_targets_that_cannot_work_are_refused_before_training(tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    assert cli_main(study_argv(runs, "--export", "")) == 2
    one_line_error(capsys, "--export: expected the path of a folder")
    assert cli_main(study_argv(runs, "--print-commands", "--export", str(tmp_path / "E"))) == 2
    one_line_error(capsys, "--export: has no effect with --print-commands")
    locked = tmp_path / "locked"  # a read-only place (root passes permission bits, so the check is what is faked)
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == locked else real_access(path, mode))
    assert cli_main(study_argv(runs, "--export", str(locked / "E"))) == 2
    one_line_error(capsys, f"--export {locked / 'E'}", "not writable", "before training")
    assert not runs.exists() or not any(p.name.startswith(("sam-", "sgd-", "aace-")) for p in runs.iterdir())


def test_export_onto_a_full_disk_names_the_folder_and_the_space_and_keeps_the_earlier_export(finished, tmp_path,
                                                                                             capsys, monkeypatch):
    runs_dir, export_dir = finished
    copy = tmp_path / "copy"
    shutil.copytree(export_dir, copy)
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    real_copy, count = shutil.copyfile, {"n": 0}

    def full(src, dst, *args, **kwargs):
        count["n"] += 1
        if count["n"] == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_copy(src, dst, *args, **kwargs)
    monkeypatch.setattr(shutil, "copyfile", full)
    assert cli_main(shared_argv(runs_dir, "--export", str(copy))) == 5
    one_line_error(capsys, "disk full writing the export", str(copy), "bytes beside the earlier export", "free once")
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before
    assert not leftovers(tmp_path)


def test_history_write_on_a_full_disk_leaves_no_temporary_file(finished, tmp_path, capsys, monkeypatch):
    runs_dir = tmp_path / "runs"
    shutil.copytree(finished[0], runs_dir)
    next(runs_dir.glob("sam-*")).joinpath("summary.json").unlink()  # one run to train again: a history entry
    real_fsync = os.fsync

    def fsync(fd):  # the study's history file meets a full disk (the training children are other processes)
        if os.readlink(f"/proc/self/fd/{fd}").endswith("study-smoke.json.tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    assert cli_main(shared_argv(runs_dir)) == 5
    one_line_error(capsys, "disk full writing", "study-smoke.json", "bytes needed")
    assert not leftovers(runs_dir)


# ----------------------------------------------------------------------------- 4: the integrity check

def damage_metrics_number(export):
    run_dir = next((export / "runs").glob("sam-*"))
    lines = (run_dir / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    cells = lines[-1].split(",")
    cells[header.index("test_acc")] = "0.5555"
    (run_dir / "metrics.csv").write_text("\n".join(lines[:-1] + [",".join(cells)]) + "\n")


def set_status(export):
    f = next((export / "runs").glob("sgd-*")) / "summary.json"
    f.write_text(f.read_text().replace('"finished"', '"diverged"'))


def change_chosen(export):
    meta = json.loads((export / "study.json").read_text())
    key = next(iter(meta["chosen"]))
    meta["chosen"][key]["rho"] = 0.123
    (export / "study.json").write_text(json.dumps(meta))


DAMAGE = {
    "an edited test_acc": (damage_metrics_number, "SHA-256 mismatch"),
    "a deleted summary.json": (lambda e: next((e / "runs").glob("sam-*")).joinpath("summary.json").unlink(), "missing"),
    "a changed status": (set_status, "SHA-256 mismatch"),
    "a truncated metrics.csv": (lambda e: next((e / "runs").glob("aace-*")).joinpath("metrics.csv").write_text("ep"),
                                "SHA-256 mismatch"),
    "a missing run folder": (lambda e: shutil.rmtree(next((e / "runs").glob("sgd-*"))), "missing"),
    "a damaged study.json": (lambda e: (e / "study.json").write_text('{"profile": "smo'), "study.json is damaged"),
    "a changed chosen rho": (change_chosen, "changed after the export"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_integrity_check_reports_every_damage_without_raising_and_the_book_shows_it(finished, tmp_path, case,
                                                                                    monkeypatch):
    _, export_dir = finished
    broken = tmp_path / "broken"
    shutil.copytree(export_dir, broken)
    damage, words = DAMAGE[case]
    damage(broken)
    problems = results.check_export(broken)
    assert problems and any(words in p for p in problems), problems
    study_, runs, problems = results.read_export(broken)
    assert study_ is None and runs == [] and problems
    monkeypatch.setitem(gpu_scale.EXPORTS, "smoke", str(broken))
    text, tables = gpu_scale.gpu_scale_section("smoke")
    assert tables == [] and "cannot be shown" in text and words in text


def test_integrity_check_reports_a_stale_export(finished):
    _, export_dir = finished
    assert results.check_export(export_dir, "0.0.1")[0].startswith("stale: made by aace")


# ----------------------------------------------------------------------------- 5: study options

@pytest.mark.parametrize("argv,words", [
    (["--seed", "7"], "--seed: the study sets"), (["--rho", "0.1"], "--rho: the study sets"),
    (["--method", "sam"], "--method: the study sets"), (["--normalize", "true"], "--normalize: the study sets"),
    (["--stop-after", "nan"], "--stop-after"), (["--stop-after", "-1"], "--stop-after"),
])
def test_study_options_it_cannot_honour_are_refused_by_name(tmp_path, capsys, argv, words):
    assert cli_main(study_argv(tmp_path / "runs", *argv)) == 2
    one_line_error(capsys, words)


def test_print_commands_quotes_paths_and_each_command_trains_its_config(tmp_path, capsys):
    runs_dir = tmp_path / "a store with spaces"
    assert cli_main(["study", "--profile", "smoke", "--epochs", "1", "--runs-dir", str(runs_dir),
                     "--print-commands"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("python ")]
    assert len(lines) == len(study.tuning_configs(study.PLANS["smoke"])) + len(study.PLANS["smoke"].final_seeds)
    argv = shlex.split(lines[0])
    assert argv[argv.index("--runs-dir") + 1] == str(runs_dir)
    assert cli_main(argv[3:]) == 0
    trained = load_run(next(runs_dir.glob("*-*")))
    assert trained.config == study.tuning_configs(study.PLANS["smoke"], epochs=1)[0]


# ----------------------------------------------------------------------------- issue 24: resume from a partial export

def test_a_study_stopped_part_way_exported_and_resumed_on_an_empty_store_equals_an_uninterrupted_one(
        finished, tmp_path, capsys):
    whole_runs, whole = finished
    part_runs, export = tmp_path / "machine-a", tmp_path / "results" / "smoke"
    # every run stored but one final of a tuned arm (copied from the uninterrupted study's store: the same runs),
    # then a stop: the partial export holds exactly those
    stored = sorted(p for p in whole_runs.glob("*-*") if (p / "summary.json").is_file())
    missing = retrained_final(whole_runs)
    for folder in stored:
        if folder != missing:
            shutil.copytree(folder, part_runs / folder.name, ignore=shutil.ignore_patterns("lock"))
    assert cli_main(shared_argv(part_runs, "--stop-after", "0", "--export", str(export))) == 6
    assert "exported" in one_line_error(capsys, "--stop-after", "run the same command again")
    partial = json.loads((export / "study.json").read_text())
    assert partial["complete"] is False and len(partial["runs"]) == len(stored) - 1 and results.check_export(export) == []
    first_files = {p.relative_to(export): p.read_bytes() for p in (export / "runs").rglob("*") if p.is_file()}
    # another machine: an empty store, the committed export
    shutil.rmtree(part_runs)
    assert cli_main(shared_argv(tmp_path / "machine-b", "--export", str(export))) == 0
    resumed = json.loads((export / "study.json").read_text())
    assert resumed["complete"] is True and results.check_export(export) == []
    reference = json.loads((whole / "study.json").read_text())
    assert resumed["runs"] == reference["runs"] and resumed["chosen"] == reference["chosen"]
    for name in resumed["runs"]:
        assert run_fingerprint(export / "runs" / name) == run_fingerprint(whole / "runs" / name), name
    for relative, data in first_files.items():  # the exported runs were read in place, not trained again
        assert (export / relative).read_bytes() == data
    assert len(resumed["runs"]) == len(stored)
    assert sum(h["runs_trained"] for h in resumed["invocations"]) == 1  # the missing run, and nothing else
    assert [p.name for p in (tmp_path / "machine-b").glob("*-*") if p.is_dir()] == [missing.name]


# ----------------------------------------------------------------------------- 3, 6: the book command

BOOK = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
from aace.cli import main
sys.exit(main(sys.argv[1:]))
"""


def book_process(tmp_path, *argv):
    env = {k: v for k, v in os.environ.items() if k != "AACE_FROZEN_RUNS"}
    env["AACE_RUNS"] = str(tmp_path / "runs")
    return subprocess.Popen([sys.executable, "-c", BOOK, "book", "--profile", "smoke", "--no-build", "--output-dir",
                             str(tmp_path / "out"), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def previous_page(tmp_path, name):
    (tmp_path / "out").mkdir(exist_ok=True)
    page = tmp_path / "out" / f"{name}.ipynb"
    page.write_text('{"previous": "page"}')
    return page


def test_book_with_a_bad_parameter_ends_in_one_line_naming_it_and_keeps_the_previous_page(tmp_path):
    page = previous_page(tmp_path, "aace_loss")
    for value, words in (("{bad", "-p threshold: '{bad' is not valid JSON"),
                         ('"bad"', "parameter 'threshold'")):
        proc = book_process(tmp_path, "--notebook", "aace_loss", "-p", "threshold", value)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, err
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and words in errors[0] and "Traceback" not in err, err
        assert page.read_text() == '{"previous": "page"}'
        assert sorted(os.listdir(tmp_path / "out")) == ["aace_loss.ipynb"]  # no partial page left


@pytest.mark.parametrize("presses", [1, 2])  # two quick Ctrl-Cs once printed zmq's traceback (issue 31)
def test_ctrl_c_on_book_ends_in_one_line_every_run_interrupted_and_the_previous_page_kept(tmp_path, presses):
    page = previous_page(tmp_path, "comparison")
    # a seed the reference export lacks: the page trains its final runs (the tuning runs are read in place)
    proc = book_process(tmp_path, "--notebook", "comparison", "-p", "seeds", "[5]")
    runs_dir, deadline = tmp_path / "runs", time.time() + 240
    while time.time() < deadline and not any(p.joinpath("checkpoint.pt").exists() for p in runs_dir.glob("*-*")):
        time.sleep(0.05)
    assert proc.poll() is None, "the page ended before it trained anything"
    proc.send_signal(signal.SIGINT)
    if presses == 2:
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert errors == ["error: interrupted by SIGINT"], err[-3000:]
    # the runs the page trained were listed on the book's output (no terminal here: through $AACE_PROGRESS)
    assert "started SGD seed 5" in out, out[-3000:]
    assert "Traceback" not in err and "Task exception" not in err and "zmq" not in err, err[-3000:]
    shown = statuses(runs_dir)
    assert shown and not {"running", "stale"} & set(shown), shown
    assert page.read_text() == '{"previous": "page"}'
    assert sorted(os.listdir(tmp_path / "out")) == ["comparison.ipynb"]
