"""Faults a long run meets: kills (also mid-checkpoint), damaged files, two processes, NaNs, bad input."""
import argparse
import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aace import store
from aace.cli import _parse_value
from aace.cli import main as cli_main
from aace.config import RunConfig, field_names, profile_config
from aace.train import run

SMOKE = dict(method="aace", epochs=4, train_subset=256, test_subset=100, batch_size=32)
ARGS = ["--profile", "smoke", "--method", "aace", "--epochs", "4", "--train-subset", "256", "--test-subset", "100",
        "--batch-size", "32", "--no-progress"]
CPU = torch.device("cpu")


def weights(run_dir):
    return store.load_checkpoint(run_dir, CPU)["model"]


def same_result(a, b):
    cols = [c for c in a.metrics if c not in ("epoch_seconds", "images_per_second")]
    wa, wb = weights(a.path), weights(b.path)
    return a.metrics[cols].equals(b.metrics[cols]) and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return run(profile_config("smoke", **SMOKE), tmp_path_factory.mktemp("reference"), progress=False)


# A training process that SIGKILLs itself at a chosen point of its n-th checkpoint write.
KILLER = textwrap.dedent("""
    import os, signal, sys
    import aace.store as store
    point, nth = sys.argv[1], int(sys.argv[2])
    count = {"n": 0}
    real_write, real_replace = store._atomic_write_bytes, os.replace

    def write(path, data):
        if path.name == "checkpoint.pt":
            count["n"] += 1
            if count["n"] == nth and point == "mid-write":
                with open(path.with_name(path.name + ".tmp"), "wb") as f:
                    f.write(data[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
        real_write(path, data)

    def replace(src, dst):
        if str(dst).endswith("checkpoint.pt") and count["n"] == nth and point == "before-rename":
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)
        if str(dst).endswith("checkpoint.pt") and count["n"] == nth and point == "after-rename":
            os.kill(os.getpid(), signal.SIGKILL)

    store._atomic_write_bytes, os.replace = write, replace
    from aace.cli import main
    main(["train", *sys.argv[3:]])
""")


@pytest.mark.parametrize("point,nth", [("mid-write", 1), ("before-rename", 2), ("after-rename", 3), ("mid-write", 4)])
def test_killed_anywhere_in_a_checkpoint_write_resumes_bit_for_bit(tmp_path, reference, point, nth):
    env = {**os.environ, "AACE_RUNS": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", KILLER, point, str(nth), *ARGS], env=env)
    assert proc.returncode == -signal.SIGKILL
    run_dir = tmp_path / reference.path.name
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "running"
    assert cli_main(["train", *ARGS, "--runs-dir", str(tmp_path)]) == 0
    assert same_result(store.load_run(run_dir), reference)


@pytest.mark.parametrize("delay", [0.5, 2.0])
def test_killed_at_random_moments_resumes_bit_for_bit(tmp_path, reference, delay):
    env = {**os.environ, "AACE_RUNS": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "aace", "train", *ARGS], env=env)
    deadline = time.time() + 120
    while not (tmp_path / reference.path.name / "config.json").exists() and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert cli_main(["train", *ARGS, "--runs-dir", str(tmp_path)]) == 0
    assert same_result(store.load_run(tmp_path / reference.path.name), reference)


