"""The trust chain (issue 31): a forged export is refused by its pin and never laundered on resume, extra content
is a finding, and a stored run is never overridden by an export that disagrees with it."""
import hashlib
import os
import json
import shutil

import pytest

from aace import reference, results
from aace.store import CorruptRun

FIXTURE = reference.ROOT / "tests/fixtures/study-smoke"


def forge(export, value=0.5336):
    """The forgery of issue 31: a final SAM run's test_acc edited in summary.json and metrics.csv, each file's
    SHA-256 and the record digest recomputed, so that the export's own check passes."""
    study = json.loads((export / "study.json").read_text())
    run_ = next(n for n in study["runs"] if n.startswith("sam-"))
    summary = export / "runs" / run_ / "summary.json"
    data = json.loads(summary.read_text())
    data["test_acc"] = value
    summary.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    metrics = export / "runs" / run_ / "metrics.csv"
    lines = metrics.read_text().splitlines()
    header, cells = lines[0].split(","), lines[-1].split(",")
    cells[header.index("test_acc")] = str(value)
    metrics.write_text("\n".join(lines[:-1] + [",".join(cells)]) + "\n")
    for name in ("summary.json", "metrics.csv"):
        study["files"][f"runs/{run_}/{name}"] = hashlib.sha256((export / "runs" / run_ / name).read_bytes()).hexdigest()
    study["digest"] = results._record_digest(study)
    (export / "study.json").write_text(json.dumps(study, indent=2, sort_keys=True) + "\n")
    return run_


@pytest.fixture
def forged_fixture(tmp_path, monkeypatch):
    """The smoke testbed's export, forged in a copy of the repository's layout that the package reads."""
    root = tmp_path / "repo"
    shutil.copytree(FIXTURE, root / "tests/fixtures/study-smoke")
    monkeypatch.setattr(reference, "ROOT", root)
    forge(root / "tests/fixtures/study-smoke")
    return root / "tests/fixtures/study-smoke"


def test_a_forged_export_passes_its_own_check_but_not_its_pin(forged_fixture):
    assert results.check_export(forged_fixture) == []  # the digests are unkeyed: the forgery is consistent
    study, runs, problems = reference.read("clean", "smoke")
    assert study is None and runs == [] and len(problems) == 1
    assert "study.json: its record digest" in problems[0] and "pins" in problems[0]


def test_the_genuine_fixture_matches_its_pin():
    study, runs, problems = reference.read("clean", "smoke")
    assert problems == [] and study["digest"] == reference.REFERENCES["smoke"]["clean"].digest


def test_resume_refuses_a_forged_export_of_a_pinned_study(forged_fixture):
    pin = reference.pinned_digest(forged_fixture)
    assert pin == reference.REFERENCES["smoke"]["clean"].digest
    with pytest.raises(CorruptRun, match="not the one the package pins"):
        results.runs_in_export(forged_fixture, pin)


def test_resume_stops_where_an_export_and_the_store_disagree(tmp_path):
    export = tmp_path / "export"
    shutil.copytree(FIXTURE, export)
    run_ = forge(export)
    store = tmp_path / "runs"
    shutil.copytree(FIXTURE / "runs" / run_, store / run_)  # the genuine run, stored
    found, _ = results.runs_in_export(export, None, store, check_store=True)  # unpinned: its own digests hold
    configs = {r.path.name: r.config for r in results.load_export(FIXTURE)[1]}
    with pytest.raises(CorruptRun) as err:
        found(configs[run_])
    assert str(export / "runs" / run_) in str(err.value) and str(store / run_) in str(err.value)
    other = next(name for name in configs if name != run_ and not (store / name).exists())
    assert found(configs[other]).path.name == other  # a run the store does not hold is still read from the export