@pytest.mark.parametrize("name,damage", [
    ("summary.json", lambda b: b[: len(b) // 2]),
    ("metrics.csv", lambda b: b[: len(b) // 3]),
    ("metrics.csv", lambda b: b.replace(b",", b";")),
    ("steps.csv", lambda b: b"\x00\x01garbage"),
])
def test_damaged_tables_are_reported_and_rebuilt_from_the_checkpoint(tmp_path, reference, name, damage, capsys):
    config = profile_config("smoke", **SMOKE)
    first = run(config, tmp_path, progress=False)
    file = first.path / name
    file.write_bytes(damage(file.read_bytes()))
    again = run(config, tmp_path, progress=False)
    assert name in capsys.readouterr().err
    assert again.finished and same_result(again, reference)


def test_damaged_checkpoint_named_with_fix_then_restart(tmp_path, reference):
    config = profile_config("smoke", **SMOKE)
    result = run(config, tmp_path, progress=False)
    store.write_summary(result.path, {"status": "running"})
    data = bytearray((result.path / "checkpoint.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit in the middle
    (result.path / "checkpoint.pt").write_bytes(bytes(data))
    with pytest.raises(store.CorruptRun, match=r"checkpoint\.pt.*--restart"):
        run(config, tmp_path, progress=False)
    assert same_result(run(config, tmp_path, progress=False, restart=True), reference)


def test_second_process_waits_for_the_lock(tmp_path, reference):
    run_dir = tmp_path / reference.path.name
    env = {**os.environ, "AACE_RUNS": str(tmp_path)}
    with store.RunLock(run_dir):
        proc = subprocess.Popen([sys.executable, "-m", "aace", "train", *ARGS], env=env, stderr=subprocess.PIPE,
                                text=True)
        said = ""
        while "in use by another process" not in said and proc.poll() is None:  # it finds the lock taken, says so
            said += proc.stderr.readline()
        time.sleep(1)
        assert proc.poll() is None, said  # still waiting
        assert not (run_dir / "summary.json").exists()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "in use by another process" in said + err
    assert same_result(store.load_run(run_dir), reference)


def test_divergence_stops_with_status_and_tables_say_so(tmp_path):
    from aace import experiments as ex
    result = run(profile_config("smoke", method="sam", lr=1e8, epochs=6, train_subset=128, test_subset=64,
                                batch_size=32), tmp_path, progress=False)
    assert result.status == "diverged"
    s = result.summary
    assert s["epoch"] < 6 and (s["epoch"] - 1) * 4 < s["step"] <= s["epoch"] * 4  # 4 steps per epoch
    assert s["loss"] in ("perturbation loss", "CE", "update loss")
    first_bad = result.steps[~result.steps[["ce_loss", "aace_loss", "train_loss"]].apply(
        lambda c: c.map(lambda v: v == v and abs(v) != float("inf"))).all(axis=1)].step.min()
    assert first_bad == s["step"]
    assert len(result.metrics) == s["epoch"]  # stopped: no epoch after the one that diverged
    assert ex.format_runs([result], "test_acc") == "diverged (1 of 1 runs)"


# ----------------------------------------------------------------------------- bad input, by property

VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 10 ** 6), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=12), st.lists(st.integers(), max_size=2))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(field_names()), value=VALUES)
def test_any_field_value_is_accepted_or_rejected_by_name(field, value):
    try:
        RunConfig(**{field: value})
    except ValueError as err:
        assert f"RunConfig.{field}" in str(err) or "RunConfig.model" in str(err)
        assert "expected" in str(err)


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(field_names()), text=st.text(max_size=10))
def test_command_line_values_parse_or_fail_by_name(field, text):
    hints = {f.name: str(f.type) for f in dataclasses.fields(RunConfig)}
    try:
        value = _parse_value(text, hints[field])
    except argparse.ArgumentTypeError as err:  # argparse turns it into a usage error naming the option
        assert str(err).startswith("expected")
        return
    try:
        profile_config("smoke", **{field: value})
    except ValueError as err:
        assert f"RunConfig.{field}" in str(err) or "RunConfig.model" in str(err)


def test_notebook_with_a_bad_parameter_fails_in_its_first_cell(tmp_path):
    import papermill
    from aace.book import NOTEBOOK_DIR
    with pytest.raises(papermill.PapermillExecutionError) as err:
        papermill.execute_notebook(str(NOTEBOOK_DIR / "convergence.ipynb"), str(tmp_path / "out.ipynb"),
                                   parameters={"profile": "smoke", "methods": ["adam"]}, progress_bar=False,
                                   kernel_name="python3")
    assert "parameter 'methods'" in str(err.value)
    executed = json.loads((tmp_path / "out.ipynb").read_text())
    code = [c for c in executed["cells"] if c["cell_type"] == "code"]
    failing = [i for i, c in enumerate(code) if any(o.get("output_type") == "error" for o in c.get("outputs", []))]
    assert failing == [2]  # parameters, injected parameters, then the first cell of the page


# ----------------------------------------------------------------------------- the fault matrix of the CLI

# A training process that sends itself a signal in the middle of a chosen epoch (deterministic, unlike a timer),
# or whose fsync of the n-th checkpoint fails with ENOSPC (a full disk, without needing a small tmpfs).
FAULTY = textwrap.dedent("""
    import errno, os, signal, sys
    import aace.store as store, aace.train as train
    fault, when = sys.argv[1], int(sys.argv[2])
    # A shell starts background jobs with SIGINT ignored (make test under nohup ... &): this test sends it on purpose.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if fault in ("SIGINT", "SIGTERM"):
        real_epoch = train.train_epoch
        def train_epoch(config, model, optimizer, loader, epoch, *args, **kwargs):
            if epoch + 1 == when:  # during this epoch, after its first steps
                real_next = loader.epoch
                def batches(e):
                    for i, batch in enumerate(real_next(e)):
                        if i == 3:
                            os.kill(os.getpid(), getattr(signal, fault))
                        yield batch
                loader.epoch = batches
            return real_epoch(config, model, optimizer, loader, epoch, *args, **kwargs)
        train.train_epoch = train_epoch
    else:
        count, real_fsync = {"n": 0}, os.fsync
        def fsync(fd):
            if os.readlink(f"/proc/self/fd/{fd}").endswith("checkpoint.pt.tmp"):
                count["n"] += 1
                if count["n"] == when:
                    raise OSError(errno.ENOSPC, "No space left on device")
            real_fsync(fd)
        os.fsync = fsync
    from aace.cli import main
    sys.exit(main(["train", *sys.argv[3:]]))
""")


def faulty_train(tmp_path, fault, when):
    env = {**os.environ, "AACE_RUNS": str(tmp_path)}
    return subprocess.run([sys.executable, "-c", FAULTY, fault, str(when), *ARGS], env=env, capture_output=True,
                          text=True, timeout=300)


def leftovers(path):
    return sorted(p.name for p in path.rglob("*.tmp"))


# Each signal once and each moment once (the first epoch, before any checkpoint; the third, after two): the signal
# decides the exception and exit code, the moment what there is to resume, and neither path depends on the other.
@pytest.mark.parametrize("name,code,epoch", [("SIGINT", 130, 1), ("SIGTERM", 143, 3)])
def test_interrupt_ends_with_one_line_a_truthful_status_and_resumes(tmp_path, reference, name, code, epoch):
    proc = faulty_train(tmp_path, name, epoch)
    assert proc.returncode == code, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: run interrupted by {name} after {epoch - 1} of 4 epochs")
    assert "run the same command again to resume" in lines[0]
    run_dir = tmp_path / reference.path.name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["epochs_done"] == epoch - 1 and summary["signal"] == name
    assert not leftovers(tmp_path) and not store.lock_held(run_dir)
    assert cli_main(["runs", "--runs-dir", str(tmp_path)]) == 0
    assert cli_main(["train", *ARGS, "--runs-dir", str(tmp_path)]) == 0
    assert same_result(store.load_run(run_dir), reference)


def test_disk_full_keeps_the_last_checkpoint_says_how_much_and_resumes(tmp_path, reference):
    proc = faulty_train(tmp_path, "ENOSPC", 2)
    assert proc.returncode == 5, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: disk full writing") and "bytes needed" in lines[0]
    run_dir = tmp_path / reference.path.name
    assert not leftovers(tmp_path)
    assert store.load_checkpoint(run_dir, CPU)["epoch"] == 1  # the previous checkpoint, whole
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "failed"
    assert cli_main(["train", *ARGS, "--runs-dir", str(tmp_path)]) == 0
    assert same_result(store.load_run(run_dir), reference)


def test_read_only_store_serves_finished_runs_and_refuses_new_ones_in_one_line(tmp_path, monkeypatch, capsys):
    finished = run(profile_config("smoke", method="sgd", epochs=1, train_subset=64, test_subset=32), tmp_path,
                   progress=False)

    def refuse(self, *args, **kwargs):  # what a read-only folder answers (root ignores chmod, so simulated)
        raise PermissionError(errno.EACCES, "Permission denied", str(self))
    monkeypatch.setattr(Path, "mkdir", refuse)
    monkeypatch.setattr(store.RunLock, "__enter__", lambda self: refuse(self.path))
    assert run(finished.config, tmp_path, progress=False).finished  # read without the lock
    assert cli_main(["train", "--profile", "smoke", "--epochs", "1", "--runs-dir", str(tmp_path)]) == 5
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Permission denied" in err[0]


def test_runs_dir_missing_or_a_file_is_an_error(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert cli_main(["runs", "--runs-dir", str(tmp_path / "typo")]) == 4
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["runs", "--runs-dir", str(tmp_path / "file")]) == 4
    assert "is a file" in capsys.readouterr().err
    assert cli_main(["train", "--profile", "smoke", "--epochs", "1", "--runs-dir", str(tmp_path / "file")]) == 5
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--runs-dir" in err[0]


MALFORMED = {"config.json": ("config.json", "{}"), "summary.json": ("summary.json", "[]"),
             "wall_seconds": ("summary.json", json.dumps({"status": "finished", "epochs": 1, "wall_seconds": "ten"}))}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_one_malformed_folder_never_breaks_the_listing_nor_training(tmp_path, case, capsys):
    good = run(profile_config("smoke", method="sgd", epochs=1, train_subset=64, test_subset=32), tmp_path,
               progress=False)
    config = profile_config("smoke", method="sam", epochs=1, train_subset=64, test_subset=32)
    bad = run(config, tmp_path, progress=False)
    name, text = MALFORMED[case]
    (bad.path / name).write_text(text)
    capsys.readouterr()
    assert cli_main(["runs", "--runs-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert good.path.name in out and bad.path.name in out
    if case != "wall_seconds":  # a readable run with a bad number shows "-" for it; the others are named
        assert any(line.startswith(bad.path.name) and "unreadable" in line for line in out.splitlines())
    assert cli_main(["train", "--profile", "smoke", "--method", "sam", "--epochs", "1", "--train-subset", "64",
                     "--test-subset", "32", "--runs-dir", str(tmp_path), "--no-progress"]) == 0


def test_stale_run_is_shown_as_such_and_a_live_one_as_running(tmp_path, capsys):
    r = run(profile_config("smoke", method="sgd", epochs=1, train_subset=64, test_subset=32), tmp_path, progress=False)
    store.write_summary(r.path, {"status": "running", "epochs_done": 0, "epochs": 1})
    assert store.shown_status(store.load_run(r.path)) == "stale"
    with store.RunLock(r.path):
        assert store.shown_status(store.load_run(r.path)) == "running"
    cli_main(["runs", "--runs-dir", str(tmp_path)])
    assert "stale" in capsys.readouterr().out


@pytest.mark.parametrize("argv,code,words", [
    (["--data-root", "EMPTY"], 3, "holds no Fashion-MNIST IDX file"),
    (["--data-root", "MISSING"], 3, "does not exist"),
    (["--dataset", "cifar10", "--data-root", "EMPTY"], 3, "cifar10 not found"),
    (["--train-subset", "5"], 2, "RunConfig.train_subset"),
])
def test_data_faults_end_in_one_line_with_the_fix(tmp_path, capsys, argv, code, words):
    (tmp_path / "empty").mkdir()
    argv = [{"EMPTY": str(tmp_path / "empty"), "MISSING": str(tmp_path / "missing")}.get(a, a) for a in argv]
    assert cli_main(["train", "--profile", "smoke", "--runs-dir", str(tmp_path / "runs"), *argv]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0]
    assert not list((tmp_path / "runs").glob("*/metrics.csv"))


def test_unexpected_errors_keep_their_traceback_and_debug_shows_every_one(tmp_path, monkeypatch):
    monkeypatch.setattr("aace.train.prepare_data", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cli_main(["train", "--profile", "smoke", "--runs-dir", str(tmp_path)])
    with pytest.raises(ValueError):
        cli_main(["--debug", "train", "--profile", "smoke", "--train-subset", "5", "--runs-dir", str(tmp_path)])