@pytest.mark.parametrize("extra,words", [
    (lambda e: (e / "runs" / "sam-0000000000").mkdir(), "runs/sam-0000000000/: a folder the export does not record"),
    (lambda e: (e / "notes.txt").write_text("x"), "notes.txt: a file the export does not record"),
    (lambda e: next((e / "runs").iterdir()).joinpath("extra.csv").write_text("x"), "a file the export does not record"),
    (lambda e: (e / "link").symlink_to(e / "study.json"), "link: not a plain file or folder"),
])
def test_content_an_export_does_not_record_is_a_finding(tmp_path, extra, words):
    export = tmp_path / "export"
    shutil.copytree(FIXTURE, export)
    assert results.check_export(export) == []
    extra(export)
    problems = results.check_export(export)
    assert any(words in p for p in problems), problems


def test_an_export_that_differs_from_git_is_named(tmp_path, monkeypatch):
    import subprocess
    root = tmp_path / "repo"
    shutil.copytree(FIXTURE, root / "results/study-smoke")
    monkeypatch.setitem(reference.REFERENCES["smoke"], "clean", reference.Testbed(
        "clean", "smoke", "results/study-smoke", "clean labels", None, reference.REFERENCES["smoke"]["clean"].digest))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(root)]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-qm", "fixture"], check=True)
    monkeypatch.setattr(reference, "ROOT", root)
    assert reference.warnings("smoke") == []
    (root / "results/study-smoke/notes.txt").write_text("x")
    said = reference.warnings("smoke")
    assert len(said) == 1 and "differs from what git has committed" in said[0]
    assert "results/study-smoke/notes.txt" in said[0]
    assert any("notes.txt: a file the export does not record" in p for p in reference.read("clean", "smoke")[2])


@pytest.mark.parametrize("value,words", [("abc", "is not an accuracy in [0, 1]"), (float("nan"), "not an accuracy"),
                                         (1e308, "not an accuracy"), (0.9, "is not the last epoch's")])
def test_a_finished_run_s_summary_must_be_what_its_metrics_say(tmp_path, value, words):
    from aace.store import load_run
    run_ = tmp_path / "run"
    shutil.copytree(next((FIXTURE / "runs").glob("sam-*")), run_)
    summary = json.loads((run_ / "summary.json").read_text())
    assert load_run(run_, with_steps=False).summary["test_acc"] == summary["test_acc"]
    summary["test_acc"] = value
    (run_ / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(CorruptRun) as err:
        load_run(run_, with_steps=False)
    assert f"{run_ / 'summary.json'}: test_acc" in str(err.value) and words in str(err.value)


def one_line(capsys, *words):
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line]
    assert len(err) == 1 and err[0].startswith("error: "), err
    for w in words:
        assert w in err[0], err[0]


def test_book_and_train_options_that_cannot_work_end_in_one_line_naming_them(tmp_path, capsys, monkeypatch):
    from aace.cli import main
    page = ["book", "--profile", "smoke", "--notebook", "aace_loss", "--no-build"]
    (tmp_path / "afile").write_text("x")
    assert main([*page, "--output-dir", str(tmp_path / "afile")]) == 2
    one_line(capsys, f"--output-dir {tmp_path / 'afile'}", "is a file")
    assert main([*page, "--output-dir", str(tmp_path / "afile" / "sub")]) == 2
    one_line(capsys, f"--output-dir {tmp_path / 'afile' / 'sub'}", "cannot be created")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if str(p) == str(tmp_path / "ro") else real_access(p, m))
    (tmp_path / "ro").mkdir()
    assert main([*page, "--output-dir", str(tmp_path / "ro")]) == 2
    one_line(capsys, f"--output-dir {tmp_path / 'ro'}", "not writable")
    assert main([*page, "--output-dir", str(tmp_path / "out"), "-p", "profile", "nonsense"]) == 2
    one_line(capsys, "-p profile", "--profile")
    assert main(["train", "--profile", "smoke", "--threads", "100000", "--runs-dir", str(tmp_path / "runs")]) == 2
    one_line(capsys, "RunConfig.threads", "1024")
